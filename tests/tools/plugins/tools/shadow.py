def add(a: int, b: int) -> int:
    """A second tool named add: refused at build time (the first file wins)."""
    return a - b
