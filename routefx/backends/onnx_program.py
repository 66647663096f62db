"""The rewritten graph as an ONNX model without tracing it again.

routefx already holds an ATen-level `fx.GraphModule` with fake values (symbolic batch and sequence dims) on every
node: the graph torch.export captured, rewritten by the passes. `torch.onnx.export(gm, ...)` would trace it twice
more (torch.export of `gm`, then `run_decompositions`: 70-80% of the export time on the 8-layer bench model).
Here instead:

1. `exported_program(gm)` lifts the graph into a `torch.export.ExportedProgram` by hand: every tensor `get_attr`
   becomes a parameter / buffer placeholder (in front of the user inputs, as in any ExportedProgram), constant
   inputs (use_cache=False) are dropped, only tensor outputs are kept. Nothing is traced.
2. `to_onnx(ep, ...)` translates it node by node with torch's ONNX exporter and its op registry (torchlib, at
   the requested opset) plus routefx's own lowerings, when every op of the graph has a registered ONNX
   implementation (the usual case: the captured graph is already functional ATen, and the exporter's
   decomposition would keep those ops). Otherwise, or if that translation fails, it falls back to the public
   `torch.onnx.export(ep, dynamo=True)`, which decomposes the program first (one re-trace) and translates it.

The direct translation uses three functions of `torch.onnx._internal.exporter` (`ONNXRegistry.from_torchlib`,
`insert_type_promotion_nodes`, `_exported_program_to_onnx_program`), present with the same signatures in torch
2.11 and 2.13; any change there (an ImportError, a TypeError) lands on the public path, so only speed depends
on them. `to_onnx` returns which path ran.
"""
from __future__ import annotations

import contextlib
import copy
import functools
import logging
import re
import warnings
from typing import Callable

import onnxscript.version_converter
import torch
from torch import fx
from torch.export import ExportedProgram
from torch.export.exported_program import ModuleCallEntry, ModuleCallSignature
from torch.export.graph_signature import (ExportGraphSignature, InputKind, InputSpec, OutputKind, OutputSpec,
                                          TensorArgument)
from torch.utils import _pytree as pytree

from routefx.errors import BackendError
from routefx.ir.graph_utils import fake_mode

__all__ = ["exported_program", "to_onnx", "DIRECT", "DECOMPOSED", "export_context", "describe_export_error", "first_line"]

DIRECT = "direct"          # translated as captured, no trace
DECOMPOSED = "decomposed"  # torch.onnx.export(ep): run_decompositions (one re-trace), then translated
_GUARDS = "_guards_fn"  # ep.module()'s input-guard check (a call_module with no users): not part of the model


_aten = torch.ops.aten


def _to_copy(x, *rest, dtype=None, **_):
    """aten.to.{dtype, device, dtype_layout}(x, ...) as the functional aten._to_copy(x, dtype=...): the device,
    layout, copy and memory-format arguments mean nothing in ONNX."""
    if rest and isinstance(rest[0], torch.dtype):
        dtype = rest[0]  # to.dtype(x, dtype, ...)
    elif len(rest) > 1 and isinstance(rest[1], torch.dtype):
        dtype = rest[1]  # to.device(x, device, dtype, ...)
    return _aten._to_copy.default, (x,), ({"dtype": dtype} if dtype is not None else {})


# Overloads that torch.export keeps but the ONNX registry does not implement -> (target, args, kwargs) of the
# core op they alias. Any other unimplemented op sends the program through the exporter's decomposition.
_ALIASES = {
    _aten.to.dtype: _to_copy,
    _aten.to.device: _to_copy,
    _aten.to.dtype_layout: _to_copy,
    _aten.__and__.Tensor: lambda a, b: (_aten.bitwise_and.Tensor, (a, b), {}),
    _aten.__or__.Tensor: lambda a, b: (_aten.bitwise_or.Tensor, (a, b), {}),
}


def _fake_mode(gm: fx.GraphModule):
    mode = fake_mode(gm)
    if mode is None:
        raise ValueError("the graph carries no fake values (meta['val']); it was not captured by torch.export")
    return mode


