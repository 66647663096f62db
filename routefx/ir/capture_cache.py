"""torch.export's result kept for a model captured again unchanged.

Compiling one model several times (another policy, a plan, another backend; a benchmark's candidates; an
`inspect` before the compile) captured it each time, and torch.export is nearly all of a capture: 1.5-2 s for a
tiny model, 15-20 s for one with MLA attention on 2 cores, 4-7 s at the CPU benchmark's size. `capture` now keeps
the ExportedProgram per model (weakly: the cache never keeps a model alive) and exports again only when something
it can see differs:

- the inputs: names, positional/keyword split, each tensor's shape, dtype, device and layout (never its values:
  torch.export traces with fake tensors), every other input's value;
- the model: its submodules (name, object, class), every parameter and buffer (object, storage, version counter
  (in-place writes), shape, dtype, device), every attribute of every submodule (numbers, strings, tensors as above,
  functions by identity, hooks, and objects such as a config by their attributes, four levels deep), the global
  module hooks, torch's default dtype.

A value it cannot compare (an object with neither attributes nor a known type at the depth limit, an inference
tensor, which has no version counter) makes the model's key differ from every other, so the model is exported
each time. What it does not see: a module-level function or a class's method patched between two captures of the
same model object, which changes the model's code, not its state; `clear()` (`routefx.clear_capture_cache()`)
drops every kept export.
"""
from __future__ import annotations

import collections
import functools
import types
import weakref
from typing import Any

import torch
from torch import nn

__all__ = ["lookup", "store", "clear", "model_key"]

_PER_MODEL = 16     # input forms (and generation steps) kept per model: a bounded LRU
_DEPTH = 4
_ATOMS = (type(None), bool, int, float, complex, str, bytes, torch.dtype, torch.device, torch.layout,
          torch.memory_format, type, types.FunctionType, types.BuiltinFunctionType)


class _Never:
    """A key part equal to nothing else: its value cannot be compared between two captures."""
    __slots__ = ()

    def __eq__(self, other):
        return False

    def __hash__(self):
        return 0


def _tensor_key(t: torch.Tensor) -> tuple:
    try:
        version = t._version
    except RuntimeError:        # an inference tensor: in-place writes are not counted
        return (_Never(),)
    try:
        ptr = t.data_ptr()
    except RuntimeError:        # a fake, sparse or meta tensor: its object and version counter stand for it
        ptr = 0
    return ("tensor", id(t), ptr, version, tuple(t.shape), t.dtype, t.device, t.layout, t.requires_grad)


def _value_key(v: Any, memo: dict, depth: int):
    if isinstance(v, _ATOMS) or v is Ellipsis:
        return v          # functions compare by identity
    if isinstance(v, types.MethodType):     # by identity too; not holding its object (a module: kept alive)
        return ("method", id(v.__func__), id(v.__self__))
    if isinstance(v, torch.Tensor):
        return _tensor_key(v)
    if isinstance(v, nn.Module):
        return ("module", id(v))     # submodules are keyed themselves
    if isinstance(v, torch.SymInt | torch.SymFloat | torch.SymBool):
        return (_Never(),)
    if isinstance(v, (tuple, list)):
        return (type(v), tuple(_value_key(x, memo, depth) for x in v))
    if isinstance(v, dict):
        return (type(v), tuple((_value_key(k, memo, depth), _value_key(x, memo, depth)) for k, x in v.items()))
    if isinstance(v, (set, frozenset)):
        return (type(v), frozenset(_value_key(x, memo, depth) for x in v))
    if isinstance(v, functools.partial):
        return (functools.partial, _value_key(v.func, memo, depth), _value_key(v.args, memo, depth),
                _value_key(v.keywords, memo, depth))
    attrs = getattr(v, "__dict__", None)
    if attrs is None or depth <= 0:
        return (_Never(),)
    seen = memo.get((id(v), depth))
    if seen is None:
        memo[(id(v), depth)] = (_Never(),)     # a cycle back to an object being keyed compares unequal
        seen = memo[(id(v), depth)] = (type(v), id(v), _value_key(dict(attrs), memo, depth - 1))
    return seen


def model_key(model: nn.Module) -> tuple:
    """What a capture of `model` depends on besides its code and inputs (see the module docstring)."""
    from torch.nn.modules import module as _m
    memo: dict = {}
    mods = tuple((name, id(m), type(m), _value_key(dict(vars(m)), memo, _DEPTH))
                 for name, m in model.named_modules(remove_duplicate=False))
    tensors = tuple((name, _tensor_key(t)) for name, t in (*model.named_parameters(remove_duplicate=False),
                                                            *model.named_buffers(remove_duplicate=False)))
    hooks = tuple(_value_key(getattr(_m, h, None), memo, 1) for h in (
        "_global_forward_hooks", "_global_forward_pre_hooks", "_global_backward_hooks",
        "_global_module_registration_hooks", "_global_parameter_registration_hooks",
        "_global_buffer_registration_hooks"))
    return mods, tensors, hooks, torch.get_default_dtype()


def inputs_key(values: dict, n_args: int, bound: dict) -> tuple:
    """The inputs' form: names and order, tensors by shape/dtype/device/layout, other values as they are."""
    memo: dict = {}

    def one(v):
        if isinstance(v, torch.Tensor):
            return ("tensor", tuple(v.shape), v.dtype, v.device, v.layout, v.requires_grad)
        if isinstance(v, (tuple, list)):
            return (type(v), tuple(one(x) for x in v))
        if isinstance(v, dict):
            return (type(v), tuple((k, one(x)) for k, x in v.items()))
        return _value_key(v, memo, 2)
    return tuple((n, one(v)) for n, v in values.items()), n_args, one(bound)


_cache: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()   # model -> (model key, OrderedDict)


def lookup(model: nn.Module, state: tuple, form: tuple):
    """The kept value for (`model` in `state`, inputs `form`), or None."""
    try:
        kept_state, entries = _cache.get(model, (None, None))
    except TypeError:          # a model that cannot be weakly referenced
        return None
    if entries is None or kept_state != state:
        return None
    hit = entries.get(form)
    if hit is not None:
        entries.move_to_end(form)
    return hit


def store(model: nn.Module, state: tuple, form: tuple, value) -> None:
    try:
        kept_state, entries = _cache.get(model, (None, None))
    except TypeError:
        return
    if entries is None or kept_state != state:
        entries = collections.OrderedDict()
        try:
            _cache[model] = (state, entries)
        except TypeError:
            return
    entries[form] = value
    while len(entries) > _PER_MODEL:
        entries.popitem(last=False)


def clear() -> None:
    """Forget every kept export."""
    _cache.clear()
