"""``__all__`` drift: the public API changes only on purpose, and every ``__all__`` is true."""

from __future__ import annotations

import importlib

import pytest

from tests.contracts.public_api import PUBLIC, SNAPSHOT, every_all, snapshot_lines

ALLS = every_all()


def test_public_api_matches_its_snapshot() -> None:
    recorded = SNAPSHOT.read_text().split()
    current = snapshot_lines()
    added = sorted(set(current) - set(recorded))
    removed = sorted(set(recorded) - set(current))
    assert (added, removed) == ([], []), (
        "the public API changed; if on purpose, run `python -m tests.contracts.public_api` "
        "and commit tests/contracts/public_api.txt"
    )


@pytest.mark.parametrize("module", sorted(ALLS))
def test_every_name_in_all_is_defined(module: str) -> None:
    names, defined = ALLS[module]
    assert sorted(set(names) - defined) == []
    assert len(names) == len(set(names)), "duplicates in __all__"


@pytest.mark.parametrize("module", PUBLIC)
def test_public_names_import(module: str) -> None:
    # The static reading above, checked against the real import once per package.
    imported = importlib.import_module(module)
    missing = [name for name in imported.__all__ if not hasattr(imported, name)]
    assert missing == []


def test_the_snapshot_is_not_empty() -> None:
    assert len(SNAPSHOT.read_text().split()) > 50