def exported_program(gm: fx.GraphModule, tensor_inputs: list[str]) -> ExportedProgram:
    """`gm` (placeholders named after the model's inputs, weights as get_attr) as an ExportedProgram whose user
    inputs are `tensor_inputs` (in that order) and whose outputs are `gm`'s tensor outputs, in order. The
    weights are shared with `gm`, not copied."""
    mode = _fake_mode(gm)
    params = dict(gm.named_parameters(remove_duplicate=False))
    buffers = dict(gm.named_buffers(remove_duplicate=False))
    graph = fx.Graph()
    env: dict[fx.Node, object] = {}
    input_specs, state_dict = [], {}
    lifted: dict[str, fx.Node] = {}
    for n in gm.graph.nodes:  # weights first: an ExportedProgram's placeholders are [params, buffers, user inputs]
        if n.op != "get_attr" or n.target in lifted:
            continue
        value = _attr(gm, n.target)
        if not isinstance(value, torch.Tensor):
            continue  # a submodule (a higher-order op's body): stays a get_attr
        p = graph.placeholder(("p_" if n.target in params else "b_") + n.target.replace(".", "_"))
        p.meta["val"] = mode.from_tensor(value, static_shapes=True)
        lifted[n.target] = p
        kind = InputKind.PARAMETER if n.target in params else InputKind.BUFFER
        input_specs.append(InputSpec(kind, TensorArgument(p.name), target=n.target,
                                     persistent=True if kind is InputKind.BUFFER else None))
        state_dict[n.target] = value if n.target in params or n.target in buffers else value.detach()
    user = {}
    for n in gm.graph.nodes:
        if n.op == "placeholder" and n.target in tensor_inputs:
            p = graph.placeholder(n.target)
            p.meta.update(n.meta)
            user[n.target] = p
            env[n] = p
    if [user[k].name for k in tensor_inputs] != list(tensor_inputs):
        raise ValueError(f"input names {tensor_inputs} collide with graph names")
    input_specs += [InputSpec(InputKind.USER_INPUT, TensorArgument(k), target=None) for k in tensor_inputs]
    guards = {n for n in gm.graph.nodes if n.op == "call_module" and n.target == _GUARDS and not n.users}
    outputs: list[fx.Node] = []
    for n in gm.graph.nodes:
        if n in guards:
            continue
        if n.op == "placeholder":
            if n not in env and set(n.users) - guards:
                raise ValueError(f"constant input {n.target!r} is used by the graph")
            continue
        if n.op == "call_module":
            raise ValueError(f"call_module node {n.name} ({n.target}): not a graph torch.export produces")
        if n.op == "get_attr" and n.target in lifted:
            env[n] = lifted[n.target]
            continue
        if n.op == "output":
            flat = n.args[0] if isinstance(n.args[0], (tuple, list)) else (n.args[0],)
            outputs = [env[a] for a in flat if isinstance(a, fx.Node)]
            continue
        env[n] = graph.node_copy(n, lambda a: env[a])
        if n.target in _ALIASES:  # a non-core alias: its core op, which the ONNX registry implements
            new = env[n]
            new.target, new.args, new.kwargs = _ALIASES[n.target](*new.args, **new.kwargs)
    graph.output(tuple(outputs))
    root = torch.nn.Module()
    for n in graph.nodes:  # submodules that stayed get_attr (higher-order op bodies)
        if n.op == "get_attr":
            _set_attr(root, n.target, _attr(gm, n.target))
    signature = ExportGraphSignature(
        input_specs=input_specs,
        output_specs=[OutputSpec(OutputKind.USER_OUTPUT, TensorArgument(o.name), target=None) for o in outputs])
    shape_env = mode.shape_env
    symbols = {s for k in tensor_inputs for d in user[k].meta["val"].shape if isinstance(d, torch.SymInt)
               for s in d.node.expr.free_symbols}
    ranges = {s: shape_env.var_to_range[s] for s in symbols} if shape_env is not None else {}
    in_spec = pytree.tree_structure(((), {k: 0 for k in tensor_inputs}))
    out_spec = pytree.tree_structure(tuple(0 for _ in outputs))
    call = ModuleCallEntry("", ModuleCallSignature(inputs=[TensorArgument(k) for k in tensor_inputs],
                                                   outputs=[TensorArgument(o.name) for o in outputs],
                                                   in_spec=in_spec, out_spec=out_spec))
    return ExportedProgram(root, graph, signature, state_dict, ranges, [call])


