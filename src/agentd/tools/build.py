"""``agentd tools build``: tool files → WebAssembly component → precompiled artefact.

Artefacts are cached by content hash (``source.sources_digest``) under a cache folder,
one sub-folder per hash holding ``component.cwasm`` (native code from wasmtime, loaded
with ``mmap`` in milliseconds) and ``manifest.json`` (the tool list, load errors, timings).
A build of unchanged files finds its folder and does nothing. Concurrent builders of the
same hash wait on a file lock; a finished artefact appears by an atomic rename, so a reader
never sees half of one.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from agentd.tools.errors import ToolBuildError
from agentd.tools.source import (
    GUEST_APP,
    WIT_DIR,
    ToolSource,
    collect_sources,
    sources_digest,
)
from agentd.tools.types import LoadError, ToolSpec

__all__ = [
    "BuildResult",
    "CacheDirError",
    "ToolArtefact",
    "build_tools",
    "find_artefact",
]

COMPONENT_FILE = "component.cwasm"
MANIFEST_FILE = "manifest.json"
_WORLD = "tools"
_APP_MODULE = GUEST_APP.stem
_INDEX_MODULE = "agentd_tool_index"
_KEEP = 8  # artefacts kept in a cache folder; older ones are removed after a build
_COMPONENTIZE = (
    "import sys; from componentize_py import script; "
    "sys.argv[0] = 'componentize-py'; sys.exit(script())"
)
# Variables that would make componentize-py bundle the host's packages into the component.
_HOST_PATHS = ("VIRTUAL_ENV", "PYTHONPATH", "PYTHONHOME", "PIPENV_ACTIVE")

Progress = Callable[[str], None]


@dataclass(frozen=True, slots=True)
class ToolArtefact:
    """A built, precompiled tool component and what it contains."""

    directory: Path
    digest: str
    tools: list[ToolSpec]
    load_errors: list[LoadError]
    manifest: dict[str, Any] = field(repr=False)

    @property
    def component_path(self) -> Path:
        return self.directory / COMPONENT_FILE


@dataclass(frozen=True, slots=True)
class BuildResult:
    artefact: ToolArtefact
    built: bool  # False: found in the cache
    seconds: float


def load_artefact(directory: Path) -> ToolArtefact | None:
    """The artefact in ``directory``, or None if there is no complete one."""
    try:
        manifest = json.loads((directory / MANIFEST_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not (directory / COMPONENT_FILE).is_file():
        return None
    return ToolArtefact(
        directory,
        manifest["digest"],
        [ToolSpec(t["name"], t["description"], t["parameters"]) for t in manifest["tools"]],
        [LoadError(e["file"], e["message"]) for e in manifest["load_errors"]],
        manifest,
    )


def find_artefact(cache_dir: Path, plugin_tools: Path | None) -> ToolArtefact | None:
    """The cached artefact for the current built-in and plugin tool files, if built."""
    return load_artefact(cache_dir / sources_digest(collect_sources(plugin_tools)))


def build_tools(
    cache_dir: Path,
    plugin_tools: Path | None,
    *,
    progress: Progress | None = None,
    force: bool = False,
    timeout_s: float = 900.0,
) -> BuildResult:
    """Build (or find) the artefact for the built-in tools plus ``plugin_tools/*.py``.

    Raises ToolBuildError when componentize-py or the compiler fails. Tool files that fail
    to import do not fail the build: they are listed in the artefact's ``load_errors``.
    """
    say = progress or (lambda _line: None)
    started = time.perf_counter()
    sources = collect_sources(plugin_tools)
    digest = sources_digest(sources)
    final = cache_dir / digest
    if not force and (found := load_artefact(final)) is not None:
        return BuildResult(found, False, time.perf_counter() - started)
    _prepare_cache_dir(cache_dir)
    with _locked(cache_dir / f".{digest}.lock"):
        if not force and (found := load_artefact(final)) is not None:
            return BuildResult(found, False, time.perf_counter() - started)  # built meanwhile
        work = Path(tempfile.mkdtemp(prefix=f".build-{digest}-", dir=cache_dir))
        try:
            artefact_dir = work / "artefact"
            artefact_dir.mkdir()
            manifest = _build_into(artefact_dir, work, sources, digest, say, timeout_s)
            if final.exists():
                shutil.rmtree(final)
            artefact_dir.rename(final)
        finally:
            shutil.rmtree(work, ignore_errors=True)
    _prune(cache_dir, keep=final)
    artefact = load_artefact(final)
    if artefact is None:
        raise ToolBuildError(f"the artefact in {final} vanished after the build")
    say(f"built {len(manifest['tools'])} tools in {time.perf_counter() - started:.1f} s")
    return BuildResult(artefact, True, time.perf_counter() - started)


class CacheDirError(ToolBuildError):
    """The cache folder cannot be created or written to (a setting to fix, not a build)."""


def _prepare_cache_dir(cache_dir: Path) -> None:
    """Create the cache folder; a path that cannot be one is a CacheDirError naming it."""
    if cache_dir.exists() and not cache_dir.is_dir():
        raise CacheDirError(f"tools cache directory {cache_dir} exists and is not a directory")
    try:
        cache_dir.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=cache_dir):
            pass
    except OSError as exc:
        raise CacheDirError(
            f"cannot use {cache_dir} as the tools cache directory: {exc.strerror or exc}"
        ) from None


def _build_into(
    out: Path, work: Path, sources: list[ToolSource], digest: str, say: Progress, timeout_s: float
) -> dict[str, Any]:
    from agentd.tools.sandbox import WasmSandbox, compile_component
    from agentd.tools.types import ToolLimits

    timings: dict[str, float] = {}
    say(f"staging {len(sources)} tool files")
    stage = work / "stage"
    _stage(stage, sources)

    say("compiling Python into a WebAssembly component (componentize-py, the slow step)")
    t = time.perf_counter()
    wasm_path = work / "tools.wasm"
    _componentize(stage, wasm_path, timeout_s)
    timings["componentize_s"] = time.perf_counter() - t

    say("precompiling the component to native code (wasmtime)")
    t = time.perf_counter()
    wasm = wasm_path.read_bytes()
    try:
        native = compile_component(wasm)
    except Exception as exc:  # wasmtime reports compile failures as its own error type
        raise ToolBuildError(f"wasmtime could not compile the component: {exc}") from exc
    (out / COMPONENT_FILE).write_bytes(native)
    timings["precompile_s"] = time.perf_counter() - t

    say("reading the tool list from the component")
    t = time.perf_counter()
    sandbox = WasmSandbox(out / COMPONENT_FILE, ToolLimits())
    try:
        tools, load_errors = sandbox.inspect()
    finally:
        sandbox.close()
    timings["inspect_s"] = time.perf_counter() - t

    from importlib import metadata

    manifest = {
        "digest": digest,
        "built_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "files": [s.file for s in sources],
        "tools": [tool.to_json() for tool in tools],
        "load_errors": [{"file": e.file, "message": e.message} for e in load_errors],
        "component_bytes": len(wasm),
        "artefact_bytes": len(native),
        "timings": {k: round(v, 3) for k, v in timings.items()},
        "versions": {name: metadata.version(name) for name in ("componentize-py", "wasmtime")},
    }
    (out / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
    return manifest


def _stage(stage: Path, sources: list[ToolSource]) -> None:
    """Lay out the guest app, one package per origin, and the index the app imports."""
    stage.mkdir()
    shutil.copyfile(GUEST_APP, stage / GUEST_APP.name)
    modules = []
    for source in sources:
        package, module = source.module.split(".", 1)
        (stage / package).mkdir(exist_ok=True)
        (stage / package / "__init__.py").touch()
        (stage / package / f"{module}.py").write_bytes(source.text)
        modules.append((source.module, source.file))
    (stage / f"{_INDEX_MODULE}.py").write_text(
        f"# Generated by agentd tools build.\nMODULES = {modules!r}\n", encoding="utf-8"
    )


def _componentize(stage: Path, out: Path, timeout_s: float) -> None:
    env = {k: v for k, v in os.environ.items() if k not in _HOST_PATHS}
    command = [
        sys.executable,
        "-c",
        _COMPONENTIZE,
        "-d",
        str(WIT_DIR),
        "-w",
        _WORLD,
        "componentize",
        "-p",
        str(stage),
        _APP_MODULE,
        "-o",
        str(out),
    ]
    try:
        done = subprocess.run(
            command, cwd=stage, env=env, capture_output=True, text=True, timeout=timeout_s
        )
    except subprocess.TimeoutExpired:
        raise ToolBuildError(f"componentize-py did not finish within {timeout_s:g} s") from None
    if done.returncode != 0 or not out.is_file():
        # componentize-py reports the cause first, then a long Rust backtrace.
        detail = (done.stderr or done.stdout).split("Stack backtrace:")[0].strip()[-3000:]
        if "No module named 'componentize_py'" in detail:
            detail = "componentize-py is not installed (pip install componentize-py)"
        raise ToolBuildError(f"componentize-py failed:\n{detail}")


@contextmanager
def _locked(path: Path) -> Iterator[None]:
    with open(path, "a+b") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _prune(cache_dir: Path, keep: Path) -> None:
    """Remove all but the newest ``_KEEP`` artefacts (a running server keeps its mapping)."""
    built = sorted(
        (p for p in cache_dir.iterdir() if (p / MANIFEST_FILE).is_file() and p != keep),
        key=lambda p: (p / MANIFEST_FILE).stat().st_mtime,
        reverse=True,
    )
    for old in built[_KEEP - 1 :]:
        shutil.rmtree(old, ignore_errors=True)
        (cache_dir / f".{old.name}.lock").unlink(missing_ok=True)
