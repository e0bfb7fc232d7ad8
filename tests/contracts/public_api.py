"""The public API as declared by ``__all__``, read statically, and its recorded snapshot.

``python -m tests.contracts.public_api`` rewrites the snapshot (public_api.txt) after a
deliberate change; review its diff like any interface change.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

from tests.contracts.imports import SRC, module_name, source_files

SNAPSHOT = Path(__file__).with_name("public_api.txt")

# The packages users import from (README, docs): their __all__ is the contract.
PUBLIC = (
    "agentd",
    "agentd.agents",
    "agentd.errors",
    "agentd.testing",
    "agentd.node",
    "agentd.runtime",
    "agentd.inference",
    "agentd.generate",
    "agentd.tools",
    "agentd.settings",
)


def path_of(module: str) -> Path:
    base = SRC.joinpath(*module.split("."))
    package = base / "__init__.py"
    return package if package.exists() else base.with_suffix(".py")


def declared_all(tree: ast.Module) -> list[str] | None:
    for node in tree.body:
        targets = node.targets if isinstance(node, ast.Assign) else []
        if isinstance(node, ast.AnnAssign):
            targets = [node.target]
        if any(isinstance(t, ast.Name) and t.id == "__all__" for t in targets):
            value = ast.literal_eval(node.value)  # type: ignore[arg-type]
            return list(value)
    return None


def defined_names(tree: ast.Module) -> set[str]:
    """Names bound at module level (definitions, assignments, imports), including those
    bound inside top-level if/try blocks."""
    names: set[str] = set()

    def visit(body: list[ast.stmt]) -> None:
        for node in body:
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
                names.add(node.name)
            elif isinstance(node, ast.Assign):
                for target in node.targets:
                    names.update(n.id for n in ast.walk(target) if isinstance(n, ast.Name))
            elif isinstance(node, ast.AnnAssign | ast.AugAssign) and isinstance(
                node.target, ast.Name
            ):
                names.add(node.target.id)
            elif isinstance(node, ast.Import | ast.ImportFrom):
                for alias in node.names:
                    names.add((alias.asname or alias.name).split(".")[0])
            elif isinstance(node, ast.If | ast.Try):
                visit(node.body)
                visit(node.orelse)
                for handler in getattr(node, "handlers", []):
                    visit(handler.body)
                visit(getattr(node, "finalbody", []))

    visit(tree.body)
    return names


def snapshot_lines() -> list[str]:
    lines = []
    for module in PUBLIC:
        names = declared_all(ast.parse(path_of(module).read_bytes()))
        for name in sorted(names or []):
            lines.append(f"{module}.{name}")
    return lines


def every_all() -> dict[str, tuple[list[str], set[str]]]:
    """module -> (its __all__, the names it binds), for every module that has one."""
    found = {}
    for path in source_files("agentd"):
        tree = ast.parse(path.read_bytes())
        names = declared_all(tree)
        if names is not None:
            found[module_name(path)] = (names, defined_names(tree))
    return found


if __name__ == "__main__":
    SNAPSHOT.write_text("\n".join(snapshot_lines()) + "\n")
    print(f"wrote {SNAPSHOT} ({len(snapshot_lines())} names)", file=sys.stderr)
