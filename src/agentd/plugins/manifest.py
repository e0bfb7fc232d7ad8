"""The plugin folder's ``MANIFEST``: the SHA256 of every plugin file, optionally signed.

Format (``sha256sum``'s, so ``sha256sum -c MANIFEST`` checks it too): one line per file,
``<64 lowercase hex>  <path>``, the path relative to the plugin folder in POSIX form, lines
sorted by path. It covers ``agents/*.py``, ``tools/*.py``, every file under each
``models/<name>/`` (the folders the model catalogue reads: not ``_*`` or ``.*``, and no
``__pycache__``), and the config file when it lies inside the folder. ``MANIFEST.sig`` is
the ed25519 signature of the exact ``MANIFEST`` bytes (see :mod:`agentd.plugins.signing`).

:class:`Verifier` is what the plugin manager asks before it swaps a changed file in.
"""

from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from agentd.errors import ConfigError, FailedPrecondition, InvalidArgument
from agentd.plugins.signing import TrustedKeys, decode_signature, encode_signature, read_public_key

if TYPE_CHECKING:
    from agentd.settings import Settings

__all__ = [
    "MANIFEST_FILE",
    "SIGNATURE_FILE",
    "Manifest",
    "PluginRefused",
    "Verifier",
    "plugin_files",
    "sha256_file",
    "sign_folder",
]

MANIFEST_FILE = "MANIFEST"
SIGNATURE_FILE = "MANIFEST.sig"
MAX_MANIFEST_BYTES = 16 * 1024 * 1024  # ~170k lines: far beyond any plugin folder
_MAX_SIGNATURE_FILE_BYTES = 4096
_LINE = re.compile(r"([0-9a-f]{64}) [ *](.+)")  # ' *' is sha256sum's binary-mode marker
_UNLISTABLE = re.compile(r"[\x00-\x1f\x7f\\]")  # sha256sum would escape these: not supported


class PluginRefused(FailedPrecondition):
    """A plugin file (or the whole folder) fails verification; ``reason`` is one line naming
    the file and what is wrong. The previous version of the plugin keeps serving."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True)
class Manifest:
    """Relative POSIX path -> SHA256 hex of each file the manifest lists."""

    entries: Mapping[str, str]

    def to_bytes(self) -> bytes:
        """The file's content: one ``<sha256>  <path>`` line per entry, sorted by path."""
        return "".join(
            f"{digest}  {path}\n" for path, digest in sorted(self.entries.items())
        ).encode()

    @classmethod
    def parse(cls, data: bytes) -> Manifest:
        """Read ``MANIFEST``'s content; PluginRefused naming the first bad line (not UTF-8,
        not ``<sha256>  <path>``, a path that leaves the folder, a path listed twice)."""
        if len(data) > MAX_MANIFEST_BYTES:
            raise PluginRefused(f"MANIFEST is larger than {MAX_MANIFEST_BYTES} bytes")
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise PluginRefused(f"MANIFEST is not UTF-8 (byte {exc.start})") from exc
        entries: dict[str, str] = {}
        for number, line in enumerate(text.split("\n"), start=1):
            if not line and number == text.count("\n") + 1:
                break  # the newline that ends the last line
            match = _LINE.fullmatch(line)
            if match is None:
                raise PluginRefused(
                    f"MANIFEST line {number}: not '<sha256 hex>  <path>': {_clip(line)!r}"
                )
            digest, path = match.groups()
            problem = _path_problem(path)
            if problem:
                raise PluginRefused(f"MANIFEST line {number}: {problem}: {_clip(path)!r}")
            if path in entries:
                raise PluginRefused(f"MANIFEST line {number}: {path} is listed twice")
            entries[path] = digest
        return cls(entries)


