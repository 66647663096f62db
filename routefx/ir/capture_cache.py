"""torch.export's result kept for a model captured again, or a model built the same way.

Compiling a model several times (another policy, a plan, another backend; a benchmark's candidates; a model
rebuilt or reloaded with other weights) captured it each time, and torch.export is nearly all of a capture: 1.5-2 s
for a tiny model, 15-20 s for one with MLA attention on 2 cores, 4-7 s at the CPU benchmark's size. An export
depends on the model's code, structure and non-tensor state, and on its tensors' shapes, dtypes and devices, not on
their values (torch.export traces with fake tensors; parameters, buffers and tensor attributes are the graph's
inputs). So the ExportedProgram is kept, with the model's own tensors replaced by meta stand-ins (the cache holds
no weights and no model), and a later capture whose key is equal gets a fresh graph from it with its own model's
tensors bound by name (`exported`). The key is:

- the inputs: names, positional/keyword split, each tensor's shape, dtype, device and layout (not its values),
  every other input's value; the sizes of the batch and length dims that capture exports as dynamic are left out
  (a graph exported at 2 x 12 serves 3 x 20 where its guards hold): a kept export is reused for inputs of other
  such sizes only where the caller's check of its graph against them holds (`holds`: the sizes export made
  constants and its guards, e.g. a chunked scan's `S <= 64`), else exported again for them;
- the model: every submodule's name and class; every parameter and buffer by name (Parameter or buffer, shape,
  dtype, device, layout, requires_grad, and which names share one tensor); every attribute of every submodule:
  numbers, strings, tensors held directly (as parameters), functions by identity, hooks, objects such as a config
  by their attributes (four levels deep), tensors inside containers or objects by identity and version counter;
  each submodule class's own methods (through decorators) and the global names their code reads, by identity
  (`LlamaMLP.forward = patched`, or `modeling_llama.apply_rotary_pos_emb = patched`, exports again); the global
  module hooks; torch's default dtype.

A value it cannot compare (an object with neither attributes nor a known type, or one past the depth limit; an
inference tensor inside a container) leaves that capture without a key: nothing is kept or reused for it. What
it does not see: code reached further away (a helper patched in place that a helper calls; an entry of a registry
dict such as transformers' attention functions replaced); `clear()` (`routefx.clear_capture_cache()`) drops every
kept export.
"""
from __future__ import annotations

import collections
import functools
import types
from typing import Any, Callable

import torch
from torch import nn

from routefx.ir import guards

__all__ = ["exported", "inputs_key", "model_key", "owned_tensors", "clear"]

_KEPT = 64          # keys kept (a bounded LRU over every model)
_PER_KEY = 4        # exports kept per key (a model whose code fixes its length: one per length)
_DEPTH = 4
_ATOMS = (type(None), bool, int, float, complex, str, bytes, torch.dtype, torch.device, torch.layout,
          torch.memory_format, type, types.FunctionType, types.BuiltinFunctionType)


def _form(t: torch.Tensor) -> tuple:
    return (type(t), tuple(t.shape), t.dtype, t.device, t.layout, t.requires_grad)


def _by_identity(t: torch.Tensor) -> tuple | None:
    try:
        version = t._version
    except RuntimeError:        # an inference tensor: in-place writes are not counted
        return None
    return ("tensor", id(t), version, _form(t))


_KEYING = object()


