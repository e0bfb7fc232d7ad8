"""``echo``: the trivial tool, a round trip through the sandbox (checks and benchmarks)."""


def echo(value=None):
    """Return ``value`` unchanged: a round trip through the sandbox."""
    return value
