#!/usr/bin/env python3
"""Train agentd's built-in tiny language model (``tinylm``) from scratch, reproducibly.

1. a deterministic, license-clean corpus written by our own generator
   (``scripts/tinylm_corpus.py``: chats about arithmetic, counting, colours, animals, agent
   decisions and greetings, plus mini-stories and facts);
2. a byte-level BPE tokenizer trained on it with ``tokenizers`` (special tokens at ids 0..5
   in the order of ``agentd.generate.chat.SPECIAL_TOKENS``);
3. a Llama-architecture decoder (``transformers.LlamaForCausalLM``, ~3.7M parameters: 4
   layers, hidden 256, 4 heads of 64, SwiGLU 688, RMSNorm, RoPE, tied embeddings) trained
   with AdamW on CPU for a fixed number of steps (packed sequences, fixed seeds);
4. the Hugging Face folder ``models/tinylm/hf/`` (config.json, model.safetensors in fp32,
   generation_config.json, tokenizer.json, tokenizer_config.json with the chat template,
   training.json), and a copy of tokenizer.json as package data in
   ``src/agentd/models/tinylm/``.

Run from the repository root (about 7 minutes on two CPU cores with the defaults)::

    python scripts/train_tiny_lm.py [--steps 1200] [--batch-size 16] [--seq-len 128]

The same seed, options and library versions give the same weights (torch on CPU with a
fixed thread count). ONNX and GGUF forms are made from the HF folder by ``make models``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shutil
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "src"))
sys.path.insert(0, str(REPO / "scripts"))

from tinylm_corpus import make_corpus  # noqa: E402

from agentd.generate.chat import END, SPECIAL_TOKENS, render_chat  # noqa: E402

DEFAULT_OUT = REPO / "models" / "tinylm" / "hf"
PACKAGE_DIR = REPO / "src" / "agentd" / "models" / "tinylm"

# The architecture is fixed: the ONNX engine and the GGUF export rely on this shape.
ARCHITECTURE = {
    "hidden_size": 256,
    "intermediate_size": 688,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "num_key_value_heads": 4,
    "head_dim": 64,
    "max_position_embeddings": 1024,
    "rope_theta": 10000.0,
    "rms_norm_eps": 1e-5,
    "tie_word_embeddings": True,
    "hidden_act": "silu",
    "attention_bias": False,
    "mlp_bias": False,
    "bos_token_id": 0,
    "eos_token_id": 1,
    "pad_token_id": 5,
}

# Jinja form of agentd.generate.chat.render_chat (tests check they render the same text).
CHAT_TEMPLATE = (
    "{{ '<|bos|>' }}"
    "{% for message in messages %}"
    "{% if message['role'] not in ['system', 'user', 'assistant'] %}"
    "{{ raise_exception('role must be one of system, user, assistant') }}"
    "{% endif %}"
    "{{ '<|' + message['role'] + '|>\n' + message['content'] + '<|end|>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
)

# Written by hand (not by transformers' save_pretrained) so that transformers 4.x and 5.x
# both read it: the generic fast tokenizer class, the chat template inline.
TOKENIZER_CONFIG = {
    "tokenizer_class": "PreTrainedTokenizerFast",
    "bos_token": SPECIAL_TOKENS[0],
    "eos_token": END,
    "pad_token": SPECIAL_TOKENS[5],
    "additional_special_tokens": list(SPECIAL_TOKENS[2:5]),
    "add_bos_token": False,
    "add_eos_token": False,
    "clean_up_tokenization_spaces": False,
    "model_max_length": ARCHITECTURE["max_position_embeddings"],
    "chat_template": CHAT_TEMPLATE,
}

DEMO_PROMPTS = (
    [{"role": "user", "content": "what is 3 plus 4?"}],
    [{"role": "user", "content": "what is 7 plus 8?"}],
    [{"role": "user", "content": "what is 12 minus 5?"}],
    [{"role": "user", "content": "count from 5 to 9"}],
    [{"role": "user", "content": "what colour is the sky?"}],
    [{"role": "user", "content": "what sound does a cow make?"}],
    [{"role": "user", "content": "A threat is near. What should I do?"}],
    [{"role": "user", "content": "hello"}],
    [{"role": "user", "content": "tell me a story about a fox"}],
)


def train_tokenizer(corpus: list[str], vocab_size: int):
    """Byte-level BPE; special tokens first (ids 0..5), then the 256 byte symbols."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    # Special tokens are cut out before training so they never take part in merges.
    texts = []
    for document in corpus:
        for token in SPECIAL_TOKENS:
            document = document.replace(token, "\n")
        texts.append(document)
    tokenizer.train_from_iterator(texts, trainer=trainer, length=len(texts))
    for index, token in enumerate(SPECIAL_TOKENS):
        assert tokenizer.token_to_id(token) == index, (token, tokenizer.token_to_id(token))
    return tokenizer


