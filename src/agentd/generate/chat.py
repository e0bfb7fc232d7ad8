"""The chat template of the built-in language model, in plain Python: the default for a
model without its own (:mod:`agentd.generate.chat_template` renders those).

The same format is written as a Jinja ``chat_template`` into the HF folder's
tokenizer_config.json, so transformers renders identical text.

    <|system|>\n{content}<|end|>\n<|user|>\n{content}<|end|>\n<|assistant|>\n

Each turn ends with ``<|end|>`` (the end-of-sequence token); generation starts after the
trailing ``<|assistant|>\n`` and stops at the next ``<|end|>``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from agentd.errors import InvalidArgument

__all__ = ["BOS", "END", "ROLES", "SPECIAL_TOKENS", "chat_pieces", "render_chat"]

BOS = "<|bos|>"
END = "<|end|>"
ROLES = ("system", "user", "assistant")
# Fixed ids 0..5 in the built-in tokenizer, in this order.
SPECIAL_TOKENS = (BOS, END, "<|system|>", "<|user|>", "<|assistant|>", "<|pad|>")


def render_chat(
    messages: Sequence[Mapping[str, object]], *, add_generation_prompt: bool = True
) -> str:
    """Render chat messages ({"role", "content"}) to the prompt text (BOS included)."""
    return "".join(text for text, _special in chat_pieces(messages, add_generation_prompt))


def chat_pieces(
    messages: Sequence[Mapping[str, object]], add_generation_prompt: bool = True
) -> list[tuple[str, bool]]:
    """The rendered prompt as ``(text, is_special_token)`` pieces, so contents can be
    tokenized apart from the template's special tokens."""
    pieces = [(BOS, True)]
    for index, message in enumerate(messages):
        role = message.get("role")
        content = message.get("content")
        if role not in ROLES:
            raise InvalidArgument(
                f"messages[{index}].role must be one of {', '.join(ROLES)}, got {role!r}"
            )
        if not isinstance(content, str):
            raise InvalidArgument(f"messages[{index}].content must be a string")
        pieces += [(f"<|{role}|>", True), ("\n" + content, False), (END, True), ("\n", False)]
    if add_generation_prompt:
        pieces += [("<|assistant|>", True), ("\n", False)]
    return pieces
