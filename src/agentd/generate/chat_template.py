"""A model's own chat template: the Jinja ``chat_template`` of its HF tokenizer_config.json
or of its GGUF metadata, rendered as transformers' ``apply_chat_template`` renders it.

The environment is the one transformers builds: Jinja2's ImmutableSandboxedEnvironment with
``trim_blocks`` and ``lstrip_blocks``, the ``loopcontrols`` extension, ``raise_exception``,
``strftime_now``, a ``tojson`` that does not escape HTML, and the tokenizer's special tokens
(``bos_token``, ``eos_token``, ...) as variables. A model without a template keeps agentd's
built-in one (:mod:`agentd.generate.chat`).

Message contents must not forge turns: :meth:`ChatTemplate.pieces` tells the template's own
text apart from the contents, so that only the template's special tokens are read as special.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import jinja2
import jinja2.ext
import jinja2.sandbox

from agentd.errors import InvalidArgument

if TYPE_CHECKING:
    from agentd.generate.config import LMConfig

__all__ = [
    "ChatTemplate",
    "gguf_chat_template",
    "load_chat_template",
    "read_tokenizer_config",
]

TOKENIZER_CONFIG = "tokenizer_config.json"
# The special-token variables transformers passes to a template (its special_tokens_map).
_SPECIAL_KEYS = (
    "bos_token",
    "eos_token",
    "unk_token",
    "sep_token",
    "pad_token",
    "cls_token",
    "mask_token",
)
# Stand-ins for message contents (private-use characters: no tokenizer merges them with
# template text, no template strips them).
_SENTINEL = re.compile("\ue000([0-9]+)\ue001")


def _raise_exception(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


def _tojson(
    value: Any,
    ensure_ascii: bool = False,
    indent: int | None = None,
    separators: tuple[str, str] | None = None,
    sort_keys: bool = False,
) -> str:
    # transformers overrides Jinja's tojson, which escapes HTML characters.
    return json.dumps(
        value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
    )


def _strftime_now(format: str) -> str:
    return datetime.now().strftime(format)


class _Namespace(jinja2.utils.Namespace):
    """``namespace()`` refusing underscore names, as transformers' (no CPython internals)."""

    def __init__(*args: Any, **kwargs: Any) -> None:
        self, rest = args[0], args[1:]
        attrs = dict(*rest, **kwargs)
        for name in attrs:
            _Namespace._check(name)
        jinja2.utils.Namespace.__init__(self, attrs)

    def __setitem__(self, name: str, value: Any) -> None:
        _Namespace._check(name)
        jinja2.utils.Namespace.__setitem__(self, name, value)

    @staticmethod
    def _check(name: object) -> None:
        if isinstance(name, str) and name.startswith("_"):
            raise jinja2.exceptions.SecurityError(
                f"chat templates cannot store underscore-prefixed attributes, got {name!r}"
            )


def _environment() -> jinja2.sandbox.ImmutableSandboxedEnvironment:
    env = jinja2.sandbox.ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    env.globals["namespace"] = _Namespace
    return env


class ChatTemplate:
    """A compiled chat template (compile once per model; rendering is thread-safe).

    ``special_tokens`` are the template's variables ``bos_token``, ``eos_token``, ...
    Raises InvalidArgument naming ``source`` when the template does not compile.
    """

    def __init__(
        self,
        template: str,
        special_tokens: Mapping[str, object] | None = None,
        *,
        source: str = "chat template",
    ) -> None:
        self.source = source
        self.text = template
        self.special_tokens = dict(special_tokens or {})
        try:
            self._template = _environment().from_string(template)
        except jinja2.exceptions.TemplateError as exc:
            raise InvalidArgument(f"{source}: {exc}") from None

    @property
    def bos_token(self) -> str:
        """The model's beginning-of-sequence text ("" when its config names none, as Qwen2's)."""
        bos = self.special_tokens.get("bos_token")
        return bos if isinstance(bos, str) else ""

    def render(
        self, messages: Sequence[Mapping[str, object]], *, add_generation_prompt: bool = True
    ) -> str:
        """The prompt text, as ``apply_chat_template(..., tokenize=False)`` gives it.
        A template error (``raise_exception`` in it, say) is InvalidArgument."""
        return self._render([dict(m) for m in messages], add_generation_prompt)

    def pieces(
        self, messages: Sequence[Mapping[str, object]], add_generation_prompt: bool = True
    ) -> list[tuple[str, bool]]:
        """The rendered prompt as ``(text, from_template)`` pieces: message contents are the
        pieces with ``from_template`` False, to be tokenized with special tokens off.

        The template is rendered twice, once as is and once with each non-empty content
        replaced by a sentinel; the second tells where contents go. A content the template
        rewrites beyond trimming whitespace cannot be told apart: InvalidArgument."""
        plain = [dict(m) for m in messages]
        for index, message in enumerate(plain):
            if not isinstance(message.get("role"), str):
                raise InvalidArgument(f"messages[{index}].role must be a string")
            if not isinstance(message.get("content"), str):
                raise InvalidArgument(f"messages[{index}].content must be a string")
        text = self._render(plain, add_generation_prompt)
        contents = [str(m["content"]) for m in plain]
        marked = [
            {**m, "content": f"\ue000{i}\ue001"} if contents[i] else m for i, m in enumerate(plain)
        ]
        skeleton = self._render(marked, add_generation_prompt)
        return _align(text, skeleton, contents, self.source)

    def _render(self, messages: list[dict[str, object]], add_generation_prompt: bool) -> str:
        variables = {
            **self.special_tokens,
            "messages": messages,
            "tools": None,
            "documents": None,
            "add_generation_prompt": add_generation_prompt,
        }
        try:
            return self._template.render(**variables)
        except jinja2.exceptions.TemplateError as exc:
            raise InvalidArgument(f"{self.source}: {exc}") from None
        except (TypeError, ValueError, KeyError, IndexError, AttributeError) as exc:
            # A template doing arithmetic on the wrong type, say: the request's fault or
            # the template's, never a 500.
            raise InvalidArgument(f"{self.source}: {type(exc).__name__}: {exc}") from None


