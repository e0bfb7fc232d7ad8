"""Well-behaved test tools."""

_calls = 0


def echo(value):
    """Return the argument unchanged."""
    return value


def add(a: int, b: int = 1) -> int:
    """Add two integers."""
    return a + b


def count_calls() -> int:
    """How many calls this instance has seen (always 1: every call gets a fresh one)."""
    global _calls
    _calls += 1
    return _calls


def rand() -> float:
    import random

    return random.random()


def spin(iterations: int) -> int:
    """Busy work for a given number of loop iterations."""
    total = 0
    for i in range(iterations):
        total += i
    return total


def options(**settings) -> dict:
    return settings
