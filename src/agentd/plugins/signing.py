"""Ed25519 keys and signatures over a plugin folder's ``MANIFEST`` (docs/plugins.md).

The one module that imports ``cryptography``. A signature is over the exact bytes of
``MANIFEST``; ``MANIFEST.sig`` holds the raw 64-byte signature in base64 on one line. Keys:
the private key is a PKCS#8 PEM file (mode 0600, never printed); a public key is given as a
PEM file (SubjectPublicKeyInfo, what ``agentd plugins keygen`` writes), a file holding the
raw 32-byte key in base64, or that base64 text itself.
"""

from __future__ import annotations

import base64
import binascii
import os
import stat
from collections.abc import Iterable
from pathlib import Path

from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey,
    Ed25519PublicKey,
)

from agentd.errors import InvalidArgument

__all__ = [
    "PRIVATE_KEY_FILE",
    "PUBLIC_KEY_FILE",
    "SIGNATURE_BYTES",
    "SigningKey",
    "TrustedKeys",
    "decode_signature",
    "encode_signature",
    "generate_keypair",
    "key_file_is_shared",
    "load_signing_key",
    "read_public_key",
]

PRIVATE_KEY_FILE = "agentd-plugins.key"
PUBLIC_KEY_FILE = "agentd-plugins.pub"
SIGNATURE_BYTES = 64
_PUBLIC_KEY_BYTES = 32
_MAX_KEY_FILE_BYTES = 64 * 1024  # a key file is a few hundred bytes; refuse to slurp more


class SigningKey:
    """An ed25519 private key loaded from its PEM file; signs manifests."""

    def __init__(self, key: Ed25519PrivateKey) -> None:
        self._key = key

    def sign(self, data: bytes) -> bytes:
        """The raw 64-byte signature of ``data``."""
        return self._key.sign(data)

    @property
    def public_key(self) -> str:
        """The matching public key as base64 of its 32 raw bytes."""
        raw = self._key.public_key().public_bytes(
            serialization.Encoding.Raw, serialization.PublicFormat.Raw
        )
        return base64.b64encode(raw).decode()


class TrustedKeys:
    """The public keys a signature may be made with, parsed once (a check is then only the
    ed25519 verification itself)."""

    def __init__(self, keys: Iterable[bytes]) -> None:
        self._keys = [(base64.b64encode(k).decode(), _public_key(k)) for k in dict.fromkeys(keys)]

    def __len__(self) -> int:
        return len(self._keys)

    def verify(self, data: bytes, signature: bytes) -> str | None:
        """The key (base64) that made ``signature`` over ``data``, or None when none did."""
        for name, key in self._keys:
            try:
                key.verify(signature, data)
            except InvalidSignature:
                continue
            return name
        return None


