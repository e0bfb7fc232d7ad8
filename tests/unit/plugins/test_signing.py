"""ed25519 keys and MANIFEST.sig: key files, signing, and every signature refusal of the
Verifier; the trusted-key settings."""

from __future__ import annotations

import base64
import re
import stat

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ec import SECP256R1, generate_private_key

from agentd.errors import ConfigError, InvalidArgument
from agentd.plugins import PluginRefused, Verifier
from agentd.plugins.manifest import MANIFEST_FILE, SIGNATURE_FILE, sign_folder
from agentd.plugins.signing import (
    PRIVATE_KEY_FILE,
    PUBLIC_KEY_FILE,
    decode_signature,
    generate_keypair,
    load_signing_key,
    read_public_key,
)
from agentd.settings import load_settings
from tests.unit.plugins.test_manifest import make_folder, refusal, sha


@pytest.fixture
def keys(tmp_path):
    (tmp_path / "keys").mkdir()
    private, public, text = generate_keypair(tmp_path / "keys")
    return private, public, text


@pytest.fixture
def other_key(tmp_path):
    (tmp_path / "other").mkdir()
    return generate_keypair(tmp_path / "other")


def signed_folder(tmp_path, private):
    folder = make_folder(tmp_path / "plugins")
    sign_folder(folder, load_signing_key(private).sign)
    return folder


def test_keygen_writes_a_private_key_only_its_owner_reads(keys):
    private, public, text = keys
    assert (private.name, public.name) == (PRIVATE_KEY_FILE, PUBLIC_KEY_FILE)
    assert stat.S_IMODE(private.stat().st_mode) == 0o600
    assert private.read_bytes().startswith(b"-----BEGIN PRIVATE KEY-----")
    assert public.read_bytes().startswith(b"-----BEGIN PUBLIC KEY-----")
    # the three forms of the public key are the same key
    assert read_public_key(str(public)) == read_public_key(text) == base64.b64decode(text)
    assert load_signing_key(private).public_key == text
    with pytest.raises(InvalidArgument, match="exists"):
        generate_keypair(private.parent)
    assert stat.S_IMODE(private.stat().st_mode) == 0o600


def test_a_public_key_file_may_hold_the_base64_key(tmp_path, keys):
    (tmp_path / "key.b64").write_text(keys[2] + "\n")
    assert read_public_key(str(tmp_path / "key.b64")) == base64.b64decode(keys[2])


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (None, "no such file"),
        (b"hello", "not an ed25519 public key (PEM, or the raw 32-byte key in base64)"),
        (b"-----BEGIN PUBLIC KEY-----\nAAAA\n-----END PUBLIC KEY-----\n", "not a PEM public key"),
        ("ec", "not an ed25519 public key"),
        (b"x" * 100_000, "not a key file"),
    ],
    ids=["missing", "garbage", "bad-pem", "ec-key", "huge"],
)
def test_bad_public_keys_are_named(tmp_path, content, message):
    path = tmp_path / "key.pub"
    if content == "ec":
        content = (
            generate_private_key(SECP256R1())
            .public_key()
            .public_bytes(
                serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
            )
        )
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(InvalidArgument, match=re.escape(message)):
        read_public_key(str(path))


