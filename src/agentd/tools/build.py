"""``agentd tools build``: tool files → WebAssembly components → precompiled artefacts.

One component per origin (``source.collect_units``): the built-in tools, and each plugin
tool file on its own, so tool files cannot reach each other. Each is cached by its content
hash under a cache folder, one sub-folder per hash holding ``component.cwasm`` (native code
from wasmtime, loaded with ``mmap`` in milliseconds) and ``manifest.json`` (its tool list,
load errors, timings). Unchanged units cost nothing; changing one file rebuilds only its
component. Concurrent builders of the same hash wait on a file lock; a finished artefact
appears by an atomic rename, so a reader never sees half of one.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from agentd.tools.errors import ToolBuildError
from agentd.tools.schema import spec_problem
from agentd.tools.source import (
    GUEST_APP,
    WIT_DIR,
    ToolSource,
    ToolUnit,
    collect_units,
)
from agentd.tools.types import LoadError, ToolSpec

__all__ = [
    "BuildResult",
    "CacheDirError",
    "ComponentArtefact",
    "ToolArtefact",
    "build_tools",
    "build_unit",
    "find_artefact",
]

COMPONENT_FILE = "component.cwasm"
MANIFEST_FILE = "manifest.json"
_WORLD = "tools"
_APP_MODULE = GUEST_APP.stem
_INDEX_MODULE = "agentd_tool_index"
_KEEP = 24  # artefacts kept beyond those just built or found, by last use (~40 MB each)
_COMPONENTIZE = (
    "import sys; from componentize_py import script; "
    "sys.argv[0] = 'componentize-py'; sys.exit(script())"
)
# Variables that would make componentize-py mount host folders into the build.
_HOST_PATHS = ("VIRTUAL_ENV", "PYTHONPATH", "PYTHONHOME", "PIPENV_ACTIVE")

Progress = Callable[[str], None]


@dataclass(frozen=True, slots=True)
class ComponentArtefact:
    """One built, precompiled component (the built-in tools, or one tool file)."""

    directory: Path
    digest: str
    origin: str
    tools: list[ToolSpec]
    load_errors: list[LoadError]
    manifest: dict[str, Any] = field(repr=False)

    @property
    def component_path(self) -> Path:
        return self.directory / COMPONENT_FILE

    @property
    def failed(self) -> bool:
        """The file broke its own build (no component; the reason is its load error)."""
        return "error" in self.manifest


@dataclass(frozen=True, slots=True)
class ToolArtefact:
    """What a node serves: a component per origin and their tools merged by name.

    A name defined by two origins is served by the first (built-ins, then plugin files in
    name order); the later definition is listed in ``load_errors``.
    """

    components: tuple[ComponentArtefact, ...]
    tools: list[ToolSpec]
    load_errors: list[LoadError]
    owners: dict[str, int] = field(repr=False)  # tool name -> index into components

    @property
    def digest(self) -> str:
        joined = ",".join(component.digest for component in self.components)
        return hashlib.sha256(joined.encode()).hexdigest()[:32]

    def owner(self, name: str) -> ComponentArtefact | None:
        index = self.owners.get(name)
        return None if index is None else self.components[index]

    def to_json(self) -> dict[str, Any]:
        return {
            "digest": self.digest,
            "tools": [tool.to_json() for tool in self.tools],
            "load_errors": [{"file": e.file, "message": e.message} for e in self.load_errors],
            "components": [
                {**component.manifest, "path": str(component.directory)}
                for component in self.components
            ],
        }


@dataclass(frozen=True, slots=True)
class BuildResult:
    artefact: ToolArtefact
    built: bool  # False: every component was found in the cache
    seconds: float
    num_built: int = 0


def load_artefact(directory: Path) -> ComponentArtefact | None:
    """The component artefact in ``directory``, or None if there is no complete one."""
    try:
        manifest = json.loads((directory / MANIFEST_FILE).read_text(encoding="utf-8"))
        if "error" not in manifest and not (directory / COMPONENT_FILE).is_file():
            return None
        return ComponentArtefact(
            directory,
            manifest["digest"],
            manifest["origin"],
            [ToolSpec(t["name"], t["description"], t["parameters"]) for t in manifest["tools"]],
            [LoadError(e["file"], e["message"]) for e in manifest["load_errors"]],
            manifest,
        )
    except (OSError, ValueError, KeyError, TypeError):
        return None  # missing, half-written or from an older layout: build it again


def merge_components(components: list[ComponentArtefact]) -> ToolArtefact:
    """Merge the components' tool lists; a name already taken is a load error of the later."""
    tools: list[ToolSpec] = []
    errors: list[LoadError] = []
    owners: dict[str, int] = {}
    for index, component in enumerate(components):
        errors.extend(component.load_errors)
        for spec in component.tools:
            # A file can tamper with its own guest, so what it reported is checked here.
            if (problem := spec_problem(spec)) is not None:
                errors.append(LoadError(component.origin, f"{problem}; skipped"))
                continue
            if spec.name in owners:
                first = components[owners[spec.name]].origin
                message = f"tool {spec.name!r} is already defined in {first}; skipped"
                errors.append(LoadError(component.origin, message))
                continue
            owners[spec.name] = index
            tools.append(spec)
    return ToolArtefact(tuple(components), tools, errors, owners)


