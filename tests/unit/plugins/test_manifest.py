"""MANIFEST: the format (sha256sum's), what it covers, and every refusal of the Verifier
without signatures (tests/unit/plugins/test_signing.py has the signed cases)."""

from __future__ import annotations

import hashlib
import os
import subprocess
import time
from pathlib import Path

import pytest

from agentd.errors import Code, FailedPrecondition, InvalidArgument
from agentd.plugins import Manifest, PluginRefused, Verifier
from agentd.plugins.manifest import (
    MANIFEST_FILE,
    SIGNATURE_FILE,
    build_manifest,
    plugin_files,
    sha256_file,
    sign_folder,
)


def make_folder(root: Path) -> Path:
    """A plugin folder with a file of every kind, and files the manifest leaves out."""
    files = {
        "agents/echo.py": "class A: pass\n",
        "agents/notes.txt": "not a plugin\n",
        "tools/add.py": "def add(a, b): return a + b\n",
        "models/tiny/config.yaml": "kind: tensor\n",
        "models/tiny/1/model.onnx": "\x00\x01weights",
        "models/tiny/__pycache__/x.pyc": "generated",
        "models/_draft/config.yaml": "ignored by the catalogue\n",
        "agentd.yaml": "log_level: info\n",
        "README.md": "hello\n",
    }
    for rel, text in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text)
    return root