def generate_keypair(out_dir: Path) -> tuple[Path, Path, str]:
    """Write a new key pair into ``out_dir``: the private key (PKCS#8 PEM, created with mode
    0600) and the public key (PEM). Refuses to overwrite either file. Returns both paths and
    the public key in base64 (the form ``plugin_trusted_keys`` takes)."""
    private_path, public_path = out_dir / PRIVATE_KEY_FILE, out_dir / PUBLIC_KEY_FILE
    if not out_dir.is_dir():
        raise InvalidArgument(f"{out_dir} is not a directory")
    for path in (private_path, public_path):
        if path.exists() or path.is_symlink():
            raise InvalidArgument(f"{path} exists; move it away or choose another --out")
    key = Ed25519PrivateKey.generate()
    private_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    public_pem = key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    # O_EXCL with the mode at creation: the key is never readable by others, not even briefly.
    try:
        fd = os.open(private_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except OSError as exc:
        raise InvalidArgument(f"cannot write {private_path}: {exc.strerror}") from exc
    with os.fdopen(fd, "wb") as out:
        out.write(private_pem)
    try:
        public_path.write_bytes(public_pem)
    except OSError as exc:
        private_path.unlink()
        raise InvalidArgument(f"cannot write {public_path}: {exc.strerror}") from exc
    return private_path, public_path, SigningKey(key).public_key


def load_signing_key(path: Path) -> SigningKey:
    """The ed25519 private key in the PEM file ``path``; InvalidArgument naming the file when
    it cannot be read or holds something else."""
    data = _read_key_file(path)
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except TypeError as exc:  # encrypted with a passphrase
        raise InvalidArgument(f"{path}: encrypted private keys are not supported") from exc
    except (ValueError, UnsupportedAlgorithm) as exc:
        raise InvalidArgument(f"{path}: not a PEM private key") from exc
    if not isinstance(key, Ed25519PrivateKey):
        raise InvalidArgument(f"{path}: not an ed25519 private key")
    return SigningKey(key)


def key_file_is_shared(path: Path) -> bool:
    """Whether the group or others may read the private key file (worth a warning)."""
    try:
        return bool(path.stat().st_mode & (stat.S_IRWXG | stat.S_IRWXO))
    except OSError:
        return False


def read_public_key(spec: str) -> bytes:
    """The 32 raw bytes of the ed25519 public key ``spec`` names: base64 of the raw key, or
    a file holding either a PEM public key or that base64. InvalidArgument (one line naming
    ``spec``) otherwise."""
    spec = spec.strip()
    if "PRIVATE KEY" in spec:  # pasted key text: never echo it in an error
        raise InvalidArgument("a private key's text; trust the public key (.pub) instead")
    raw = _raw_key(spec)
    if raw is not None:
        return raw
    data = _read_key_file(Path(spec))
    if b"PRIVATE KEY-----" in data:  # an easy slip, and the private key must not be here
        raise InvalidArgument(f"{spec}: a private key; trust the public key (.pub) instead")
    if b"-----BEGIN" in data:
        try:
            key = serialization.load_pem_public_key(data)
        except (ValueError, UnsupportedAlgorithm) as exc:
            raise InvalidArgument(f"{spec}: not a PEM public key") from exc
        if not isinstance(key, Ed25519PublicKey):
            raise InvalidArgument(f"{spec}: not an ed25519 public key")
        return key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    raw = _raw_key(data.decode("ascii", "replace").strip())
    if raw is None:
        raise InvalidArgument(
            f"{spec}: not an ed25519 public key (PEM, or the raw 32-byte key in base64)"
        )
    return raw


def encode_signature(signature: bytes) -> bytes:
    """``MANIFEST.sig``'s content: the signature in base64 on one line."""
    return base64.b64encode(signature) + b"\n"


def decode_signature(data: bytes) -> bytes:
    """The raw signature in ``MANIFEST.sig``'s content; ValueError saying what is wrong."""
    text = data.strip()
    if len(text) > 4 * SIGNATURE_BYTES:
        raise ValueError(f"MANIFEST.sig is {len(data)} bytes, not one base64 signature")
    try:
        signature = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise ValueError("MANIFEST.sig is not base64") from exc
    if len(signature) != SIGNATURE_BYTES:
        raise ValueError(
            f"MANIFEST.sig holds {len(signature)} bytes, not a {SIGNATURE_BYTES}-byte signature"
        )
    return signature


def _raw_key(text: str) -> bytes | None:
    if len(text) != 44:  # base64 of 32 bytes
        return None
    try:
        raw = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        return None
    return raw if len(raw) == _PUBLIC_KEY_BYTES else None


def _public_key(raw: bytes) -> Ed25519PublicKey:
    try:
        return Ed25519PublicKey.from_public_bytes(raw)
    except ValueError as exc:
        raise InvalidArgument("an ed25519 public key is 32 bytes") from exc


def _read_key_file(path: Path) -> bytes:
    try:
        with path.open("rb") as f:
            data = f.read(_MAX_KEY_FILE_BYTES + 1)
    except FileNotFoundError as exc:
        raise InvalidArgument(f"{path}: no such file") from exc
    except IsADirectoryError as exc:
        raise InvalidArgument(f"{path} is a directory, not a key file") from exc
    except OSError as exc:
        raise InvalidArgument(f"cannot read {path}: {exc.strerror}") from exc
    if len(data) > _MAX_KEY_FILE_BYTES:
        raise InvalidArgument(f"{path}: larger than {_MAX_KEY_FILE_BYTES} bytes; not a key file")
    return data
