"""The input sizes an exported graph holds for, checked by the runtime without torch.

A model's code may branch on a length (Doge attends to the top `keep_window_size` keys only once a sequence is
longer; a chunked scan pads to its chunk), and torch.export keeps the branch it traced with guards on the inputs'
sizes (`routefx.ir.guards`). In process, routefx captures again for inputs outside them; an artifact has one graph,
so the manifest lists its guards as torch.export writes them (Python over `L['name'].size()[dim]` and the
baked-in values of non-tensor inputs, e.g. `L['attention_mask'].size()[1] > 6`) and the runtime refuses inputs
outside them (`InputError`) instead of running the other branch's numbers.

Only a small expression language is evaluated (integers, sizes, + - * // %, comparisons, and/or/not, min, max,
abs); the exporter refuses a graph whose guards use anything else (`check_supported`), so an artifact never holds
a guard its runtime would skip.
"""
from __future__ import annotations

import ast
import operator

from routefx.errors import InputError

__all__ = ["SizeGuards", "check_supported", "Arithmetic"]

_BIN = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.FloorDiv: operator.floordiv,
        ast.Mod: operator.mod}
_CMP = {ast.Eq: operator.eq, ast.NotEq: operator.ne, ast.Lt: operator.lt, ast.LtE: operator.le, ast.Gt: operator.gt,
        ast.GtE: operator.ge}
_CALLS = {"min": min, "max": max, "abs": abs}


class _Unsupported(ValueError):
    pass


def _input(node) -> str:
    """`L['name']` -> name."""
    if (isinstance(node, ast.Subscript) and isinstance(node.value, ast.Name) and node.value.id == "L"
            and isinstance(node.slice, ast.Constant) and isinstance(node.slice.value, str)):
        return node.slice.value
    raise _Unsupported(ast.unparse(node))


class Arithmetic:
    """How `_eval` computes: on Python integers and booleans here; the AOTInductor exporter passes one that
    builds the same guard from tensor ops, so a package checks it at run time (`routefx.compiler.export_aoti`)."""

    def size(self, value, dim: int):
        return value.shape[dim]

    def binop(self, op: type, a, b):
        return _BIN[op](a, b)

    def not_(self, a):
        return not a

    def all_(self, values):        # values: an iterator, consumed lazily
        return all(values)

    def any_(self, values):
        return any(values)

    def call(self, name: str, args: list):
        return _CALLS[name](*args)


_PYTHON = Arithmetic()


def _eval(node, env: dict, ar: Arithmetic = _PYTHON):
    def ev(n):
        return _eval(n, env, ar)

    if isinstance(node, ast.Expression):
        return ev(node.body)
    if isinstance(node, ast.Constant) and isinstance(node.value, (int, float, bool, str)):
        return node.value
    if isinstance(node, ast.Subscript) and isinstance(node.value, ast.Call):   # L['x'].size()[d]
        call = node.value
        if (isinstance(call.func, ast.Attribute) and call.func.attr == "size" and not call.args
                and isinstance(node.slice, ast.Constant) and isinstance(node.slice.value, int)):
            return ar.size(env[_input(call.func.value)], node.slice.value)
        raise _Unsupported(ast.unparse(node))
    if isinstance(node, ast.Subscript):                                           # L['flag']: a baked-in value
        return env[_input(node)]
    if isinstance(node, ast.BinOp) and type(node.op) in _BIN:
        return ar.binop(type(node.op), ev(node.left), ev(node.right))
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.Not)):
        v = ev(node.operand)
        return -v if isinstance(node.op, ast.USub) else ar.not_(v)
    if isinstance(node, ast.Compare) and all(type(o) in _CMP for o in node.ops):
        def links():                                                              # a < b <= c: a < b and b <= c
            left = ev(node.left)
            for op, right_node in zip(node.ops, node.comparators):
                right = ev(right_node)
                yield _CMP[type(op)](left, right)
                left = right
        return ar.all_(links())
    if isinstance(node, ast.BoolOp):
        values = (ev(v) for v in node.values)
        return ar.all_(values) if isinstance(node.op, ast.And) else ar.any_(values)
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in _CALLS \
            and not node.keywords:
        return ar.call(node.func.id, [ev(a) for a in node.args])
    raise _Unsupported(ast.unparse(node))


class _Shape:
    """Stands in for an input in `check_supported`: every size 2."""
    shape = (2,) * 16


def check_supported(guards: list[str], inputs: list[str], constants: dict) -> str | None:
    """None if the runtime evaluates every guard over these inputs (names) and baked-in values; else the first
    guard it cannot, with what it cannot read."""
    env = {**{n: _Shape() for n in inputs}, **constants}
    for g in guards:
        try:
            _eval(ast.parse(g, mode="eval"), env)
        except _Unsupported as e:
            return f"{g} (cannot evaluate {e})"
        except (KeyError, SyntaxError, TypeError, ZeroDivisionError) as e:
            return f"{g} ({type(e).__name__}: {e})"
    return None


class SizeGuards:
    """An artifact graph's guards, parsed once; `failed(env)` per call."""

    def __init__(self, guards: list[str] | None):
        self._parsed = [(g, ast.parse(g, mode="eval")) for g in guards or ()]

    def failed(self, env: dict) -> str | None:
        """The first guard that does not hold for `env` (input name -> array, or a baked-in value), or None."""
        for src, tree in self._parsed:
            if not _eval(tree, env):
                return src
        return None

    def require(self, env: dict, graph: str, instead: str) -> None:
        """Raise InputError naming the guard `env` fails, the inputs' shapes and what to do `instead`."""
        if (failed := self.failed(env)) is not None:
            shapes = {k: list(v.shape) for k, v in env.items() if hasattr(v, "shape")}
            raise InputError(f"the artifact's {graph} holds for input sizes where {failed} (torch.export's guard: the "
                             f"model's code branches on a size there); these inputs have shapes {shapes}. {instead}")
