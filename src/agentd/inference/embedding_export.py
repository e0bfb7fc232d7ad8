"""Write an embedding model folder: a transformers ``BertModel`` exported to ONNX, a
WordPiece ``tokenizer.json`` and a ``config.yaml`` with ``kind: embedding``.

``python -m agentd.inference.embedding_export OUT`` writes a MiniLM-shaped model with random
weights (6 layers, hidden 384, 12 heads, vocabulary 30,522: the shape of
all-MiniLM-L6-v2), for tests and benchmarks without a download. :func:`export_bert` exports
any ``BertModel`` (e.g. one read with ``from_pretrained``) the same way.

Needs the ``hf`` extra (transformers and torch).
"""

from __future__ import annotations

import argparse
import string
import warnings
from pathlib import Path
from typing import Any

import yaml

__all__ = ["export_bert", "minilm_config", "random_bert", "write_tokenizer"]

SPECIAL = {"[PAD]": 0, "[UNK]": 100, "[CLS]": 101, "[SEP]": 102, "[MASK]": 103}


def minilm_config(**overrides: Any) -> Any:
    """A ``BertConfig`` of MiniLM's shape (``overrides`` change it, e.g. num_hidden_layers)."""
    from transformers import BertConfig

    settings: dict[str, Any] = {
        "vocab_size": 30522,
        "hidden_size": 384,
        "num_hidden_layers": 6,
        "num_attention_heads": 12,
        "intermediate_size": 1536,
        "max_position_embeddings": 512,
        # Eager attention exports the padding mask as written (the same math as SDPA).
        "attn_implementation": "eager",
    }
    settings.update(overrides)
    return BertConfig(**settings)


def random_bert(config: Any, seed: int = 0) -> Any:
    """A ``BertModel`` with random weights (no pooler), in eval mode."""
    import torch
    from transformers import BertModel

    torch.manual_seed(seed)
    return BertModel(config, add_pooling_layer=False).eval()


def write_tokenizer(path: Path, vocab_size: int) -> None:
    """A lower-casing WordPiece ``tokenizer.json`` with BERT's special ids ([CLS] 101,
    [SEP] 102): letters, digits and punctuation, their ``##`` forms, then filler tokens up
    to ``vocab_size`` (every text tokenizes; none needs a download)."""
    from tokenizers import Tokenizer, decoders, normalizers, pre_tokenizers, processors
    from tokenizers.models import WordPiece

    vocab: dict[str, int] = {}
    names = iter(f"[unused{i}]" for i in range(vocab_size))
    symbols = list(string.ascii_lowercase + string.digits + string.punctuation)
    pieces = symbols + ["##" + s for s in symbols]
    pieces += ["the", "a", "of", "and", "to", "in", "is", "it", "agent", "model", "##s"]
    for token_id in range(vocab_size):
        special = next((t for t, i in SPECIAL.items() if i == token_id), None)
        if special is not None:
            vocab[special] = token_id
        elif token_id > 103 and pieces:
            vocab[pieces.pop(0)] = token_id
        else:
            vocab[next(names)] = token_id
    tokenizer = Tokenizer(WordPiece(vocab, unk_token="[UNK]", max_input_chars_per_word=100))
    tokenizer.normalizer = normalizers.BertNormalizer(lowercase=True)
    tokenizer.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tokenizer.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]",
        pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", 101), ("[SEP]", 102)],
    )
    tokenizer.decoder = decoders.WordPiece()
    tokenizer.save(str(path))


def export_bert(
    model: Any,
    folder: Path,
    *,
    name: str | None = None,
    tokenizer: Path | None = None,
    pooling: str = "mean",
    normalize: bool = True,
    max_tokens: int = 256,
    truncate: bool = False,
    max_batch_size: int = 32,
    max_queue_delay_us: int = 2000,
) -> Path:
    """Write ``folder`` (model.onnx, tokenizer.json, config.yaml) for ``model`` (a
    ``BertModel``); ``tokenizer``: a tokenizer.json to copy (default: a synthetic one of
    the model's vocabulary size). Returns the folder."""
    import torch

    folder.mkdir(parents=True, exist_ok=True)

    class _Encoder(torch.nn.Module):
        def __init__(self, bert: Any) -> None:
            super().__init__()
            self.bert = bert

        def forward(self, input_ids: Any, attention_mask: Any, token_type_ids: Any) -> Any:
            # Keyword arguments: BertModel's positional order changes between versions.
            out = self.bert(
                input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids
            )
            return out.last_hidden_state

    was_training = model.training
    encoder = _Encoder(model).eval()  # the exporter restores the wrapper's mode after
    # A padded example, so the trace keeps the attention mask's path.
    ids = torch.tensor([[101, 104, 105, 102], [101, 106, 102, 0]])
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 1, 0]])
    names = ["input_ids", "attention_mask", "token_type_ids"]
    axes = {n: {0: "batch", 1: "sequence"} for n in [*names, "last_hidden_state"]}
    with warnings.catch_warnings():
        # The TorchScript exporter (the dynamo one needs onnxscript, not a dependency)
        # warns that it is deprecated, and its tracer about Python branches on shapes.
        warnings.simplefilter("ignore")
        torch.onnx.export(
            encoder,
            (ids, mask, torch.zeros_like(ids)),
            str(folder / "model.onnx"),
            input_names=names,
            output_names=["last_hidden_state"],
            dynamic_axes=axes,
            opset_version=17,
            dynamo=False,
        )
    model.train(was_training)
    if tokenizer is not None:
        (folder / "tokenizer.json").write_bytes(tokenizer.read_bytes())
    else:
        write_tokenizer(folder / "tokenizer.json", model.config.vocab_size)
    config = {
        "name": name or folder.name,
        "kind": "embedding",
        "max_batch_size": max_batch_size,
        "dynamic_batching": {"max_queue_delay_us": max_queue_delay_us},
        "embedding": {
            "pooling": pooling,
            "normalize": normalize,
            "max_tokens": min(max_tokens, model.config.max_position_embeddings),
            "truncate": truncate,
            "dimensions": model.config.hidden_size,
        },
    }
    (folder / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    return folder


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder", type=Path, help="the model folder to write")
    parser.add_argument("--layers", type=int, default=6)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    model = random_bert(minilm_config(num_hidden_layers=args.layers), args.seed)
    print(export_bert(model, args.folder))


if __name__ == "__main__":
    main()