def sha(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def refusal(call) -> str:
    with pytest.raises(PluginRefused) as info:
        call()
    assert info.value.code is Code.FAILED_PRECONDITION
    assert "\n" not in info.value.reason
    return info.value.reason


# --- the format ----------------------------------------------------------------------------


def test_the_manifest_covers_what_the_node_loads_and_the_config_inside(tmp_path):
    folder = make_folder(tmp_path)
    assert plugin_files(folder) == [
        "agents/echo.py",
        "models/tiny/1/model.onnx",
        "models/tiny/config.yaml",
        "tools/add.py",
    ]
    assert "agentd.yaml" in plugin_files(folder, config=folder / "agentd.yaml")
    outside = tmp_path.parent / f"{tmp_path.name}-agentd.yaml"
    assert plugin_files(folder, config=outside) == plugin_files(folder)


def test_format_round_trip_is_sorted_sha256sum_lines(tmp_path):
    folder = make_folder(tmp_path)
    manifest = build_manifest(folder, config=folder / "agentd.yaml")
    data = manifest.to_bytes()
    lines = data.decode().splitlines()
    assert lines == sorted(lines, key=lambda line: line[66:])
    assert f"{sha('class A: pass' + chr(10))}  agents/echo.py" in lines
    assert Manifest.parse(data) == manifest
    assert Manifest.parse(data).to_bytes() == data
    assert manifest.entries["tools/add.py"] == sha256_file(folder / "tools/add.py")


def test_sha256sum_checks_what_sign_writes(tmp_path):
    folder = make_folder(tmp_path)
    sign_folder(folder, None, config=folder / "agentd.yaml")
    ok = subprocess.run(
        ["sha256sum", "--strict", "-c", MANIFEST_FILE], cwd=folder, capture_output=True, text=True
    )
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert "agents/echo.py: OK" in ok.stdout
    (folder / "tools/add.py").write_text("def add(a, b): return a - b\n")
    bad = subprocess.run(["sha256sum", "-c", MANIFEST_FILE], cwd=folder, capture_output=True)
    assert bad.returncode == 1
    # and the binary-mode marker sha256sum -b writes is read too
    out = subprocess.run(
        ["sha256sum", "-b", "agents/echo.py"], cwd=folder, capture_output=True, check=True
    )
    assert Manifest.parse(out.stdout).entries == {"agents/echo.py": sha("class A: pass\n")}


@pytest.mark.parametrize(
    ("line", "reason"),
    [
        (f"{'0' * 64}  ../x.py", "'..'"),
        (f"{'0' * 64}  agents/../../etc/passwd", "'..'"),
        (f"{'0' * 64}  /etc/passwd", "an absolute path"),
        (f"{'0' * 64}  agents//x.py", "an empty part"),
        (f"{'0' * 64}  ./agents/x.py", "'.'"),
        (f"{'0' * 64}  agents\\x.py", "backslash"),
        (f"{'0' * 64}  MANIFEST", "cannot list itself"),
        (f"{'0' * 63}  agents/x.py", "not '<sha256 hex>  <path>'"),
        (f"{'A' * 64}  agents/x.py", "not '<sha256 hex>  <path>'"),
        (f"{'0' * 64} agents/x.py", "not '<sha256 hex>  <path>'"),
        ("", "not '<sha256 hex>  <path>'"),
    ],
    ids=[
        "parent",
        "deep-parent",
        "absolute",
        "empty-part",
        "dot",
        "backslash",
        "itself",
        "short-hash",
        "uppercase",
        "one-space",
        "blank-line",
    ],
)
def test_bad_manifest_lines_are_refused_by_line(line, reason):
    data = f"{'1' * 64}  agents/a.py\n{line}\n{'2' * 64}  agents/b.py\n".encode()
    message = refusal(lambda: Manifest.parse(data))
    assert message.startswith("MANIFEST line 2: "), message
    assert reason in message


def test_duplicates_and_binary_garbage_are_refused():
    twice = f"{'1' * 64}  agents/a.py\n{'2' * 64}  agents/a.py\n".encode()
    assert refusal(lambda: Manifest.parse(twice)) == "MANIFEST line 2: agents/a.py is listed twice"
    assert "not UTF-8" in refusal(lambda: Manifest.parse(b"\xff\xfe garbage"))
    assert Manifest.parse(b"").entries == {}


def test_a_file_name_a_manifest_cannot_hold_is_refused_at_signing(tmp_path):
    folder = make_folder(tmp_path)
    (folder / "agents" / "bad\nname.py").write_text("x = 1\n")
    with pytest.raises(InvalidArgument, match="control character"):
        sign_folder(folder, None)
    assert not (folder / MANIFEST_FILE).exists()
    (folder / "agents" / "bad\nname.py").rename(folder / "agents" / "ok.py")
    sign_folder(folder, None)
    (folder / "tools" / "bad\\name.py").write_text("x = 1\n")
    assert Verifier(folder).problems() == [
        "'tools/bad\\\\name.py': a file name with a control character or a backslash"
    ]


# --- the Verifier without signatures ---------------------------------------------------------


def test_development_without_manifest_allows_every_file_versioned_by_its_hash(tmp_path):
    folder = make_folder(tmp_path)
    verifier = Verifier(folder)
    assert verifier.check_file(folder / "agents/echo.py") == sha("class A: pass\n")
    assert verifier.problems() == []
    assert verifier.signed_by is None


def test_a_manifest_is_enforced_even_without_require_signature(tmp_path):
    folder = make_folder(tmp_path)
    sign_folder(folder, None)
    verifier = Verifier(folder)
    assert verifier.check_file(folder / "tools/add.py") == sha("def add(a, b): return a + b\n")
    assert verifier.problems() == []

    (folder / "agents/echo.py").write_text("class A: tampered = True\n")
    message = refusal(lambda: verifier.check_file(folder / "agents/echo.py"))
    assert message.startswith("agents/echo.py: sha256 ")
    assert f"does not match MANIFEST ({sha('class A: pass' + chr(10))[:12]}...)" in message

    (folder / "agents/new.py").write_text("class B: pass\n")
    assert refusal(lambda: verifier.check_file(folder / "agents/new.py")) == (
        "agents/new.py is not in MANIFEST"
    )
    (folder / "tools/add.py").unlink()
    assert verifier.problems() == [
        message,
        "agents/new.py is not in MANIFEST",
        "tools/add.py is in MANIFEST but missing",
    ]


def test_check_bytes_verifies_the_content_the_caller_read(tmp_path):
    folder = make_folder(tmp_path)
    sign_folder(folder, None)
    verifier = Verifier(folder)
    path = folder / "agents/echo.py"
    assert verifier.check_bytes(path, b"class A: pass\n") == sha("class A: pass\n")
    assert "does not match MANIFEST" in refusal(lambda: verifier.check_bytes(path, b"evil\n"))
    assert refusal(lambda: verifier.check_bytes(folder / "agents/new.py", b"x")) == (
        "agents/new.py is not in MANIFEST"
    )


def test_relative_and_symlinked_paths_name_the_same_file(tmp_path, monkeypatch):
    folder = make_folder(tmp_path / "real")
    sign_folder(folder, None)
    (tmp_path / "link").symlink_to(folder)
    monkeypatch.chdir(tmp_path)
    verifier = Verifier(Path("link"))
    digest = sha("class A: pass\n")
    assert verifier.check_file(Path("link/agents/echo.py")) == digest
    assert verifier.check_file(folder / "agents/echo.py") == digest
    assert "is not inside the plugin folder" in refusal(
        lambda: verifier.check_file(tmp_path / "elsewhere.py")
    )
    assert "is not inside the plugin folder" in refusal(
        lambda: verifier.check_file(Path("link/../x.py"))
    )


def test_a_model_folder_is_checked_whole(tmp_path):
    folder = make_folder(tmp_path)
    sign_folder(folder, None)
    verifier = Verifier(folder)
    version = verifier.check_folder(folder / "models/tiny")
    assert version == Verifier(folder).check_folder(folder / "models/tiny")  # deterministic
    (folder / "models/tiny/1/extra.bin").write_bytes(b"x")
    assert refusal(lambda: verifier.check_folder(folder / "models/tiny")) == (
        "models/tiny/1/extra.bin is not in MANIFEST"
    )
    (folder / "models/tiny/1/extra.bin").unlink()
    (folder / "models/tiny/1/model.onnx").unlink()
    assert refusal(lambda: verifier.check_folder(folder / "models/tiny")) == (
        "models/tiny/1/model.onnx is in MANIFEST but missing"
    )
    # without a manifest: a version that changes with any file
    (folder / MANIFEST_FILE).unlink()
    before = verifier.check_folder(folder / "models/tiny")
    (folder / "models/tiny/config.yaml").write_text("kind: tensor  # edited\n")
    assert verifier.check_folder(folder / "models/tiny") != before


def test_the_manifest_is_read_again_when_it_changes_in_either_order(tmp_path):
    """The race: the file written before its MANIFEST is refused, then accepted once the
    manifest catches up, even when the new MANIFEST has the same size and mtime."""
    folder = make_folder(tmp_path)
    sign_folder(folder, None)
    verifier = Verifier(folder)
    stat = (folder / MANIFEST_FILE).stat()
    target = folder / "agents/echo.py"
    target.write_text("class A: version = 2\n")
    refusal(lambda: verifier.check_file(target))
    sign_folder(folder, None)
    os.utime(folder / MANIFEST_FILE, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert (folder / MANIFEST_FILE).stat().st_size == stat.st_size
    assert verifier.check_file(target) == sha("class A: version = 2\n")
    # and the other order: a manifest naming content not yet written
    manifest = Manifest({**build_manifest(folder).entries, "agents/echo.py": sha("v3\n")})
    (folder / MANIFEST_FILE).write_bytes(manifest.to_bytes())
    refusal(lambda: verifier.check_file(target))
    target.write_text("v3\n")
    assert verifier.check_file(target) == sha("v3\n")


def test_a_broken_manifest_refuses_every_file_and_recovers(tmp_path):
    folder = make_folder(tmp_path)
    (folder / MANIFEST_FILE).write_text("garbage\n")
    verifier = Verifier(folder)
    message = refusal(lambda: verifier.check_file(folder / "agents/echo.py"))
    assert message == "MANIFEST line 1: not '<sha256 hex>  <path>': 'garbage'"
    assert verifier.problems() == [message]
    sign_folder(folder, None)
    assert verifier.check_file(folder / "agents/echo.py") == sha("class A: pass\n")


def test_unsigned_sign_removes_a_stale_signature(tmp_path):
    folder = make_folder(tmp_path)
    (folder / SIGNATURE_FILE).write_text("stale\n")
    _, removed = sign_folder(folder, None)
    assert removed and not (folder / SIGNATURE_FILE).exists()
    assert not [p for p in folder.iterdir() if p.name.endswith(".tmp")]


def test_plugin_refused_is_a_failed_precondition():
    assert issubclass(PluginRefused, FailedPrecondition)
    assert PluginRefused("agents/x.py is not in MANIFEST").message == (
        "agents/x.py is not in MANIFEST"
    )


def test_a_check_with_the_manifest_cached_is_fast(tmp_path):
    """A generous bound (the figure measured on a quiet machine is in docs/plugins.md)."""
    folder = make_folder(tmp_path)
    sign_folder(folder, None)
    verifier = Verifier(folder)
    verifier.check_file(folder / "agents/echo.py")
    started = time.perf_counter()
    for _ in range(100):
        verifier.check_file(folder / "agents/echo.py")
    assert (time.perf_counter() - started) / 100 < 0.01