class _Keyer:
    def __init__(self, model: nn.Module):
        self.memo: dict = {}
        self.names = {id(m): n for n, m in model.named_modules(remove_duplicate=False)}
        self.comparable = True
        self.classes: dict[type, tuple] = {}

    def never(self) -> None:
        self.comparable = False          # the key is None: nothing kept or looked up

    def value(self, v: Any, depth: int):
        if isinstance(v, _ATOMS) or v is Ellipsis:
            return v                                  # functions compare by identity
        if isinstance(v, torch.Tensor):               # inside a container or an object: this very tensor
            return _by_identity(v) or self.never()
        if isinstance(v, nn.Module):                  # keyed itself, by name; one from outside the model: never
            return ("module", self.names[id(v)]) if id(v) in self.names else self.never()
        if isinstance(v, types.MethodType):
            return ("method", v.__func__, self.value(v.__self__, depth))
        if isinstance(v, (tuple, list)):
            return (type(v), tuple(self.value(x, depth) for x in v))
        if isinstance(v, dict):
            return (type(v), tuple((self.value(k, depth), self.value(x, depth)) for k, x in v.items()))
        if isinstance(v, (set, frozenset)):
            return (type(v), frozenset(self.value(x, depth) for x in v))
        if isinstance(v, functools.partial):
            return (functools.partial, self.value(v.func, depth), self.value(v.args, depth),
                    self.value(v.keywords, depth))
        if isinstance(v, torch.SymInt | torch.SymFloat | torch.SymBool):
            return self.never()
        attrs = getattr(v, "__dict__", None)
        if attrs is None or depth <= 0:
            return self.never()
        seen = self.memo.get((id(v), depth))
        if seen is _KEYING:             # reached again while being keyed: a cycle
            return self.never()
        if seen is None:
            self.memo[(id(v), depth)] = _KEYING
            seen = self.memo[(id(v), depth)] = (type(v), self.value(dict(attrs), depth - 1))
        return seen

    def module(self, m: nn.Module) -> tuple:
        own = {k: v for k, v in vars(m).items() if k not in ("_parameters", "_buffers", "_modules")}
        # a tensor held directly is one of the model's named tensors: keyed with them (`model_key`)
        attrs = tuple((k, ("tensor attribute",) if isinstance(v, torch.Tensor) else self.value(v, _DEPTH))
                      for k, v in own.items())
        cls = type(m)
        if cls not in self.classes:                   # once per class (every layer has the same ones)
            self.classes[cls] = _class_key(cls)
        return cls, self.classes[cls], attrs, tuple(m._non_persistent_buffers_set)


def _held(v):
    """Code objects (functions, classes, modules) held in the key, so that a replaced one's id is never reused
    by its replacement; anything else (it may be a model: not kept alive) by id."""
    return v if isinstance(v, (types.FunctionType, types.BuiltinFunctionType, types.ModuleType, type,
                                functools.partial)) else ("id", id(v))


def _code_key(f) -> tuple:
    """A function by identity, with the current values of the global names its code reads (a helper such as
    `apply_rotary_pos_emb` replaced in its module): by identity, one level deep."""
    parts = []
    while f is not None and len(parts) < 8:          # through decorators to the function they wrap
        code, names = getattr(f, "__code__", None), getattr(f, "__globals__", None)
        parts.append((f, () if code is None or names is None else
                      tuple((n, _held(names[n])) for n in code.co_names if n in names)))
        f = getattr(f, "__wrapped__", None)
    return tuple(parts)


def _class_key(cls: type) -> tuple:
    """The class's own attributes up to nn.Module: methods by identity and the globals their code reads, other
    values as atoms or by identity (`LlamaMLP.forward = patched` between two captures exports again)."""
    parts = []
    for klass in cls.__mro__:
        if klass is nn.Module or klass is object:
            break
        for k, v in vars(klass).items():
            if isinstance(v, (staticmethod, classmethod)):
                v = v.__func__
            if isinstance(v, property):
                v = v.fget
            if isinstance(v, types.FunctionType):
                parts.append((klass.__qualname__, k, _code_key(v)))
            elif isinstance(v, _ATOMS):
                parts.append((klass.__qualname__, k, v))
            elif not k.startswith("__"):
                parts.append((klass.__qualname__, k, _held(v)))
    return tuple(parts)


