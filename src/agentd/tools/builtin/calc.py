"""``calc``: arithmetic on an expression, parsed with :mod:`ast` and never evaluated."""

import ast
import math
import operator
from collections.abc import Callable

_MAX_EXPRESSION = 1000
_MAX_EXPONENT = 10_000
_MAX_INT_BITS = 4096

_BINARY: dict[type[ast.operator], Callable[[float, float], float]] = {
    ast.Add: operator.add,
    ast.Sub: operator.sub,
    ast.Mult: operator.mul,
    ast.Div: operator.truediv,
    ast.FloorDiv: operator.floordiv,
    ast.Mod: operator.mod,
    ast.Pow: operator.pow,
}
_UNARY: dict[type[ast.unaryop], Callable[[float], float]] = {
    ast.UAdd: operator.pos,
    ast.USub: operator.neg,
}
_FUNCTIONS: dict[str, Callable[..., float]] = {
    "abs": abs,
    "round": round,
    "min": min,
    "max": max,
    "sqrt": math.sqrt,
    "exp": math.exp,
    "log": math.log,
    "log2": math.log2,
    "log10": math.log10,
    "sin": math.sin,
    "cos": math.cos,
    "tan": math.tan,
    "floor": math.floor,
    "ceil": math.ceil,
}
_CONSTANTS = {"pi": math.pi, "e": math.e, "tau": math.tau}


def calc(expression: str) -> float:
    """Evaluate an arithmetic expression: numbers, + - * / // % **, parentheses, the
    constants pi, e and tau, and abs, round, min, max, sqrt, exp, log, log2, log10, sin, cos,
    tan, floor and ceil. Integer arithmetic stays exact; / gives a float."""
    if not isinstance(expression, str):
        raise TypeError("expression must be a string")
    if len(expression) > _MAX_EXPRESSION:
        raise ValueError(f"expression is longer than {_MAX_EXPRESSION} characters")
    try:
        tree = ast.parse(expression.strip(), mode="eval")
    except SyntaxError as exc:
        raise ValueError(f"not an arithmetic expression: {exc.msg}") from None
    return _eval(tree.body)


def _eval(node: ast.AST) -> float:
    if isinstance(node, ast.Constant):
        if isinstance(node.value, bool) or not isinstance(node.value, (int, float)):
            raise ValueError(f"unsupported constant {node.value!r}")
        return node.value
    if isinstance(node, ast.Name):
        if node.id not in _CONSTANTS:
            raise ValueError(f"unknown name {node.id!r}")
        return _CONSTANTS[node.id]
    if isinstance(node, ast.UnaryOp) and type(node.op) in _UNARY:
        return _UNARY[type(node.op)](_eval(node.operand))
    if isinstance(node, ast.BinOp) and type(node.op) in _BINARY:
        left, right = _eval(node.left), _eval(node.right)
        if isinstance(node.op, ast.Pow):
            _check_power(left, right)
        value = _BINARY[type(node.op)](left, right)
        if isinstance(value, int) and value.bit_length() > _MAX_INT_BITS:
            raise ValueError(f"result has more than {_MAX_INT_BITS} bits")
        if isinstance(value, complex):
            raise ValueError("result is a complex number")
        return value
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and not node.keywords:
        function = _FUNCTIONS.get(node.func.id)
        if function is None:
            raise ValueError(f"unknown function {node.func.id!r}")
        return function(*(_eval(arg) for arg in node.args))
    raise ValueError(f"unsupported syntax: {type(node).__name__}")


def _check_power(base: float, exponent: float) -> None:
    # Refuse before computing: 9**9**9 would take the whole CPU budget.
    if abs(exponent) > _MAX_EXPONENT:
        raise ValueError(f"exponent {exponent} is larger than {_MAX_EXPONENT}")
    if (
        isinstance(base, int)
        and isinstance(exponent, int)
        and base.bit_length() * exponent > _MAX_INT_BITS
    ):
        raise ValueError(f"result has more than {_MAX_INT_BITS} bits")