def find_artefact(cache_dir: Path, plugin_tools: Path | None) -> ToolArtefact | None:
    """The cached artefact for the current built-in and plugin tool files, if all built."""
    components = []
    for unit in collect_units(plugin_tools):
        found = load_artefact(cache_dir / unit.digest)
        if found is None:
            return None
        components.append(found)
    _mark_used(components)
    return merge_components(components)


def build_tools(
    cache_dir: Path,
    plugin_tools: Path | None,
    *,
    progress: Progress | None = None,
    force: bool = False,
    timeout_s: float = 900.0,
) -> BuildResult:
    """Build (or find) the components for the built-in tools and ``plugin_tools/*.py``.

    Builds run two at a time (each is one busy core). Raises ToolBuildError when
    componentize-py or the compiler fails. Tool files that fail to import do not fail the
    build: they are listed in the artefact's ``load_errors``.
    """
    say = progress or (lambda _line: None)
    started = time.perf_counter()
    units = collect_units(plugin_tools)
    found: dict[str, ComponentArtefact] = {}
    if not force:
        for unit in units:
            if (cached := load_artefact(cache_dir / unit.digest)) is not None:
                found[unit.digest] = cached
    missing = [unit for unit in units if unit.digest not in found]
    _mark_used(list(found.values()))
    if missing:
        _prepare_cache_dir(cache_dir)
        say(f"building {len(missing)} of {len(units)} tool components")
        workers = max(1, min(len(missing), 2, os.cpu_count() or 1))
        with ThreadPoolExecutor(workers, thread_name_prefix="agentd-tools-build") as pool:
            futures = [
                pool.submit(_build_unit, cache_dir, unit, force, say, timeout_s) for unit in missing
            ]
            for future in futures:  # the first failure is raised; the others finish first
                built = future.result()
                found[built.digest] = built
        _prune(cache_dir, keep={unit.digest for unit in units})
    artefact = merge_components([found[unit.digest] for unit in units])
    seconds = time.perf_counter() - started
    if missing:
        say(f"built {len(missing)} components, {len(artefact.tools)} tools in {seconds:.1f} s")
    return BuildResult(artefact, bool(missing), seconds, len(missing))


def build_unit(
    cache_dir: Path,
    unit: ToolUnit,
    *,
    keep: Iterable[str] = (),
    progress: Progress | None = None,
    timeout_s: float = 900.0,
) -> ComponentArtefact:
    """Build (or find) the component of one ``unit`` (live reload of one tool file). A file
    that breaks its own build gives a component marked ``failed``; raises ToolBuildError
    when the tool chain fails. Old artefacts are pruned as by :func:`build_tools`, keeping
    those named in ``keep`` (the node serves them)."""
    if (cached := load_artefact(cache_dir / unit.digest)) is not None:
        _mark_used([cached])
        return cached
    _prepare_cache_dir(cache_dir)
    built = _build_unit(cache_dir, unit, False, progress or (lambda _line: None), timeout_s)
    _prune(cache_dir, keep={*keep, unit.digest})
    return built