def owned_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every tensor the model holds by name: parameters, buffers, and tensors held directly as attributes."""
    out = {}
    for prefix, m in model.named_modules(remove_duplicate=False):
        dot = f"{prefix}." if prefix else ""
        for k, v in (*m._parameters.items(), *m._buffers.items(), *vars(m).items()):
            if isinstance(v, torch.Tensor):
                out.setdefault(dot + k, v)
    return out


def model_key(model: nn.Module, owned: dict[str, torch.Tensor]) -> tuple | None:
    """What a capture of `model` (whose named tensors are `owned`) depends on besides its code and inputs (see the
    module docstring); None where some of it cannot be compared."""
    from torch.nn.modules import module as _m
    keyer = _Keyer(model)
    mods = tuple((name, keyer.module(m)) for name, m in model.named_modules(remove_duplicate=False))
    first: dict[int, str] = {}
    tensors = tuple((name, _form(t), first.setdefault(id(t), name)) for name, t in owned.items())
    hooks = tuple(keyer.value(getattr(_m, h, None), 1) for h in (
        "_global_forward_hooks", "_global_forward_pre_hooks", "_global_backward_hooks",
        "_global_module_registration_hooks", "_global_parameter_registration_hooks",
        "_global_buffer_registration_hooks"))
    return (mods, tensors, hooks, torch.get_default_dtype()) if keyer.comparable else None


def inputs_key(values: dict, n_args: int = 0, dynamic: dict | None = None) -> tuple | None:
    """The inputs' form: names and order, tensors by shape/dtype/device/layout, other values as they are; None
    where some of it cannot be compared. `dynamic` (input name -> dims, or None) names the dims exported as
    dynamic: their sizes are not part of the key (a kept export is checked against the inputs' sizes instead:
    `exported`'s `holds`)."""
    keyer = _Keyer(nn.Module())
    dynamic = dynamic or {}

    def one(v, dims=()):
        if isinstance(v, torch.Tensor):
            shape = tuple("dynamic" if i in dims else d for i, d in enumerate(v.shape))
            return ("tensor", shape, v.dtype, v.device, v.layout, v.requires_grad)
        if isinstance(v, (tuple, list)):
            return (type(v), tuple(one(x) for x in v))
        if isinstance(v, dict):
            return (type(v), tuple((k, one(x)) for k, x in v.items()))
        return keyer.value(v, 2)
    key = tuple((n, one(v, dynamic.get(n) or ())) for n, v in values.items()), n_args
    return key if keyer.comparable else None


_kept: collections.OrderedDict = collections.OrderedDict()   # key -> [(ExportedProgram with stand-ins, extra,
#                                                                     names), ...]


def exported(model: nn.Module, form: tuple, export: Callable[[], tuple[Any, Any]],
             holds: Callable[[torch.fx.GraphModule], bool] | None = None
             ) -> tuple[torch.fx.GraphModule, Any, bool]:
    """A fresh graph of `model` for inputs of `form` (`inputs_key` and the caller's own parts): from a kept export
    where the key is equal, every named tensor binds and `holds(graph)` (the kept graph serves these inputs: the
    key leaves out the sizes of dynamic dims), else from `export()` -> (ExportedProgram, extra), whose result is
    kept for later (in place of one that did not hold). Returns (graph, extra, whether a kept export was
    reused)."""
    owned = owned_tensors(model)
    state = model_key(model, owned)
    key = None if state is None or any(f is None for f in form) else (state, *form)
    try:
        hash(key)
    except TypeError:        # a part that cannot be hashed: nothing kept or looked up
        key = None
    for i, (ep, extra, names) in enumerate(_kept.get(key, ()) if key is not None else ()):
        if not all(name in owned for name in names):
            continue
        gm = _bind(guards.module(ep), names, owned)
        if holds is None or holds(gm):
            _kept.move_to_end(key)
            _kept[key].insert(0, _kept[key].pop(i))
            return gm, extra, True
    ep, extra = export()
    gm = guards.module(ep)
    if key is not None:
        _keep(key, ep, extra, owned)
    return gm, extra, False


def _keep(key: tuple, ep, extra, owned: dict[str, torch.Tensor]) -> None:
    """Keep `ep` (its graph already made) for `key`, the model's tensors replaced by meta stand-ins. Not kept where
    the export holds a tensor of the model that is not one of its named tensors (a later model's own could not be
    bound), or where a stand-in cannot be made."""
    named = {}
    owned_ids = {id(t) for t in owned.values()}
    for where in (ep.state_dict, ep.constants):
        for name, t in where.items():
            if owned.get(name) is t:
                named[name] = where
            elif where is ep.state_dict or id(t) in owned_ids:
                return
    try:
        for name, where in named.items():
            t = where[name]
            stand_in = torch.empty_like(t, device="meta")
            where[name] = nn.Parameter(stand_in, requires_grad=t.requires_grad) if isinstance(t, nn.Parameter) \
                else stand_in
    except (RuntimeError, NotImplementedError):       # a tensor with no meta form
        return
    kept = _kept.setdefault(key, [])     # exports of one key: for sizes another did not serve (most recent first)
    kept.insert(0, (ep, extra, tuple(named)))
    del kept[_PER_KEY:]
    _kept.move_to_end(key)
    while len(_kept) > _KEPT:
        _kept.popitem(last=False)


def _bind(gm: torch.fx.GraphModule, names: tuple, owned: dict[str, torch.Tensor]) -> torch.fx.GraphModule:
    """`gm` (from a kept export) with the capturing model's own tensors for `names`."""
    for name in names:
        prefix, _, leaf = name.rpartition(".")
        parent = gm.get_submodule(prefix) if prefix else gm
        slot = parent._parameters if leaf in parent._parameters else \
            parent._buffers if leaf in parent._buffers else None
        if slot is None:
            setattr(parent, leaf, owned[name])
        else:
            slot[leaf] = owned[name]
    return gm


def clear() -> None:
    """Forget every kept export."""
    _kept.clear()