def to_onnx(gm: fx.GraphModule, tensor_inputs: list[str], *, opset: int | None, lowerings: Callable,
            allow_direct: bool = True):
    """(onnx_ir.Model, path) for `gm` with user inputs `tensor_inputs`, path DIRECT or DECOMPOSED (see the module
    docstring); not optimized. `lowerings(ep)` gives the exporter's custom_translation_table for the program
    (torch op -> ONNX translation function; routefx's lowerings name nodes after the program's fx nodes)."""
    with _no_pending_symbols_left(gm):
        if allow_direct:
            ep = exported_program(gm, tensor_inputs)
            model = _direct(ep, opset, lowerings(ep))
            if model is not None:
                return model, DIRECT
        ep = exported_program(gm, tensor_inputs)  # a fresh program: the direct attempt may have edited its graph
        program = torch.onnx.export(ep, (), dynamo=True, optimize=False, verbose=False, opset_version=opset,
                                    custom_translation_table=lowerings(ep))
        return program.model, DECOMPOSED


@contextlib.contextmanager
def _no_pending_symbols_left(gm: fx.GraphModule):
    """Leave the graph's ShapeEnv with the pending unbacked symbols it had: the exporter's re-trace of a graph with
    data-dependent sizes (`.item()`, split by counts) allocates unbacked symbols it never binds, and a graph made
    from the same capture later (capture reuse shares the ShapeEnv) fails its next fake propagation on them
    (PendingUnbackedSymbolNotFound)."""
    env = getattr(fake_mode(gm), "shape_env", None)
    pending = getattr(env, "pending_fresh_unbacked_symbols", None)
    before = list(pending) if isinstance(pending, list) else None
    try:
        yield
    finally:
        if before is not None:
            pending[:] = before


def _direct(ep: ExportedProgram, opset: int | None, lowerings: dict):
    """The exporter's translation of `ep` as it is, or None where that is unavailable or some op lacks an
    ONNX implementation (then the caller decomposes)."""
    try:
        from torch.onnx._internal.exporter import _constants, _core, _fx_passes
    except ImportError:
        return None
    target = opset or torch.onnx._constants.ONNX_DEFAULT_OPSET  # what torch.onnx.export does with None
    try:
        registry = _registry(max(target, _constants.TORCHLIB_OPSET))
        for op, fn in lowerings.items():
            registry.register_op(op, fn, is_complex=False)
        targets = {n.target for n in ep.graph.nodes if n.op == "call_function"}
        if any(isinstance(t, torch._ops.OpOverload) and not registry.is_registered(t) for t in targets):
            return None
        if any(not isinstance(t, torch._ops.OpOverload) and getattr(t, "__module__", None) != "_operator"
               and not registry.is_registered(t) for t in targets):
            return None  # higher-order ops and Python callables (but torch.sym_min & co., which the registry
            # translates): the exporter's decomposition handles them
        if _cast_promoted_tensors(ep.graph_module):  # the pass re-runs every node on fake tensors (2/3 of the export)
            _fx_passes.insert_type_promotion_nodes(ep.graph_module)
        with _format_once(ep.graph, set(lowerings)):
            model = _core._exported_program_to_onnx_program(ep, registry=registry).model
        if model.opset_imports.get("", target) != target:
            onnxscript.version_converter.convert_version(model, target)  # in place
        return model
    except Exception as e:  # noqa: BLE001 - any failure of the internal path: the public path decides
        if routefx_error(e) is not None:
            raise  # a routefx lowering said no (BackendError): the public path would say the same
        return None


