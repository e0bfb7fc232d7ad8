"""Text <-> token ids for language models, and incremental detokenizing for streams.

Wraps a HF ``tokenizers`` tokenizer.json (a small Rust library; no transformers needed).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from agentd.errors import InvalidArgument

if TYPE_CHECKING:
    from agentd.generate.chat_template import ChatTemplate

__all__ = ["Detokenizer", "Tokenizer"]


class Tokenizer:
    def __init__(self, path: Path) -> None:
        from tokenizers import Tokenizer as _RustTokenizer

        try:
            self._tokenizer = _RustTokenizer.from_file(str(path))
            # A second copy that reads special tokens written in text as plain text, for
            # chat contents: a user must not be able to forge ``<|system|>`` turns.
            self._plain = _RustTokenizer.from_file(str(path))
        except Exception as exc:  # the library raises plain Exception on a bad file
            raise InvalidArgument(f"cannot read tokenizer {path}: {exc}") from None
        self._plain.encode_special_tokens = True
        self.vocab_size = self._tokenizer.get_vocab_size(with_added_tokens=True)
        vocab = self._tokenizer.get_vocab(with_added_tokens=True)
        # Text per token at most (a byte-level token's string has one char per byte):
        # a text over context * this cannot fit and is refused without tokenizing it.
        self.max_token_chars = max(map(len, vocab), default=1)
        specials = {
            token_id: token.content
            for token_id, token in self._tokenizer.get_added_tokens_decoder().items()
            if token.special
        }
        self._special_ids = frozenset(specials)
        # Finds special-token text in chat contents (longest first); None: none to find.
        self._special_text = (
            re.compile("|".join(map(re.escape, sorted(specials.values(), key=len, reverse=True))))
            if specials
            else None
        )
        self._special_len = max(map(len, specials.values()), default=0)
        # The model's own chat template (set by the loader), None for agentd's built-in.
        self.chat_template: ChatTemplate | None = None

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text``; special tokens written in the text (``<|end|>``) map to
        their ids. Nothing is added (the chat template and prompts carry their own BOS)."""
        return self._tokenizer.encode(text, add_special_tokens=False).ids

    def encode_plain(self, text: str) -> list[int]:
        """Token ids of ``text`` with special tokens written in it read as plain text."""
        return self._plain.encode(text, add_special_tokens=False).ids

    def encode_chat(self, pieces: Sequence[tuple[str, bool]]) -> list[int]:
        """Token ids of a rendered chat prompt given as ``(text, from_template)`` pieces:
        special tokens count only inside the template's own text.

        The whole text is tokenized at once (the ids transformers gives, merges across piece
        boundaries included) unless a special token would then fall inside a content; then
        each piece is tokenized alone, contents with special tokens off."""
        text = "".join(piece for piece, _ in pieces)
        encoding = self._tokenizer.encode(text, add_special_tokens=False)
        contents: list[tuple[int, int]] = []
        start = 0
        for piece, from_template in pieces:
            if not from_template:
                contents.append((start, start + len(piece)))
            start += len(piece)
        if not self._special_in(text, contents):
            return encoding.ids  # the common case: no token offsets needed
        special = self._special_ids
        forged = any(
            begin < end_ and end > begin_
            for token_id, (begin, end) in zip(encoding.ids, encoding.offsets, strict=True)
            if token_id in special
            for begin_, end_ in contents
        )
        if not forged:
            return encoding.ids
        ids: list[int] = []
        for piece, from_template in pieces:
            ids += self.encode(piece) if from_template else self.encode_plain(piece)
        return ids

    def _special_in(self, text: str, spans: Sequence[tuple[int, int]]) -> bool:
        """Whether special-token text overlaps one of ``spans`` of ``text`` (a window a
        token long on each side, for a token split across a content's edge)."""
        pattern, reach = self._special_text, self._special_len - 1
        if pattern is None:
            return False
        for begin, end in spans:
            window = max(0, begin - reach)
            for match in pattern.finditer(text, window, min(len(text), end + reach)):
                if match.start() < end and match.end() > begin:
                    return True
        return False

    def decode(self, ids: Sequence[int], *, skip_special: bool = True) -> str:
        return self._tokenizer.decode(list(ids), skip_special_tokens=skip_special)

    def token_id(self, token: str) -> int | None:
        return self._tokenizer.token_to_id(token)


class Detokenizer:
    """Turns a growing list of token ids into text deltas.

    Byte-level BPE tokens can split a UTF-8 character; a delta is held back until the
    bytes complete it. Only a short window of recent ids is decoded per token.
    """

    __slots__ = ("_ids", "_prefix", "_read", "_tokenizer")

    def __init__(self, tokenizer: Tokenizer) -> None:
        self._tokenizer = tokenizer
        self._ids: list[int] = []
        self._prefix = 0  # start of the window decoded for context
        self._read = 0  # ids before this are already emitted

    def push(self, token_id: int) -> str:
        """Add one id; return the new text it completes ("" while a character is split)."""
        self._ids.append(token_id)
        decode = self._tokenizer.decode
        before = decode(self._ids[self._prefix : self._read])
        after = decode(self._ids[self._prefix :])
        if len(after) > len(before) and not after.endswith("\ufffd"):
            self._prefix = self._read
            self._read = len(self._ids)
            return after[len(before) :]
        return ""

    def flush(self) -> str:
        """Whatever is still held back (a dangling partial character decodes as U+FFFD)."""
        before = self._tokenizer.decode(self._ids[self._prefix : self._read])
        after = self._tokenizer.decode(self._ids[self._prefix :])
        self._prefix = self._read = len(self._ids)
        return after[len(before) :]