def _build_unit(
    cache_dir: Path, unit: ToolUnit, force: bool, say: Progress, timeout_s: float
) -> ComponentArtefact:
    digest = unit.digest
    final = cache_dir / digest
    with _locked(cache_dir / f".{digest}.lock"):
        if not force and (found := load_artefact(final)) is not None:
            return found  # built meanwhile by another process
        work = Path(tempfile.mkdtemp(prefix=f".build-{digest}-", dir=cache_dir))
        try:
            artefact_dir = work / "artefact"
            artefact_dir.mkdir()
            try:
                _check_syntax(unit)
                _build_into(artefact_dir, work, unit, digest, say, timeout_s)
            except _ToolCodeFailed as exc:
                if unit.origin == "builtin":
                    raise  # ours: a defect to report, not a file to skip
                say(f"{unit.origin}: not loaded: {exc.message}")
                if not exc.cacheable:
                    return _failed_unit(artefact_dir, unit, digest, exc.message)
                _failed_unit(artefact_dir, unit, digest, exc.message)
            if final.exists():
                shutil.rmtree(final)
            artefact_dir.rename(final)
        finally:
            shutil.rmtree(work, ignore_errors=True)
    artefact = load_artefact(final)
    if artefact is None:
        raise ToolBuildError(f"the artefact in {final} vanished after the build")
    return artefact


class _ToolCodeFailed(ToolBuildError):
    """componentize-py failed on what a tool file's import did (not on the environment)."""

    def __init__(self, message: str, *, cacheable: bool = True) -> None:
        super().__init__(message)
        self.cacheable = cacheable  # False: a time-out, which a quieter machine may not hit


def _check_syntax(unit: ToolUnit) -> None:
    """A file that is not valid Python fails here, in milliseconds, not after a 10-25 s
    componentize-py run that would only find the same error in the guest."""
    for source in unit.sources:
        try:
            compile(source.text, source.file, "exec", dont_inherit=True)
        except SyntaxError as exc:  # (ValueError: NUL bytes; the guest reports those)
            raise _ToolCodeFailed(f"SyntaxError: {exc.msg} (line {exc.lineno})") from None


