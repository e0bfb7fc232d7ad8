"""``agentd plugins keygen | sign | verify`` end to end, as a person runs them: exit codes,
one-line errors, never a traceback, and the private key never printed."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from tests.unit.plugins.test_manifest import make_folder


def agentd(*args: str, cwd: Path, **env: str) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("AGENTD_")}
    return subprocess.run(
        [sys.executable, "-m", "agentd", "plugins", *args],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=cwd,
        env={**clean, "COLUMNS": "200", **env},
    )


def ok(out: subprocess.CompletedProcess[str]) -> str:
    assert out.returncode == 0, (out.stdout, out.stderr)
    return out.stdout


def refused(out: subprocess.CompletedProcess[str], code: int, *lines: str) -> None:
    """Exit ``code`` with exactly ``lines`` (each an ``error: `` line) on stderr."""
    assert "Traceback" not in out.stderr, out.stderr
    assert out.returncode == code, (out.returncode, out.stdout, out.stderr)
    assert out.stderr.splitlines() == [f"error: {line}" for line in lines], out.stderr


@pytest.fixture
def signed(tmp_path):
    """A plugin folder signed with a fresh key: (folder, public key file, base64 key)."""
    out = ok(agentd("keygen", "--out", str(tmp_path), cwd=tmp_path))
    text = out.rsplit(" ", 1)[1].strip()
    folder = make_folder(tmp_path / "plugins")
    ok(agentd("sign", "plugins", "--key", "agentd-plugins.key", cwd=tmp_path))
    return folder, tmp_path / "agentd-plugins.pub", text


def test_keygen_writes_the_pair_and_never_prints_the_private_key(tmp_path):
    out = agentd("keygen", "--out", "keys", cwd=tmp_path)
    refused(out, 2, "keys is not a directory")
    (tmp_path / "keys").mkdir()
    out = ok(agentd("keygen", "--out", "keys", cwd=tmp_path))
    private = tmp_path / "keys" / "agentd-plugins.key"
    assert stat.S_IMODE(private.stat().st_mode) == 0o600
    secret = "".join(private.read_text().splitlines()[1:-1])
    assert secret not in out
    assert "trust it with plugin_trusted_keys: " in out
    before = private.read_bytes()
    refused(
        agentd("keygen", "--out", "keys", cwd=tmp_path),
        2,
        "keys/agentd-plugins.key exists; move it away or choose another --out",
    )
    assert private.read_bytes() == before


def test_sign_then_verify_with_each_form_of_the_key(signed, tmp_path):
    folder, public, text = signed
    lines = (folder / "MANIFEST").read_text().splitlines()
    assert [line.split("  ")[1] for line in lines] == [
        "agents/echo.py",
        "models/tiny/1/model.onnx",
        "models/tiny/config.yaml",
        "tools/add.py",
    ]
    assert subprocess.run(["sha256sum", "-c", "MANIFEST"], cwd=folder).returncode == 0
    out = ok(agentd("verify", "plugins", "--key", str(public), cwd=tmp_path))
    assert out == f"ok: 4 files checked against MANIFEST, signed by {text}\n"
    ok(agentd("verify", "plugins", "--key", text, "--require-signature", cwd=tmp_path))
    # the settings' keys when no --key is given
    out = agentd(
        "verify",
        "plugins",
        cwd=tmp_path,
        AGENTD_PLUGIN_TRUSTED_KEYS=f"{public},{text}",
        AGENTD_REQUIRE_SIGNATURE="true",
    )
    assert ok(out).endswith(f"signed by {text}\n")
    # no key at all: the hashes are checked, the signature said to be unchecked
    out = agentd("verify", "plugins", cwd=tmp_path)
    assert ok(out) == "ok: 4 files checked against MANIFEST\n"
    assert "warning: MANIFEST.sig not checked" in out.stderr


def test_verify_names_every_problem_in_one_line_each(signed, tmp_path):
    folder, public, _ = signed
    (folder / "agents/echo.py").write_text("class A: evil = True\n")
    (folder / "agents/extra.py").write_text("class B: pass\n")
    (folder / "models/tiny/config.yaml").unlink()
    out = agentd("verify", "plugins", "--key", str(public), cwd=tmp_path)
    assert "Traceback" not in out.stderr and out.returncode == 1
    errors = out.stderr.splitlines()
    assert len(errors) == 3, errors
    assert errors[0].startswith("error: agents/echo.py: sha256 ")
    assert errors[0].endswith("... does not match MANIFEST (" + errors[0][-16:])
    assert errors[1:] == [
        "error: agents/extra.py is not in MANIFEST",
        "error: models/tiny/config.yaml is in MANIFEST but missing",
    ]


@pytest.mark.parametrize(
    ("tamper", "line"),
    [
        (
            lambda f: (f / "MANIFEST").write_text((f / "MANIFEST").read_text().replace("a", "b")),
            "MANIFEST.sig does not verify with any trusted key",
        ),
        (lambda f: (f / "MANIFEST.sig").write_text("garbage!\n"), "MANIFEST.sig is not base64"),
        (
            lambda f: (f / "MANIFEST.sig").write_text((f / "MANIFEST.sig").read_text()[:20]),
            "MANIFEST.sig holds 15 bytes, not a 64-byte signature",
        ),
        (
            lambda f: (f / "MANIFEST").write_text(f"{'0' * 64}  ../../etc/passwd\n"),
            "MANIFEST line 1: a path with '.', '..' or an empty part: '../../etc/passwd'",
        ),
        (
            lambda f: (f / "MANIFEST").write_text(f"{'0' * 64}  /etc/passwd\n"),
            "MANIFEST line 1: an absolute path: '/etc/passwd'",
        ),
        (lambda f: (f / "MANIFEST.sig").unlink(), "no MANIFEST.sig (require_signature is on)"),
    ],
    ids=["manifest", "garbage-sig", "truncated-sig", "traversal", "absolute", "no-sig"],
)
def test_verify_refuses_a_tampered_folder(signed, tmp_path, tamper, line):
    folder, public, _ = signed
    tamper(folder)
    out = agentd("verify", "plugins", "--key", str(public), "--require-signature", cwd=tmp_path)
    refused(out, 1, line)


def test_verify_refuses_a_signature_by_another_key(signed, tmp_path):
    (tmp_path / "other").mkdir()
    ok(agentd("keygen", "--out", "other", cwd=tmp_path))
    out = agentd("verify", "plugins", "--key", "other/agentd-plugins.pub", cwd=tmp_path)
    refused(out, 1, "MANIFEST.sig does not verify with any trusted key")


def test_bad_arguments_exit_2_with_one_line(signed, tmp_path):
    refused(agentd("verify", "nowhere", cwd=tmp_path), 2, "nowhere does not exist")
    refused(
        agentd("sign", "agentd-plugins.pub", cwd=tmp_path),
        2,
        "agentd-plugins.pub is not a directory",
    )
    refused(
        agentd("sign", "plugins", "--key", "agentd-plugins.pub", cwd=tmp_path),
        2,
        "agentd-plugins.pub: not a PEM private key",
    )
    refused(
        agentd("verify", "plugins", "--key", "agentd-plugins.key", cwd=tmp_path),
        2,
        "--key: agentd-plugins.key: a private key; trust the public key (.pub) instead",
    )
    refused(
        agentd("verify", "plugins", "--require-signature", cwd=tmp_path),
        2,
        "--require-signature needs a trusted key (--key or plugin_trusted_keys)",
    )
    out = agentd("verify", "plugins", cwd=tmp_path, AGENTD_PLUGIN_TRUSTED_KEYS="nokey.pub")
    refused(
        out,
        2,
        "invalid settings: plugin_trusted_keys (AGENTD_PLUGIN_TRUSTED_KEYS): "
        "key 0: nokey.pub: no such file (got ['nokey.pub'])",
    )
    (tmp_path / "empty").mkdir()
    refused(
        agentd("verify", "empty", cwd=tmp_path),
        1,
        "empty has no MANIFEST (agentd plugins sign empty writes one)",
    )


def test_sign_lists_the_config_file_inside_and_unsigned_sign_drops_a_stale_signature(
    signed, tmp_path
):
    folder, _, _ = signed
    (tmp_path / "plugins" / "agentd.yaml").write_text("log_level: debug\n")
    out = agentd("sign", "plugins", cwd=tmp_path, AGENTD_CONFIG="plugins/agentd.yaml")
    assert ok(out).splitlines() == [
        "wrote plugins/MANIFEST (5 files, unsigned)",
        "removed the stale plugins/MANIFEST.sig",
    ]
    assert "  agentd.yaml\n" in (folder / "MANIFEST").read_text()
    (folder / "agentd.yaml").write_text("log_level: error\n")
    out = agentd("verify", "plugins", cwd=tmp_path, AGENTD_CONFIG="plugins/agentd.yaml")
    assert out.returncode == 1 and len(out.stderr.splitlines()) == 1, out.stderr
    assert out.stderr.startswith("error: agentd.yaml: sha256 ")


def test_sign_warns_about_a_private_key_others_can_read(signed, tmp_path):
    key = tmp_path / "agentd-plugins.key"
    key.chmod(0o644)
    out = agentd("sign", "plugins", "--key", str(key), cwd=tmp_path)
    ok(out)
    assert out.stderr == f"warning: {key} is readable by others (chmod 600 {key})\n"