def sha256_file(path: Path) -> str:
    """The SHA256 (hex) of the file's content, read in chunks (models may be large)."""
    with path.open("rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def plugin_files(folder: Path, config: Path | None = None) -> list[str]:
    """The files of ``folder`` a MANIFEST must list (relative POSIX paths, sorted): what the
    node loads from it. InvalidArgument for a file name MANIFEST cannot hold (a control
    character or a backslash)."""
    found: list[str] = []
    for sub in ("agents", "tools"):
        directory = folder / sub
        if directory.is_dir():
            found += [f"{sub}/{p.name}" for p in directory.glob("*.py") if p.is_file()]
    models = folder / "models"
    if models.is_dir():
        for model in models.iterdir():
            if model.name.startswith(("_", ".")) or not model.is_dir():
                continue  # the catalogue skips these too
            found += _files_under(folder, model)
    if config is not None:
        inside = _relative_to(config, folder)
        if inside is not None and (folder / inside).is_file():
            found.append(inside)
    for path in found:
        if _UNLISTABLE.search(path):
            raise InvalidArgument(f"{path!r}: a file name with a control character or a backslash")
    return sorted(set(found))


def build_manifest(folder: Path, config: Path | None = None) -> Manifest:
    """Hash every plugin file of ``folder`` now."""
    return Manifest({path: sha256_file(folder / path) for path in plugin_files(folder, config)})


def sign_folder(
    folder: Path, signer: Callable[[bytes], bytes] | None, config: Path | None = None
) -> tuple[Manifest, bool]:
    """Write ``folder``'s MANIFEST (hashing its files now) and, with a ``signer``, its
    MANIFEST.sig; each replaced atomically, MANIFEST first. Without a signer a stale
    MANIFEST.sig is removed. Returns the manifest and whether a signature was removed."""
    manifest = build_manifest(folder, config)
    data = manifest.to_bytes()
    _write_atomically(folder / MANIFEST_FILE, data)
    removed = False
    if signer is not None:
        _write_atomically(folder / SIGNATURE_FILE, encode_signature(signer(data)))
    elif (folder / SIGNATURE_FILE).exists():
        (folder / SIGNATURE_FILE).unlink()
        removed = True
    return manifest, removed


@dataclass(frozen=True)
class _State:
    """What one (MANIFEST, MANIFEST.sig) content pair says: the manifest (None: there is
    none), the key that signed it, or why every file is refused."""

    manifest: Manifest | None
    signed_by: str | None = None
    refusal: str | None = None


class Verifier:
    """Checks files of one plugin folder against its MANIFEST before they are loaded.

    Without MANIFEST (and without ``require_signature``) every file is allowed: development.
    With a MANIFEST its hashes are enforced; MANIFEST.sig is checked whenever it is present
    and keys are trusted, and required with ``require_signature``. MANIFEST and MANIFEST.sig
    are read again on every check (they are small) and parsed and verified only when their
    content changed, so a manifest written after the file it lists is seen on the next try.
    Safe to call from any thread; it holds no open files.
    """

    def __init__(
        self,
        folder: Path,
        trusted_keys: Iterable[bytes] = (),
        *,
        require_signature: bool = False,
        config: Path | None = None,
    ) -> None:
        self.folder = folder
        self.require_signature = require_signature
        self._keys = TrustedKeys(trusted_keys)
        self._config = config
        if require_signature and not self._keys:
            raise InvalidArgument("require_signature needs at least one trusted key")
        self._cached: tuple[tuple[bytes | None, bytes | None], _State] | None = None

    @classmethod
    def from_settings(cls, settings: Settings) -> Verifier:
        """The verifier of ``settings.plugins`` with its trusted keys; ConfigError naming a
        key that cannot be read."""
        keys = []
        for index, spec in enumerate(settings.plugin_trusted_keys):
            try:
                keys.append(read_public_key(spec))
            except InvalidArgument as exc:
                raise ConfigError(f"plugin_trusted_keys[{index}]: {exc.message}") from exc
        return cls(
            settings.plugins,
            keys,
            require_signature=settings.require_signature,
            config=settings.config,
        )

    @property
    def manifest(self) -> Manifest | None:
        """The current MANIFEST (None: there is none, or it does not parse)."""
        return self._state().manifest

    @property
    def signed_by(self) -> str | None:
        """The trusted key (base64) that signed the current MANIFEST, if one did."""
        return self._state().signed_by

    def check_file(self, path: Path) -> str:
        """The SHA256 of the plugin file ``path`` (its version), once it matches MANIFEST.
        Raises PluginRefused with the reason otherwise."""
        return self._check(path, None)

    def check_bytes(self, path: Path, data: bytes) -> str:
        """:meth:`check_file` for ``data``, the content of ``path`` the caller already read
        (what it verifies is then exactly what it loads, not a second read)."""
        return self._check(path, data)

    def _check(self, path: Path, data: bytes | None) -> str:
        rel = self._relative(path)
        state = self._state()
        if state.refusal is not None:
            raise PluginRefused(state.refusal)
        if state.manifest is not None and rel not in state.manifest.entries:
            raise PluginRefused(f"{rel} is not in MANIFEST")
        digest = self._hash(rel) if data is None else hashlib.sha256(data).hexdigest()
        if state.manifest is not None:
            _check_digest(rel, digest, state.manifest.entries[rel])
        return digest

    def check_folder(self, path: Path) -> str:
        """A model folder's version (the SHA256 of its files' ``sha256sum`` lines) once every
        file under it matches MANIFEST and every file MANIFEST lists under it exists.
        Raises PluginRefused with the first problem otherwise."""
        rel = self._relative(path)
        state = self._state()
        if state.refusal is not None:
            raise PluginRefused(state.refusal)
        files = _files_under(self.folder, self.folder / rel)
        digests = {f: self._hash(f) for f in files}
        if state.manifest is not None:
            entries = state.manifest.entries
            for f in files:
                if f not in entries:
                    raise PluginRefused(f"{f} is not in MANIFEST")
                _check_digest(f, digests[f], entries[f])
            for listed in sorted(entries):
                if listed.startswith(rel + "/") and listed not in digests:
                    raise PluginRefused(f"{listed} is in MANIFEST but missing")
        lines = "".join(f"{digests[f]}  {f}\n" for f in sorted(digests))
        return hashlib.sha256(lines.encode()).hexdigest()

    def problems(self) -> list[str]:
        """Every reason the folder as a whole fails (empty: it passes), one line each: the
        manifest or signature, each listed file missing or changed, each plugin file not
        listed."""
        state = self._state()
        if state.refusal is not None:
            return [state.refusal]
        if state.manifest is None:
            return []
        entries = state.manifest.entries
        found: list[str] = []
        try:
            for rel in plugin_files(self.folder, self._config):
                if rel not in entries:
                    found.append(f"{rel} is not in MANIFEST")
        except InvalidArgument as exc:  # a file name no MANIFEST can list
            found.append(exc.message)
        for rel, expected in sorted(entries.items()):
            try:
                _check_digest(rel, self._hash(rel), expected)
            except PluginRefused as exc:
                found.append(exc.reason)
        return sorted(found)

    def _state(self) -> _State:
        manifest_bytes = self._read(MANIFEST_FILE, MAX_MANIFEST_BYTES)
        signature_bytes = self._read(SIGNATURE_FILE, _MAX_SIGNATURE_FILE_BYTES)
        key = (manifest_bytes, signature_bytes)
        cached = self._cached
        if cached is not None and cached[0] == key:
            return cached[1]
        state = self._judge(manifest_bytes, signature_bytes)
        self._cached = (key, state)  # one assignment: a racing thread sees old or new
        return state

    def _judge(self, manifest_bytes: bytes | None, signature_bytes: bytes | None) -> _State:
        if manifest_bytes is None:
            if self.require_signature:
                return _State(None, refusal="no MANIFEST (require_signature is on)")
            return _State(None)
        try:
            manifest = Manifest.parse(manifest_bytes)
        except PluginRefused as exc:
            return _State(None, refusal=exc.reason)
        if signature_bytes is None:
            if self.require_signature:
                return _State(manifest, refusal="no MANIFEST.sig (require_signature is on)")
            return _State(manifest)
        if not self._keys:
            return _State(manifest)  # nothing to check it with; hashes still enforced
        try:
            signature = decode_signature(signature_bytes)
        except ValueError as exc:
            return _State(manifest, refusal=str(exc))
        signed_by = self._keys.verify(manifest_bytes, signature)
        if signed_by is None:
            return _State(manifest, refusal="MANIFEST.sig does not verify with any trusted key")
        return _State(manifest, signed_by=signed_by)

    def _read(self, name: str, limit: int) -> bytes | None:
        try:
            with (self.folder / name).open("rb") as f:
                data = f.read(limit + 1)
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise PluginRefused(f"cannot read {name}: {exc.strerror}") from exc
        if len(data) > limit:
            raise PluginRefused(f"{name} is larger than {limit} bytes")
        return data

    def _hash(self, rel: str) -> str:
        try:
            return sha256_file(self.folder / rel)
        except FileNotFoundError as exc:
            raise PluginRefused(f"{rel} is in MANIFEST but missing") from exc
        except OSError as exc:
            raise PluginRefused(f"{rel}: cannot read: {exc.strerror}") from exc

    def _relative(self, path: Path) -> str:
        rel = _relative_to(Path(path), self.folder)
        if rel is None:
            raise PluginRefused(f"{path} is not inside the plugin folder {self.folder}")
        return rel


def _check_digest(rel: str, digest: str, expected: str) -> None:
    if digest != expected:
        raise PluginRefused(
            f"{rel}: sha256 {digest[:12]}... does not match MANIFEST ({expected[:12]}...)"
        )


def _files_under(folder: Path, top: Path) -> list[str]:
    """Every file under ``top`` as a path relative to ``folder``; symlinked folders are not
    followed (their files could change behind the manifest's back)."""
    found: list[str] = []
    for root, dirs, files in os.walk(top):
        dirs[:] = [d for d in dirs if d != "__pycache__"]
        base = Path(root)
        for name in files:
            if (base / name).is_file():
                found.append((base / name).relative_to(folder).as_posix())
    return found


def _relative_to(path: Path, folder: Path) -> str | None:
    """``path`` relative to ``folder`` in POSIX form, or None when it is outside. Lexical
    first, then with both sides' folders resolved (one may be a symlink or relative)."""
    try:
        rel = path.absolute().relative_to(folder.absolute())
    except ValueError:
        try:
            rel = (path.absolute().parent.resolve() / path.name).relative_to(folder.resolve())
        except ValueError:
            return None
    text = rel.as_posix()
    return None if text == "." or _path_problem(text) else text


def _path_problem(path: str) -> str | None:
    """Why ``path`` cannot name a file inside the plugin folder (None: it can)."""
    if path.startswith("/"):
        return "an absolute path"
    if _UNLISTABLE.search(path):
        return "a control character or backslash in the path"
    if any(part in ("", ".", "..") for part in path.split("/")):
        return "a path with '.', '..' or an empty part"
    if path in (MANIFEST_FILE, SIGNATURE_FILE):
        return f"{path} cannot list itself"
    return None


def _clip(text: str) -> str:
    return text if len(text) <= 80 else text[:77] + "..."


def _write_atomically(path: Path, data: bytes) -> None:
    """Write beside ``path``, then rename over it: a reader sees the old file or the new
    one, never half of one. The temporary name starts with a dot (watchers ignore it)."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with tmp.open("wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise InvalidArgument(f"cannot write {path}: {exc.strerror}") from exc