def test_bad_private_keys_are_named(tmp_path, keys):
    with pytest.raises(InvalidArgument, match="not a PEM private key"):
        load_signing_key(keys[1])  # the public one
    ec = tmp_path / "ec.key"
    ec.write_bytes(
        generate_private_key(SECP256R1()).private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    with pytest.raises(InvalidArgument, match="not an ed25519 private key"):
        load_signing_key(ec)
    with pytest.raises(InvalidArgument, match="no such file"):
        load_signing_key(tmp_path / "absent.key")


def test_a_signed_folder_verifies_with_its_key(tmp_path, keys):
    private, public, text = keys
    folder = signed_folder(tmp_path, private)
    verifier = Verifier(folder, [read_public_key(str(public))], require_signature=True)
    assert verifier.check_file(folder / "agents/echo.py") == sha("class A: pass\n")
    assert verifier.problems() == []
    assert verifier.signed_by == text
    assert decode_signature((folder / SIGNATURE_FILE).read_bytes())  # 64 bytes, one line
    assert (folder / SIGNATURE_FILE).read_bytes().count(b"\n") == 1


def test_a_tampered_manifest_fails_the_signature(tmp_path, keys):
    private, public, _ = keys
    folder = signed_folder(tmp_path, private)
    verifier = Verifier(folder, [read_public_key(str(public))])
    # the attacker edits a file and rewrites its line in MANIFEST to match
    (folder / "agents/echo.py").write_text("class A: evil = True\n")
    manifest = (folder / MANIFEST_FILE).read_text()
    (folder / MANIFEST_FILE).write_text(
        manifest.replace(sha("class A: pass\n"), sha("class A: evil = True\n"))
    )
    assert refusal(lambda: verifier.check_file(folder / "agents/echo.py")) == (
        "MANIFEST.sig does not verify with any trusted key"
    )


def test_a_tampered_file_under_a_good_signature_is_refused(tmp_path, keys):
    folder = signed_folder(tmp_path, keys[0])
    verifier = Verifier(folder, [read_public_key(keys[2])], require_signature=True)
    (folder / "tools/add.py").write_text("import os\n")
    assert "tools/add.py: sha256 " in refusal(lambda: verifier.check_file(folder / "tools/add.py"))


def test_a_signature_by_another_key_is_refused_and_several_keys_may_be_trusted(
    tmp_path, keys, other_key
):
    folder = signed_folder(tmp_path, other_key[0])
    verifier = Verifier(folder, [read_public_key(keys[2])])
    assert refusal(lambda: verifier.check_file(folder / "agents/echo.py")) == (
        "MANIFEST.sig does not verify with any trusted key"
    )
    both = Verifier(folder, [read_public_key(keys[2]), read_public_key(other_key[2])])
    both.check_file(folder / "agents/echo.py")
    assert both.signed_by == other_key[2]


@pytest.mark.parametrize(
    ("content", "reason"),
    [
        (b"", "MANIFEST.sig holds 0 bytes, not a 64-byte signature"),
        (b"not base64 at all!\n", "MANIFEST.sig is not base64"),
        (base64.b64encode(b"x" * 32) + b"\n", "MANIFEST.sig holds 32 bytes"),
        (b"A" * 5000, "MANIFEST.sig is larger than 4096 bytes"),
        (b"A" * 1000, "not one base64 signature"),
        (base64.b64encode(b"\0" * 64) + b"\n", "does not verify with any trusted key"),
    ],
    ids=["empty", "garbage", "truncated", "huge", "long", "zeros"],
)
def test_a_bad_signature_file_is_refused(tmp_path, keys, content, reason):
    folder = signed_folder(tmp_path, keys[0])
    (folder / SIGNATURE_FILE).write_bytes(content)
    verifier = Verifier(folder, [read_public_key(keys[2])])
    assert reason in refusal(lambda: verifier.check_file(folder / "agents/echo.py"))


def test_a_truncated_signature_is_refused(tmp_path, keys):
    folder = signed_folder(tmp_path, keys[0])
    good = (folder / SIGNATURE_FILE).read_bytes().strip()
    (folder / SIGNATURE_FILE).write_bytes(good[:40] + b"\n")
    verifier = Verifier(folder, [read_public_key(keys[2])])
    assert "MANIFEST.sig holds 30 bytes" in refusal(
        lambda: verifier.check_file(folder / "agents/echo.py")
    )


def test_require_signature_refuses_a_folder_without_manifest_or_signature(tmp_path, keys):
    folder = make_folder(tmp_path / "plugins")
    verifier = Verifier(folder, [read_public_key(keys[2])], require_signature=True)
    assert refusal(lambda: verifier.check_file(folder / "agents/echo.py")) == (
        "no MANIFEST (require_signature is on)"
    )
    sign_folder(folder, None)
    assert refusal(lambda: verifier.check_file(folder / "agents/echo.py")) == (
        "no MANIFEST.sig (require_signature is on)"
    )
    assert verifier.problems() == ["no MANIFEST.sig (require_signature is on)"]
    sign_folder(folder, load_signing_key(keys[0]).sign)  # signed later: accepted now
    assert verifier.check_file(folder / "agents/echo.py") == sha("class A: pass\n")
    with pytest.raises(InvalidArgument, match="at least one trusted key"):
        Verifier(folder, [], require_signature=True)


def test_without_trusted_keys_a_signature_is_not_checked_but_hashes_are(tmp_path, keys):
    folder = signed_folder(tmp_path, keys[0])
    (folder / SIGNATURE_FILE).write_bytes(b"garbage")
    verifier = Verifier(folder)
    assert verifier.check_file(folder / "agents/echo.py") == sha("class A: pass\n")
    (folder / "agents/echo.py").write_text("changed\n")
    assert "does not match MANIFEST" in refusal(
        lambda: verifier.check_file(folder / "agents/echo.py")
    )


def test_settings_take_keys_in_every_form_and_name_a_bad_one(tmp_path, keys, monkeypatch):
    private, public, text = keys
    settings = load_settings(
        plugins=tmp_path, plugin_trusted_keys=[str(public), text], require_signature=True
    )
    verifier = Verifier.from_settings(settings)
    assert verifier.require_signature and verifier.folder == tmp_path
    monkeypatch.setenv("AGENTD_PLUGIN_TRUSTED_KEYS", f"{public}, {text}")
    assert load_settings().plugin_trusted_keys == [str(public), text]
    monkeypatch.delenv("AGENTD_PLUGIN_TRUSTED_KEYS")
    with pytest.raises(ConfigError) as info:
        load_settings(plugin_trusted_keys=[text, str(private)])
    assert "plugin_trusted_keys: key 1: " in info.value.message
    assert "a private key; trust the public key (.pub) instead" in info.value.message
    pasted = private.read_text()
    with pytest.raises(InvalidArgument) as refused:
        read_public_key(pasted)
    assert pasted.splitlines()[1] not in refused.value.message
    with pytest.raises(ConfigError, match="require_signature needs plugin_trusted_keys"):
        load_settings(require_signature=True)


def test_settings_without_keys_do_not_import_cryptography():
    import subprocess
    import sys

    code = "import sys; from agentd.settings import load_settings; load_settings(); "
    code += "print('cryptography' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.stdout.strip() == "False", out.stderr


def test_a_signature_check_is_cached_per_manifest_content(tmp_path, keys):
    folder = signed_folder(tmp_path, keys[0])
    verifier = Verifier(folder, [read_public_key(keys[2])], require_signature=True)
    verifier.check_file(folder / "agents/echo.py")
    state = verifier._state()
    assert verifier._state() is state  # same bytes: no parse, no verification
    sign_folder(folder, load_signing_key(keys[0]).sign)  # same content rewritten
    assert verifier._state() is state
    (folder / "agents/echo.py").write_text("v2\n")
    sign_folder(folder, load_signing_key(keys[0]).sign)
    assert verifier._state() is not state
    with pytest.raises(PluginRefused):
        verifier.check_file(folder / "agents/missing.py")
