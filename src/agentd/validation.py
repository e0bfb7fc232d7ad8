"""Turn pydantic validation errors into one line that names each bad field."""

from __future__ import annotations

from pydantic import ValidationError

__all__ = ["describe"]


def describe(exc: ValidationError) -> str:
    """``field.path: problem; ...`` for an error message a user can act on."""
    return "; ".join(f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors())