def _failed_unit(out: Path, unit: ToolUnit, digest: str, message: str) -> ComponentArtefact:
    """Record a file that broke its own build: listed as not loaded, the others served."""
    manifest = {
        "digest": digest,
        "origin": unit.origin,
        "built_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "files": [s.file for s in unit.sources],
        "tools": [],
        "load_errors": [{"file": unit.origin, "message": message}],
        "error": message,
    }
    (out / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
    artefact = load_artefact(out)
    assert artefact is not None
    return artefact


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
    out: Path, work: Path, unit: ToolUnit, digest: str, say: Progress, timeout_s: float
) -> dict[str, Any]:
    from agentd.tools.sandbox import WasmSandbox, compile_component
    from agentd.tools.types import ToolLimits

    timings: dict[str, float] = {}
    stage = work / "stage"
    _stage(stage, unit.sources)

    say(f"{unit.origin}: compiling Python into a WebAssembly component (componentize-py)")
    t = time.perf_counter()
    wasm_path = work / "tools.wasm"
    _componentize(stage, wasm_path, timeout_s)
    timings["componentize_s"] = time.perf_counter() - t

    say(f"{unit.origin}: precompiling the component to native code (wasmtime)")
    t = time.perf_counter()
    wasm = wasm_path.read_bytes()
    try:
        native = compile_component(wasm)
    except Exception as exc:  # wasmtime reports compile failures as its own error type
        raise ToolBuildError(f"wasmtime could not compile the component: {exc}") from exc
    (out / COMPONENT_FILE).write_bytes(native)
    timings["precompile_s"] = time.perf_counter() - t

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
        "origin": unit.origin,
        "built_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "files": [s.file for s in unit.sources],
        "tools": [tool.to_json() for tool in tools],
        "load_errors": [{"file": e.file, "message": e.message} for e in load_errors],
        "component_bytes": len(wasm),
        "artefact_bytes": len(native),
        "timings": {k: round(v, 3) for k, v in timings.items()},
        "versions": {name: metadata.version(name) for name in ("componentize-py", "wasmtime")},
    }
    (out / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
    return manifest


def _stage(stage: Path, sources: tuple[ToolSource, ...]) -> None:
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


def _host_python() -> str:
    """This environment's interpreter (the one with componentize-py). Not always
    ``sys.executable``: in the node Envoy hosts (pyvoy's embedded Python) that is the first
    ``python3`` on PATH, which may belong to another environment."""
    prefix = Path(sys.prefix)
    if sys.executable and Path(sys.executable).is_relative_to(prefix):
        return sys.executable
    major, minor = sys.version_info[:2]
    for name in (f"python{major}.{minor}", f"python{major}", "python"):
        candidate = prefix / "bin" / name
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return str(candidate)
    return sys.executable


def _componentize(stage: Path, out: Path, timeout_s: float) -> None:
    """Run componentize-py on ``stage``, letting tool code reach no host folder but its own.

    componentize-py runs the app (and so every tool file's top level) in wasmtime with each
    ``-p`` folder and a site-packages folder mounted read-write. The site-packages folder is
    ``$VIRTUAL_ENV/lib/**/site-packages``, else that of ``pipenv --venv``, else those of the
    first ``python3`` on PATH: a real one would let a tool file drop a ``.pth`` that runs in
    every later host Python. So VIRTUAL_ENV names an empty scratch folder inside the build's
    own work folder (deleted afterwards), and ``stage`` is itself a throwaway copy.
    """
    scratch = stage.parent / "scratch-env"
    (scratch / "lib" / "site-packages").mkdir(parents=True)
    env = {k: v for k, v in os.environ.items() if k not in _HOST_PATHS}
    env["VIRTUAL_ENV"] = str(scratch)
    command = [
        _host_python(),
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
        raise _ToolCodeFailed(
            f"the build did not finish within {timeout_s:g} s (does the file loop at import?)",
            cacheable=False,
        ) from None
    if done.returncode != 0 or not out.is_file():
        # componentize-py reports the cause first, then a long Rust backtrace.
        detail = (done.stderr or done.stdout).split("Stack backtrace:")[0].strip()
        if "No module named 'componentize_py'" in detail:
            raise ToolBuildError("componentize-py is not installed (pip install componentize-py)")
        if "Traceback" not in detail:  # not the guest's Python failing: the tool chain's
            raise ToolBuildError(f"componentize-py failed:\n{detail[-3000:]}")
        # The guest loads each file under a catch-all, so this file broke the interpreter
        # itself (its import machinery, builtins): the last lines say how.
        last = " ".join(detail.replace("Caused by:", "").split()[-40:])
        raise _ToolCodeFailed(f"the file broke the build's interpreter: ... {last}")


@contextmanager
def _locked(path: Path) -> Iterator[None]:
    with open(path, "a+b") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _mark_used(components: list[ComponentArtefact]) -> None:
    """Touch the manifests: pruning keeps the most recently used artefacts, so the
    components another plugin folder (or server) uses are not removed by this build."""
    for component in components:
        with contextlib.suppress(OSError):
            os.utime(component.directory / MANIFEST_FILE)


def _prune(cache_dir: Path, keep: set[str]) -> None:
    """Remove all but the ``_KEEP`` most recently used artefacts not in ``keep`` (a running
    server keeps its mapping of a removed one)."""
    built = sorted(
        (p for p in cache_dir.iterdir() if (p / MANIFEST_FILE).is_file() and p.name not in keep),
        key=lambda p: (p / MANIFEST_FILE).stat().st_mtime,
        reverse=True,
    )
    for old in built[_KEEP:]:
        shutil.rmtree(old, ignore_errors=True)
        (cache_dir / f".{old.name}.lock").unlink(missing_ok=True)