def _align(text: str, skeleton: str, contents: list[str], source: str) -> list[tuple[str, bool]]:
    """Split ``text`` into template text and contents, following ``skeleton`` (the same
    render with sentinels for contents)."""
    parts = _SENTINEL.split(skeleton)  # segment, index, segment, index, ..., segment
    pieces: list[tuple[str, bool]] = []
    pos = 0
    for j in range(0, len(parts), 2):
        segment = parts[j]
        if not text.startswith(segment, pos):
            break
        if segment:
            pieces.append((segment, True))
        pos += len(segment)
        if j + 1 == len(parts):
            if pos == len(text):
                return _merge(pieces)
            break
        content = contents[int(parts[j + 1])]
        following = parts[j + 2]
        # As is, trimmed (Llama 3's ``| trim``), or inside a JSON string (``| tojson``).
        variants = (
            content,
            content.strip(),
            content.lstrip(),
            content.rstrip(),
            _tojson(content)[1:-1],
        )
        for candidate in dict.fromkeys(variants):
            end = pos + len(candidate)
            if text.startswith(candidate, pos) and text.startswith(following, end):
                if candidate:
                    pieces.append((candidate, False))
                pos = end
                break
        else:
            break
    raise InvalidArgument(
        f"{source}: the template rewrites message contents; agentd cannot keep them "
        "apart from its special tokens"
    )


def _merge(pieces: list[tuple[str, bool]]) -> list[tuple[str, bool]]:
    merged: list[tuple[str, bool]] = []
    for text, from_template in pieces:
        if merged and merged[-1][1] == from_template:
            merged[-1] = (merged[-1][0] + text, from_template)
        else:
            merged.append((text, from_template))
    return merged


def _token_text(value: object) -> str | None:
    # tokenizer_config.json writes a token as a string or as an AddedToken dict.
    if isinstance(value, str):
        return value
    if isinstance(value, Mapping) and isinstance(value.get("content"), str):
        return str(value["content"])
    return None


def read_tokenizer_config(path: Path) -> ChatTemplate | None:
    """The chat template of an HF tokenizer_config.json (a string, or the list of named
    templates: the one named "default"), or None when it has none. InvalidArgument for a
    file that cannot be read or a template that does not compile."""
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise InvalidArgument(f"cannot read {path}: {exc}") from None
    if not isinstance(config, dict):
        raise InvalidArgument(f"{path}: not a JSON object")
    template = config.get("chat_template")
    if isinstance(template, list):
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, Mapping)}
        template = named.get("default")
    if template is None:
        return None
    if not isinstance(template, str):
        raise InvalidArgument(f"{path}: chat_template must be a string or named templates")
    tokens = {key: _token_text(config.get(key)) for key in _SPECIAL_KEYS}
    special: dict[str, object] = {k: v for k, v in tokens.items() if v is not None}
    extra = config.get("additional_special_tokens")
    if isinstance(extra, list):
        special["additional_special_tokens"] = [t for t in map(_token_text, extra) if t]
    return ChatTemplate(template, special, source=f"chat template of {path}")


def gguf_chat_template(path: Path) -> ChatTemplate | None:
    """The ``tokenizer.chat_template`` of a GGUF file's metadata (bos/eos tokens from its
    vocabulary), or None when it has none."""
    from gguf import GGUFReader

    try:
        reader = GGUFReader(path)
    except Exception as exc:  # the reader raises ValueError, struct.error, OSError...
        raise InvalidArgument(f"cannot read GGUF metadata of {path}: {exc}") from None
    field = reader.fields.get("tokenizer.chat_template")
    if field is None:
        return None
    template = field.contents()
    if not isinstance(template, str):
        raise InvalidArgument(f"{path}: tokenizer.chat_template is not a string")
    special: dict[str, object] = {}
    tokens = reader.fields.get("tokenizer.ggml.tokens")
    for key in ("bos", "eos", "unk", "sep", "pad"):
        id_field = reader.fields.get(f"tokenizer.ggml.{key}_token_id")
        if tokens is None or id_field is None:
            continue
        token_id = int(id_field.contents())
        if 0 <= token_id < len(tokens.data):
            special[f"{key}_token"] = tokens.contents(token_id)
    return ChatTemplate(template, special, source=f"chat template of {path}")


def load_chat_template(config: LMConfig) -> ChatTemplate | None:
    """The model's own chat template: a tokenizer_config.json beside its tokenizer file, in
    its model folder (HF), or the GGUF metadata; None (agentd's built-in) otherwise."""
    folders = [config.tokenizer_path.parent]
    if config.model_path.is_dir():
        folders.append(config.model_path)
    for folder in folders:
        path = folder / TOKENIZER_CONFIG
        if path.is_file():
            template = read_tokenizer_config(path)
            if template is not None:
                return template
    if config.platform == "gguf":
        return gguf_chat_template(config.model_path)
    return None