@contextlib.contextmanager
def _format_once(graph: fx.Graph, targets: set):
    """While it runs, each node of `graph` calling one of `targets` (ops routefx lowers itself) returns its
    `format_node()` text from one evaluation. The exporter labels every ONNX node it emits with that text, and a
    routed FFN emits ~7 nodes per route while its text lists every range: O(R^2) per layer (Qwen3-MoE-shaped, 12
    layers x 128 experts: 23.7k evaluations, 8.2 of the export's 22.8 s under the profiler)."""
    nodes = []
    for n in graph.nodes:
        if n.op == "call_function" and n.target in targets:
            try:
                n.format_node = functools.partial(lambda text, *a, **k: text, n.format_node())
            except AttributeError:  # a torch whose fx nodes take no instance attributes: formatted per use
                break
            nodes.append(n)
    try:
        yield
    finally:
        for n in nodes:
            del n.format_node


def _promotions(gm: fx.GraphModule):
    """(node, position or keyword, argument, dtype) for every argument the exporter's type-promotion pass would
    cast: an op with an elementwise or reduction type-promotion rule whose argument (tensor, symbolic or Python
    number) has another dtype than the one the rule computes, read from the fake values the graph already carries
    (the pass itself re-runs every node on fake tensors to get them). Raises where it cannot tell."""
    from torch.onnx._internal.fx import type_utils
    from torch.onnx._internal.fx.passes import type_promotion as tp

    table = tp.TypePromotionTable()

    def val(a):
        return a.meta["val"] if isinstance(a, fx.Node) else a

    def differs(arg, dtype) -> bool:
        if dtype is None:
            return False
        if isinstance(arg, (tuple, list)):
            return any(differs(a, dtype) for a in arg)
        v = val(arg)
        if isinstance(v, torch.Tensor):
            return v.dtype != dtype
        same = type_utils.from_scalar_type_to_torch_dtype(type(v))
        if same is None:
            raise TypeError(f"argument of type {type(v).__name__}")
        return same != dtype

    aliases = {torch.ops.aten.max.other: torch.ops.aten.maximum, torch.ops.aten.min.other: torch.ops.aten.minimum}
    out = []
    for n in gm.graph.nodes:
        if n.op != "call_function":
            continue
        # max.other / min.other are maximum / minimum (routefx lowers them itself): the table has no entry for them
        rule = table.get_rule(aliases[n.target]) if n.target in aliases else tp.get_type_promotion_rule(n, table)
        if rule is None:
            continue
        info = rule.preview_type_promotion(fx.node.map_aggregate(n.args, val), fx.node.map_aggregate(n.kwargs, val))
        out += [(n, i, a, info.args_dtypes[i]) for i, a in enumerate(n.args) if differs(a, info.args_dtypes.get(i))]
        out += [(n, k, a, info.kwargs_dtypes[k]) for k, a in n.kwargs.items()
                if differs(a, info.kwargs_dtypes.get(k))]
    return out


def _cast_promoted_tensors(gm: fx.GraphModule) -> bool:
    """Insert, from the fake values the graph carries, the casts of tensor arguments the exporter's type-promotion
    pass would insert (a bool or int `cumsum` to int64: transformers' packed-sequence detection, in most Hugging
    Face graphs; int ids times a float tensor), so that the pass, which re-runs every node on fake tensors, is
    needed only for scalar promotions. Returns whether the pass is still needed (scalar promotions left, or the
    promotions could not be read: then nothing is inserted)."""
    try:
        found = _promotions(gm)
    except Exception:  # noqa: BLE001 - cannot tell: the exporter's pass decides
        return True
    tensors = [p for p in found if isinstance(p[2], fx.Node) and isinstance(p[2].meta.get("val"), torch.Tensor)]
    computed: dict[fx.Node, torch.dtype] = {}
    for n, where, a, dtype in tensors:
        with gm.graph.inserting_before(n):
            cast = gm.graph.call_function(torch.ops.aten._to_copy.default, (a,), {"dtype": dtype})
        cast.meta["val"] = a.meta["val"].to(dtype)   # a fake tensor's cast: a fake tensor, no run
        if isinstance(where, int):
            n.update_arg(where, cast)
        else:
            n.update_kwarg(where, cast)
        computed[n] = dtype
    for n, dtype in computed.items():
        # an op computed in another dtype than its result (an fp16 `square` or `sum`, which the rules compute in
        # float32): its result cast back, as the exporter's pass does, so that every user gets the graph's dtype
        out = n.meta.get("val")
        if isinstance(out, torch.Tensor) and out.dtype != dtype and out.is_floating_point() and dtype.is_floating_point:
            with gm.graph.inserting_after(n):
                back = gm.graph.call_function(torch.ops.aten._to_copy.default, (n,), {"dtype": out.dtype})
            back.meta["val"] = out
            n.replace_all_uses_with(back, delete_user_cb=lambda user: user is not back)
            n.meta["val"] = out.to(dtype)
    if tensors:
        gm.recompile()
    return len(tensors) < len(found)


