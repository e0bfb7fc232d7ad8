"""Which Python files make up the tool components, and the content hashes that name builds.

Each origin gets a component of its own: the built-in tools together (they are ours), and
each plugin tool file alone. Tool code shares an interpreter with everything in its
component, and Python cannot keep one module from rewriting another; separate components
(separate WebAssembly memories) can, so one tool file can never reach another's functions.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

__all__ = [
    "BUILTIN_DIR",
    "BUILTIN_PACKAGE",
    "GUEST_APP",
    "PLUGIN_PACKAGE",
    "WIT_DIR",
    "ToolSource",
    "ToolUnit",
    "collect_sources",
    "collect_units",
    "plugin_unit",
    "sources_digest",
]

_HERE = Path(__file__).parent
BUILTIN_DIR = _HERE / "builtin"
WIT_DIR = _HERE / "wit"
GUEST_APP = _HERE / "guest" / "agentd_guest.py"
# Staged package names inside the component: tool files never shadow standard modules.
BUILTIN_PACKAGE = "agentd_builtin_tools"
PLUGIN_PACKAGE = "agentd_plugin_tools"
# Bumped when the build layout changes in a way the inputs below do not show.
_FORMAT = "agentd-tools-2"


@dataclass(frozen=True, slots=True)
class ToolSource:
    """One tool file: the module name it gets in the component, where it came from, its text."""

    module: str
    file: str
    text: bytes


def _module_name(stem: str) -> str:
    name = re.sub(r"\W", "_", stem)
    return f"_{name}" if name[:1].isdigit() else name


def _collect(directory: Path, package: str, label: str) -> list[ToolSource]:
    if not directory.is_dir():
        return []
    return [
        ToolSource(
            f"{package}.{_module_name(path.stem)}", f"{label}/{path.name}", path.read_bytes()
        )
        for path in sorted(directory.glob("*.py"))
        if not path.name.startswith("_")
    ]


def collect_sources(plugin_tools: Path | None) -> list[ToolSource]:
    """The built-in tools, then ``plugin_tools/*.py`` (files starting with ``_`` skipped)."""
    sources = _collect(BUILTIN_DIR, BUILTIN_PACKAGE, "builtin")
    if plugin_tools is not None:
        sources += _collect(plugin_tools, PLUGIN_PACKAGE, "tools")
    return sources


@dataclass(frozen=True, slots=True)
class ToolUnit:
    """The sources of one component: ``origin`` is ``builtin`` or ``tools/NAME.py``."""

    origin: str
    sources: tuple[ToolSource, ...]

    @property
    def digest(self) -> str:
        return sources_digest(list(self.sources))


def collect_units(plugin_tools: Path | None) -> list[ToolUnit]:
    """The built-in tools as one unit, then one unit per plugin tool file (sorted)."""
    builtin = _collect(BUILTIN_DIR, BUILTIN_PACKAGE, "builtin")
    units = [ToolUnit("builtin", tuple(builtin))] if builtin else []
    if plugin_tools is not None:
        units += [
            ToolUnit(source.file, (source,))
            for source in _collect(plugin_tools, PLUGIN_PACKAGE, "tools")
        ]
    return units


def plugin_unit(file_name: str, text: bytes) -> ToolUnit:
    """The unit of the plugin tool file ``file_name`` (a name in ``plugins/tools``) with
    content ``text``: what :func:`collect_units` makes of that file (live reload builds the
    bytes it verified, not a second read)."""
    source = ToolSource(
        f"{PLUGIN_PACKAGE}.{_module_name(Path(file_name).stem)}", f"tools/{file_name}", text
    )
    return ToolUnit(source.file, (source,))


def _version(name: str) -> str:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return "none"


def sources_digest(sources: list[ToolSource]) -> str:
    """A hash of everything that changes the compiled artefact: tool files, the guest app,
    the WIT world, and the versions of componentize-py and wasmtime."""
    h = hashlib.sha256()

    def part(data: bytes) -> None:
        h.update(len(data).to_bytes(8, "little"))
        h.update(data)

    part(_FORMAT.encode())
    part(_version("componentize-py").encode())
    part(_version("wasmtime").encode())
    part(GUEST_APP.read_bytes())
    for wit in sorted(WIT_DIR.glob("*.wit")):
        part(wit.read_bytes())
    for source in sources:
        part(source.module.encode())
        part(source.text)
    return h.hexdigest()[:32]
