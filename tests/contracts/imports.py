"""Read the imports of agentd's source files (statically, from their syntax trees)."""

from __future__ import annotations

import ast
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

SRC = Path(__file__).resolve().parents[2] / "src"


@dataclass(frozen=True)
class Import:
    module: str  # the importing module, e.g. "agentd.runtime.host"
    target: str  # what it imports, absolute, e.g. "agentd.errors" or "onnxruntime"
    line: int

    def where(self) -> str:
        return f"{self.module}:{self.line} imports {self.target}"


def module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def source_files(package: str) -> Iterator[Path]:
    yield from sorted((SRC / package).rglob("*.py"))


def imports_of(path: Path) -> Iterator[Import]:
    """Every import statement in the file: top level, in functions and under
    TYPE_CHECKING alike (a layer rule holds for type-only imports too)."""
    module = module_name(path)
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    tree = ast.parse(path.read_bytes(), filename=str(path))
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield Import(module, alias.name, node.lineno)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                if node.level > 1:
                    base = base[: -(node.level - 1)]
                prefix = ".".join(base)
                target = f"{prefix}.{node.module}" if node.module else prefix
            else:
                target = node.module or ""
            # "from agentd import runtime" imports the subpackage: name it.
            for alias in node.names:
                yield Import(module, f"{target}.{alias.name}", node.lineno)


def within(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")