def _promotion_needed(gm: fx.GraphModule) -> bool:
    """Whether the exporter's type-promotion pass would insert a cast anywhere in `gm` (`_promotions`); any doubt
    (an unknown value, a changed internal API) -> True."""
    try:
        return bool(_promotions(gm))
    except Exception:  # noqa: BLE001 - cannot tell: let the pass decide
        return True


def routefx_error(e: BaseException) -> BackendError | None:
    """The BackendError a routefx lowering raised somewhere in e's chain of causes, else None."""
    seen = []
    while e is not None and all(e is not c for c in seen):
        if isinstance(e, BackendError):
            return e
        seen.append(e)
        e = e.__cause__ or e.__context__
    return None


def _registry(opset: int):
    """A fresh copy of torchlib's registry at `opset` (building one takes seconds; a copy, milliseconds), so
    that routefx's lowerings registered on it do not pile up across exports."""
    base = _base_registry(opset)
    registry = copy.copy(base)
    registry.functions = {k: list(v) for k, v in base.functions.items()}
    return registry


@functools.lru_cache(maxsize=None)
def _base_registry(opset: int):
    from torch.onnx._internal.exporter import _registration
    return _registration.ONNXRegistry.from_torchlib(opset_version=opset)


def _attr(root: torch.nn.Module, target: str):
    obj = root
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


def _set_attr(root: torch.nn.Module, target: str, value) -> None:
    *path, last = target.split(".")
    obj = root
    for part in path:
        if not hasattr(obj, part):
            setattr(obj, part, torch.nn.Module())
        obj = getattr(obj, part)
    setattr(obj, last, value)


# ---- exporter messages -------------------------------------------------------------------------------------

@contextlib.contextmanager
def export_context():
    """Silence what the exporter says about every graph module: the training-mode warning (an ATen graph from
    torch.export is already functional; `ep.module()` refuses `.eval()`) and the torchvision registry notes."""
    loggers = [logging.getLogger(f"torch.onnx._internal.exporter.{m}") for m in ("_registration", "_core")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:  # "torchvision is not installed", "nn_module_stack not found for node ..."
        lg.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Exporting a model while it is in training mode")
            warnings.filterwarnings("ignore", message=r"`isinstance\(treespec, LeafSpec\)` is deprecated")
            yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


_NODE = re.compile(r"Error when translating node %(\S+) : .*?target=([^\]]+)\]")


def describe_export_error(e: BaseException) -> str:
    """'node %name (target): root cause' from the exporter's exception chain."""
    where, chain = None, []
    while e is not None and all(e is not c for c in chain):
        chain.append(e)
        m = _NODE.search(str(e))
        if m and where is None:
            target = m.group(2).removeprefix("torch.ops.")
            where = f"node %{m.group(1)} ({target})"
        e = e.__cause__ or e.__context__
    root = chain[-1]
    for c in chain:  # our own lowering errors are the most precise
        if isinstance(c, BackendError):
            root = c
            break
    cause = f"{type(root).__name__}: {first_line(root)}"
    return f"{where}: {cause}" if where else cause


def first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else ""