def pack(tokenizer, corpus: list[str]) -> np.ndarray:
    """All documents' ids, concatenated (each starts with <|bos|>) into one int64 stream."""
    encodings = tokenizer.encode_batch(corpus, add_special_tokens=False)
    return np.concatenate([np.asarray(e.ids, dtype=np.int64) for e in encodings])


def lr_at(step: int, steps: int, peak: float, warmup: int) -> float:
    """Linear warm-up, then cosine decay to a tenth of the peak."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return peak * (0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * progress)))


def greedy_reply(model, tokenizer, messages: list[dict[str, str]], max_new_tokens: int = 40) -> str:
    """The model's greedy answer to a chat, up to (not including) <|end|>."""
    import torch

    ids = tokenizer.encode(render_chat(messages), add_special_tokens=False).ids
    with torch.no_grad():
        out = model.generate(
            torch.tensor([ids]), max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=5
        )
    return tokenizer.decode(out[0, len(ids) :].tolist(), skip_special_tokens=True)


def evaluate(model, tokenizer, seed: int, questions: int = 50) -> dict[str, float]:
    """Exact-answer accuracy on fresh seeded questions (held out only by chance: the
    small-number tables are in the corpus too)."""
    rng = np.random.default_rng(seed + 1)
    results: dict[str, float] = {}
    for task in ("plus", "minus", "count"):
        correct = 0
        for _ in range(questions):
            a, b = (int(x) for x in rng.integers(0, 21, size=2))
            if task == "plus":
                question, answer = f"what is {a} plus {b}?", f"{a} plus {b} is {a + b}."
            elif task == "minus":
                a, b = max(a, b), min(a, b)
                question, answer = f"what is {a} minus {b}?", f"{a} minus {b} is {a - b}."
            else:
                b = a + 2 + b % 5
                question = f"count from {a} to {b}"
                answer = ", ".join(str(n) for n in range(a, b + 1)) + "."
            reply = greedy_reply(model, tokenizer, [{"role": "user", "content": question}])
            correct += reply == answer
        results[f"{task}_accuracy"] = correct / questions
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=20240607)
    parser.add_argument("--documents", type=int, default=120_000, help="corpus size")
    parser.add_argument("--vocab-size", type=int, default=2048)
    parser.add_argument("--steps", type=int, default=1200)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--warmup", type=int, default=50)
    parser.add_argument("--weight-decay", type=float, default=0.01)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument(
        "--package-dir",
        type=str,
        default=str(PACKAGE_DIR),
        help="where tokenizer.json is copied as package data ('' to skip)",
    )
    args = parser.parse_args()

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    started = time.perf_counter()

    corpus = make_corpus(args.seed, args.documents)
    tokenizer = train_tokenizer(corpus, args.vocab_size)
    stream = pack(tokenizer, corpus)
    vocab_size = tokenizer.get_vocab_size(with_added_tokens=True)
    print(
        f"corpus: {len(corpus)} documents, {sum(map(len, corpus))} characters, "
        f"{len(stream)} tokens; tokenizer: {vocab_size} tokens "
        f"({time.perf_counter() - started:.1f} s)",
        flush=True,
    )

    config = LlamaConfig(vocab_size=vocab_size, **ARCHITECTURE)
    model = LlamaForCausalLM(config)
    model.train()
    parameters = sum(p.numel() for p in model.parameters())
    print(f"model: {parameters / 1e6:.2f}M parameters", flush=True)

    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    optimizer = torch.optim.AdamW(
        [
            {"params": decay, "weight_decay": args.weight_decay},
            {"params": no_decay, "weight_decay": 0.0},
        ],
        lr=args.lr,
        betas=(0.9, 0.95),
    )

    # Non-overlapping windows of the packed stream, visited in a seeded random order.
    windows = (len(stream) - 1) // args.seq_len
    order = np.random.default_rng(args.seed).permutation(windows)
    tokens_per_step = args.batch_size * args.seq_len
    if args.steps * args.batch_size > windows:
        print(f"note: {args.steps * args.batch_size} sequences > {windows} windows; repeating")

    train_started = time.perf_counter()
    losses: list[float] = []
    for step in range(args.steps):
        picks = [order[(step * args.batch_size + i) % windows] for i in range(args.batch_size)]
        batch = np.stack([stream[w * args.seq_len : (w + 1) * args.seq_len] for w in picks])
        input_ids = torch.from_numpy(batch)
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, args.steps, args.lr, args.warmup)
        loss = model(input_ids=input_ids, labels=input_ids).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        losses.append(loss.item())
        if step % 20 == 0 or step == args.steps - 1:
            elapsed = time.perf_counter() - train_started
            print(
                f"step {step:5d}  loss {losses[-1]:.4f}  lr {optimizer.param_groups[0]['lr']:.2e}"
                f"  {tokens_per_step * (step + 1) / elapsed:,.0f} tokens/s  {elapsed:.0f} s",
                flush=True,
            )
    train_seconds = time.perf_counter() - train_started
    final_loss = float(np.mean(losses[-20:]))

    model.eval()
    model.generation_config.bos_token_id = 0
    model.generation_config.eos_token_id = 1
    model.generation_config.pad_token_id = 5
    model.generation_config.do_sample = False
    args.out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(args.out)  # config.json, model.safetensors (fp32), generation_config

    tokenizer.save(str(args.out / "tokenizer.json"))
    (args.out / "tokenizer_config.json").write_text(json.dumps(TOKENIZER_CONFIG, indent=2) + "\n")
    if args.package_dir:
        package_dir = Path(args.package_dir)
        package_dir.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(args.out / "tokenizer.json", package_dir / "tokenizer.json")

    evaluation = evaluate(model, tokenizer, args.seed)
    report = {
        "seed": args.seed,
        "steps": args.steps,
        "batch_size": args.batch_size,
        "seq_len": args.seq_len,
        "lr": args.lr,
        "warmup": args.warmup,
        "weight_decay": args.weight_decay,
        "threads": args.threads,
        "parameters": parameters,
        "final_loss": round(final_loss, 4),
        "train_seconds": round(train_seconds, 1),
        "total_seconds": round(time.perf_counter() - started, 1),
        "corpus_documents": len(corpus),
        "corpus_characters": sum(map(len, corpus)),
        "corpus_tokens": len(stream),
        "tokens_seen": args.steps * tokens_per_step,
        "tokenizer_size": vocab_size,
        "evaluation": evaluation,
        "torch": torch.__version__,
        "transformers": __import__("transformers").__version__,
        "python": platform.python_version(),
    }
    (args.out / "training.json").write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))

    print("greedy samples:")
    for messages in DEMO_PROMPTS:
        print(f"  {messages[-1]['content']!r} -> {greedy_reply(model, tokenizer, messages)!r}")


if __name__ == "__main__":
    main()
