"""The built-in tiny language model's files: config shape, tokenizer, chat template."""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path

import pytest

from agentd.generate.chat import SPECIAL_TOKENS, render_chat
from agentd.generate.tokenizer import Tokenizer

REPO = Path(__file__).resolve().parents[2]
HF_DIR = REPO / "models" / "tinylm" / "hf"
PACKAGE_TOKENIZER = Path(str(resources.files("agentd.models") / "tinylm" / "tokenizer.json"))

CONVERSATIONS = [
    [{"role": "user", "content": "what is 3 plus 4?"}],
    [
        {"role": "system", "content": "You are a helpful assistant."},
        {"role": "user", "content": "hello"},
        {"role": "assistant", "content": "Hello! How can I help you today?"},
        {"role": "user", "content": "count from 1 to 3 — ünïcödé ☃"},
    ],
    [{"role": "assistant", "content": "  leading spaces\nand lines\n"}],
]


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    return Tokenizer(PACKAGE_TOKENIZER)


def test_config_has_the_fixed_shape() -> None:
    config = json.loads((HF_DIR / "config.json").read_text())
    tokenizer_size = Tokenizer(HF_DIR / "tokenizer.json").vocab_size
    rope = config.get("rope_parameters") or {}
    assert config["architectures"] == ["LlamaForCausalLM"]
    assert {
        key: config[key]
        for key in (
            "model_type",
            "vocab_size",
            "hidden_size",
            "intermediate_size",
            "num_hidden_layers",
            "num_attention_heads",
            "num_key_value_heads",
            "head_dim",
            "max_position_embeddings",
            "rms_norm_eps",
            "tie_word_embeddings",
            "hidden_act",
            "attention_bias",
            "mlp_bias",
            "bos_token_id",
            "eos_token_id",
            "pad_token_id",
        )
    } == {
        "model_type": "llama",
        "vocab_size": tokenizer_size,
        "hidden_size": 256,
        "intermediate_size": 688,
        "num_hidden_layers": 4,
        "num_attention_heads": 4,
        "num_key_value_heads": 4,
        "head_dim": 64,
        "max_position_embeddings": 1024,
        "rms_norm_eps": 1e-5,
        "tie_word_embeddings": True,
        "hidden_act": "silu",
        "attention_bias": False,
        "mlp_bias": False,
        "bos_token_id": 0,
        "eos_token_id": 1,
        "pad_token_id": 5,
    }
    assert rope.get("rope_theta", config.get("rope_theta")) == 10000.0
    training = json.loads((HF_DIR / "training.json").read_text())
    assert training["tokenizer_size"] == tokenizer_size
    assert {"seed", "steps", "final_loss", "train_seconds", "corpus_documents"} <= training.keys()


def test_package_tokenizer_is_the_trained_one() -> None:
    assert PACKAGE_TOKENIZER.read_bytes() == (HF_DIR / "tokenizer.json").read_bytes()


def test_special_tokens_have_ids_0_to_5(tokenizer: Tokenizer) -> None:
    assert [tokenizer.token_id(token) for token in SPECIAL_TOKENS] == [0, 1, 2, 3, 4, 5]
    text = "".join(SPECIAL_TOKENS)
    assert tokenizer.encode(text) == [0, 1, 2, 3, 4, 5]
    assert tokenizer.decode([0, 3, 1]) == ""
    assert tokenizer.decode([0, 3, 1], skip_special=False) == "<|bos|><|user|><|end|>"


@pytest.mark.parametrize(
    "text",
    [
        "what is 3 plus 4? 3 plus 4 is 7.",
        "Once upon a time, a little fox lived near the river.",
        "  spaces,\ttabs\nand newlines  ",
        "ünïcödé ☃ 日本語 🦊 — bytes it never saw in training",
        "",
    ],
)
def test_round_trip(tokenizer: Tokenizer, text: str) -> None:
    ids = tokenizer.encode(text)
    assert all(0 <= i < tokenizer.vocab_size for i in ids)
    assert tokenizer.decode(ids) == text


def test_chat_prompts_encode_with_special_ids(tokenizer: Tokenizer) -> None:
    ids = tokenizer.encode(render_chat(CONVERSATIONS[0]))
    assert ids[:2] == [0, 3]  # <|bos|><|user|>
    assert ids[-2] == 4  # <|assistant|> then "\n"
    assert 1 in ids  # <|end|> closes the user turn


@pytest.mark.parametrize("messages", CONVERSATIONS)
@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_hf_chat_template_renders_like_render_chat(
    messages: list[dict[str, str]], add_generation_prompt: bool, tokenizer: Tokenizer
) -> None:
    transformers = pytest.importorskip("transformers")
    hf_tokenizer = transformers.AutoTokenizer.from_pretrained(HF_DIR)
    expected = render_chat(messages, add_generation_prompt=add_generation_prompt)
    rendered = hf_tokenizer.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=add_generation_prompt
    )
    assert rendered == expected
    assert hf_tokenizer(rendered, add_special_tokens=True)["input_ids"] == tokenizer.encode(
        expected
    )
