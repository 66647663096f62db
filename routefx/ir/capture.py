"""Capture: an unmodified PyTorch model -> an ATen-level `torch.fx.GraphModule`.

`torch.export.export(..., strict=False)` with the batch and sequence dimensions dynamic. Hugging Face models run
with `use_cache=False`. Nodes keep `nn_module_stack` metadata, which routefx uses only to *name* what recognition
finds. The user's model is never modified: its training flag is restored and no parameter is touched.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import inspect as _inspect
import logging
import operator
from typing import Any

import torch
from torch import nn
from torch.export import Dim

from routefx.errors import CaptureError
from routefx.ir import capture_cache
from routefx.ir import graph_utils as gu
from routefx.ir.guards import serves
from routefx.ir.tracing import tracing

__all__ = ["capture", "CaptureInfo", "normalize_inputs"]


@dataclasses.dataclass(frozen=True)
class CaptureInfo:
    """How the captured graph is called: positional argument names in order, and the constant (non-tensor)
    keywords it was specialised to."""

    arg_names: tuple[str, ...]
    constant_kwargs: dict[str, Any]
    bound_kwargs: dict[str, Any] = dataclasses.field(default_factory=dict)  # constants given through **kwargs:
    #                                                   baked into the graph, which does not take them as inputs
    fixed_dims: dict[str, dict[int, int]] = dataclasses.field(default_factory=dict)  # input -> {dim: size}: batch /
    #   length dims captured as dynamic that the model's code made constants (e.g. `int(x.shape[1])`): the graph
    #   serves calls of those sizes only (CompiledModel compiles again for others)
    state_writes: list[str] = dataclasses.field(default_factory=list)  # buffers the forward writes in place (a KV
    #   cache in module state), read back within the graph (`_functional_buffer_writes`); not written to the model
    widened: tuple[bool, bool] = (False, False)   # (batch, length) of 1 exported at 2 (`capture`'s `widen`)
    reused_export: bool = False    # made from torch.export's result for an earlier capture of this model (or one
    #   built the same way) with inputs of this form (`capture_cache`), with this model's tensors: not exported again
    state_inputs: tuple[str, ...] = ()   # inputs carrying what earlier tokens left (a generation step's K/V cache
    #   and scan states): a branch that reads them mixes tokens (`recognize`)


def _is_hf(model: nn.Module) -> bool:
    try:
        from transformers import PreTrainedModel
    except ImportError:  # pragma: no cover - transformers is a dependency
        return False
    return isinstance(model, PreTrainedModel)


def normalize_inputs(model: nn.Module, args, kwargs) -> tuple[tuple, dict]:
    """Canonical (args, kwargs): a bare tensor becomes a 1-tuple; HF models get `use_cache=False`."""
    if isinstance(args, torch.Tensor):
        args = (args,)
    args = tuple(args or ())
    kwargs = dict(kwargs or {})
    if _is_hf(model):
        if "use_cache" in _inspect.signature(model.forward).parameters:
            kwargs.setdefault("use_cache", False)
        if kwargs.get("use_cache"):  # also through **kwargs
            raise CaptureError("routefx captures Hugging Face models with use_cache=False; got use_cache=True (a "
                               "forward returns no cache: leave use_cache out, or generate with a KV cache by "
                               "compiled.generate(...))")
    return args, kwargs


def _widen(t: torch.Tensor, batch: int, seq: int, to_batch: int, to_seq: int) -> torch.Tensor:
    """Repeat the batch/sequence dims of `t` so that neither is 1 (export would specialise a size-1 dim)."""
    if t.dim() >= 1 and t.shape[0] == batch and to_batch != batch:
        t = t.repeat(to_batch // batch, *([1] * (t.dim() - 1)))
    if t.dim() >= 2 and t.shape[1] == seq and to_seq != seq:
        t = torch.cat([t] + [t[:, -1:]] * (to_seq - seq), dim=1)
    return t


@contextlib.contextmanager
def grouped_experts(model: nn.Module):
    """transformers' MoE experts run by its grouped-GEMM implementation while captured (restored afterwards): the
    per-expert loop (`experts_implementation="eager"`) iterates over the experts a batch hits, a data-dependent
    loop torch.export cannot trace, and `batched_mm` gathers each token's expert weights. The implementations
    compute the same function; the grouped form is the one RaiseMoE reads."""
    get = getattr(model, "get_experts_implementation", None)   # transformers >= 5.x
    can_set = getattr(type(model), "_can_set_experts_implementation", None)
    before = get() if get is not None and can_set is not None and can_set() else None
    if not before or all(v in (None, "grouped_mm") for v in before.values()):
        yield
        return
    model.set_experts_implementation("grouped_mm")
    try:
        yield
    finally:
        model.set_experts_implementation(before)


@contextlib.contextmanager
def _eval_mode(model: nn.Module):
    """Eval mode, and no KV cache in the outputs (a config's `use_cache` read by forwards that take it only
    through **kwargs, or not at all): both restored afterwards."""
    flags = [(m, m.training) for m in model.modules()]
    configs = [c for c in {id(getattr(m, "config", None)): getattr(m, "config", None) for m in model.modules()}
               .values() if c is not None and getattr(c, "use_cache", False) is True]
    model.eval()
    for c in configs:
        c.use_cache = False
    try:
        yield
    finally:
        for m, f in flags:
            m.training = f
        for c in configs:
            c.use_cache = True


@contextlib.contextmanager
def _bind_forward(model: nn.Module, constants: dict):
    """`model.forward` with `constants` bound as keywords, for the duration of the export."""
    if not constants:
        yield
        return
    own = model.__dict__.get("forward")  # an instance attribute someone set: put back as it was
    model.forward = functools.partial(model.forward, **constants)
    try:
        yield
    finally:
        if own is None:
            del model.forward
        else:
            model.forward = own


@contextlib.contextmanager
def _quiet_fake_tensor_log(quiet: bool):
    """While `quiet`, torch's fake-tensor logger keeps the traceback it logs at ERROR level when a meta kernel
    fails (before the exception reaches us) to itself: an attempt routefx retries another way, whose failure is
    reported as a CaptureError when it is final, must not print a traceback to the user."""
    logger = logging.getLogger("torch._subclasses.fake_tensor")
    before = logger.level
    if quiet:
        logger.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        logger.setLevel(before)


def capture(model: nn.Module, example_inputs, example_kwargs: dict | None = None, *,
            widen: tuple[bool, bool] = (True, True)) -> torch.fx.GraphModule:
    """Export `model` to an ATen-level GraphModule with dynamic batch and sequence dimensions.

    The first tensor input fixes the batch size B (dim 0) and, if it has a second dimension, the sequence
    length S (dim 1); every tensor input whose leading dims are (B, S) or (B,) gets them as dynamic dims.
    A B or S of 1 is exported at 2 (the inputs repeated: export would make a size-1 dim a constant), unless
    `widen` (for B, for S) says not to: then it is exported as given, a constant 1 (for a model whose code fixes
    that size anyway, where the graph exported at 2 holds for 2 only).
    The returned module is called like `model(*args, **kwargs)` with the same keyword set; `gm.meta["routefx"]`
    holds a `CaptureInfo`.
    """
    args, kwargs = normalize_inputs(model, example_inputs, example_kwargs)
    sig = _inspect.signature(model.forward)
    try:
        bound = sig.bind(*args, **kwargs)
    except TypeError as e:
        raise CaptureError(f"example inputs do not match {type(model).__name__}.forward{sig}: {e}") from None
    named = dict(bound.arguments)
    tensors = {k: v for k, v in named.items() if isinstance(v, torch.Tensor)}
    if not tensors:
        raise CaptureError(f"no tensor among the example inputs of {type(model).__name__}; found "
                           f"{ {k: type(v).__name__ for k, v in named.items()} }")
    first = next(iter(tensors.values()))
    batch = first.shape[0] if first.dim() >= 1 else None
    seq = first.shape[1] if first.dim() >= 2 else None
    to_batch = 2 if batch == 1 and widen[0] else batch
    to_seq = 2 if seq == 1 and widen[1] else seq

    def spec(value, widen=True):
        if not isinstance(value, torch.Tensor):
            return value, None
        if widen:
            value = _widen(value, batch, seq, to_batch, to_seq)
        value = value.contiguous()  # no stride guards in the graph
        dims = {}
        if value.dim() >= 1 and value.shape[0] == to_batch:
            if to_batch != 1:        # a 1 kept as given is a constant (export would make it one anyway)
                dims[0] = Dim.AUTO
            if value.dim() >= 2 and seq is not None and value.shape[1] == to_seq and to_seq != 1:
                dims[1] = Dim.AUTO
        return value, dims or None

    shapes: dict[str, Any] = {}
    given = dict(named)
    for name, value in named.items():
        kind = sig.parameters[name].kind
        if kind is _inspect.Parameter.VAR_POSITIONAL:
            raise CaptureError(f"{type(model).__name__}.forward takes *{name}; routefx needs named inputs")
        if kind is _inspect.Parameter.VAR_KEYWORD:
            continue
        named[name], shapes[name] = spec(value)
    # constants through **kwargs (GraniteMoE's use_cache) are bound to forward for the export: torch.export
    # cannot take dynamic-shape specs for **kwargs entries
    var_kw = next((n for n in named if sig.parameters[n].kind is _inspect.Parameter.VAR_KEYWORD), None)
    bound_kwargs = named.pop(var_kw) if var_kw is not None else {}
    tensors_kw = sorted(k for k, v in bound_kwargs.items() if isinstance(v, torch.Tensor))
    if tensors_kw:
        raise CaptureError(f"tensor inputs {tensors_kw} reach {type(model).__name__}.forward only through "
                           f"**{var_kw}; routefx captures tensors passed as named parameters "
                           f"({', '.join(n for n in sig.parameters if n != var_kw)}) and constants through **{var_kw}")

    pos = [n for n in named if sig.parameters[n].kind in (sig.parameters[n].POSITIONAL_ONLY,
                                                           sig.parameters[n].POSITIONAL_OR_KEYWORD)]
    n_args = len(args)
    call_args = tuple(named[n] for n in pos[:n_args])
    call_kwargs = {n: named[n] for n in named if n not in pos[:n_args]}
    export = functools.partial(_export, model, pos[:n_args], call_args, call_kwargs, bound_kwargs, shapes, given,
                               spec, (to_batch, to_seq) != (batch, seq))
    form = (capture_cache.inputs_key(given, n_args, dynamic=shapes),) + (() if all(widen) else (("as given", widen),))
    gm, shapes, reused = capture_cache.exported(model, form, export,
                                                holds=functools.partial(serves, feeds=named))
    _drop_export_artifacts(gm)
    written = _functional_buffer_writes(gm)
    if written and not _state_independent(gm, written, call_args, call_kwargs):
        _persist(gm, written)      # the output reads state earlier calls wrote: keep writing it, as the model does
        written = {}
    normalise_ops(gm)
    gm.meta["routefx"] = CaptureInfo(
        arg_names=tuple(pos[:n_args]),
        constant_kwargs={k: v for k, v in call_kwargs.items() if not isinstance(v, torch.Tensor)},
        bound_kwargs=dict(bound_kwargs),
        fixed_dims=_fixed_dims(gm, shapes),
        state_writes=list(written),
        reused_export=reused,
        widened=(to_batch != batch, to_seq != seq),
    )
    return gm


def _export(model, arg_names, call_args, call_kwargs, bound_kwargs, shapes, given, spec, widened: bool):
    """torch.export of `model` on the (widened) example inputs; where that fails and the inputs were widened, on
    the inputs as given (that dim static). Returns (ExportedProgram, the dynamic-shape specs it was exported with)."""
    with _eval_mode(model), _bind_forward(model, bound_kwargs), grouped_experts(model), torch.no_grad(), \
            tracing():
        try:
            with _quiet_fake_tensor_log(widened):   # retried as given on failure
                ep = torch.export.export(model, call_args, kwargs=call_kwargs, dynamic_shapes=shapes, strict=False)
        except Exception as e:  # torch.export raises many exception types; re-raise as one typed error
            ep = None
            if widened:
                # a program that only runs at the given size 1 (a torch.compile piece Dynamo specialised to a
                # batch of 1): capture it on the inputs as given, that dim static
                as_given = {n: spec(given[n], widen=False) for n in shapes}
                try:
                    ep = torch.export.export(model, tuple(as_given[n][0] for n in arg_names),
                                             kwargs={n: as_given[n][0] for n in call_kwargs},
                                             dynamic_shapes={n: v[1] for n, v in as_given.items()}, strict=False)
                    shapes = {n: v[1] for n, v in as_given.items()}
                except Exception:  # noqa: BLE001 - the first failure is the one reported
                    ep = None
            if ep is None:
                raise CaptureError(f"torch.export could not capture {type(model).__name__}: "
                                   f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from e
    return ep, shapes


def _fixed_dims(gm: torch.fx.GraphModule, shapes: dict) -> dict[str, dict[int, int]]:
    """The dims asked to be dynamic (`shapes`: input -> {dim: Dim.AUTO}) that export made constants: the
    placeholder's value has an int there, not a symbol."""
    from torch.fx.experimental.symbolic_shapes import is_concrete_int  # an int, or a symbol export made constant
    vals = {n.target: gu.val(n) for n in gm.graph.nodes if n.op == "placeholder"}
    fixed: dict[str, dict[int, int]] = {}
    for name, dims in shapes.items():
        v = vals.get(name)
        for d in dims or ():
            if v is not None and d < v.dim() and is_concrete_int(v.shape[d]):
                fixed.setdefault(name, {})[d] = int(v.shape[d])
    return fixed


def normalise_ops(gm: torch.fx.GraphModule) -> None:
    """The op rewrites every captured graph gets after its export's artifacts are dropped (the model's forward
    and the generation steps alike): integer `rsub` operands cast, `baddbmm` split, `expand_as` by sizes."""
    _cast_rsub_operands(gm)
    _split_baddbmm(gm)
    _expand_as_by_sizes(gm)


def _expand_as_by_sizes(gm: torch.fx.GraphModule) -> None:
    """Rewrite `expand_as(x, other)` as `expand(x, sizes)`, the sizes read from the graph's inputs: `other` is read
    for its shape only, but as an argument it is a data edge, and one from the residual stream makes the branch
    that expands a bias (GPT-NeoX-Japanese's last attention) read the stream twice, so it was not recognised as a
    block. Only a constant `x` (computed from weights alone) is rewritten: an input-dependent one is never a
    constant term, and explicit size reads of the inputs trip Dynamo (backend "inductor") in routed graphs. Left
    as it is where a size is not an input's dimension."""
    aten = torch.ops.aten
    nodes = [n for n in gm.graph.nodes if n.op == "call_function" and n.target is aten.expand_as.default]
    if not nodes:
        return
    dims = {}  # symbol -> (placeholder, dim)
    for ph in gm.graph.find_nodes(op="placeholder"):
        v = ph.meta.get("val")
        if isinstance(v, torch.Tensor):
            for d, size in enumerate(v.shape):
                if isinstance(size, torch.SymInt):
                    dims.setdefault(size.node.expr, (ph, d))
    g = gm.graph
    mode = next(v.fake_mode for n in g.nodes if isinstance(v := n.meta.get("val"), torch.Tensor)
                and hasattr(v, "fake_mode"))
    for n in nodes:
        x, other = n.args[:2]
        if any(a.op == "placeholder" for a in (*gu.ancestors([x]), x)):
            continue  # only a constant (a bias) expanded to an input's shape: what recognition needs, no more
        shape = other.meta["val"].shape
        if any(isinstance(s, torch.SymInt) and s.node.expr not in dims for s in shape):
            continue
        with g.inserting_before(n):
            sizes = []
            for s in shape:
                if isinstance(s, torch.SymInt):
                    ph, d = dims[s.node.expr]
                    size = g.call_function(aten.sym_size.int, (ph, d))
                    size.meta["val"] = s
                    sizes.append(size)
                else:
                    sizes.append(int(s))
            e = g.call_function(aten.expand.default, (x, sizes))
        e.meta.update({k: v for k, v in n.meta.items() if k in ("nn_module_stack", "stack_trace")})
        with mode:
            e.meta["val"] = x.meta["val"].expand(shape)
        n.replace_all_uses_with(e)
        g.erase_node(n)
    gm.recompile()


_ASSERTS = (torch.ops.aten._assert_tensor_metadata.default,)
_aten = torch.ops.aten


def _writes_first(n: torch.fx.Node) -> bool:
    """Whether `n` is an op that writes its first argument in place."""
    t = n.target
    args = t._schema.arguments if isinstance(t, torch._ops.OpOverload) else None
    return bool(args) and args[0].alias_info is not None and args[0].alias_info.is_write


def _is_parameter(gm: torch.fx.GraphModule, target: str) -> bool:
    try:
        gm.get_parameter(target)
    except AttributeError:  # a buffer (a state the model updates by design) or a constant
        return False
    return True


def _functional_form(n: torch.fx.Node):
    """The functional overload of an in-place op writing its first argument (`index_put_` -> `index_put`), or None."""
    t = n.target
    if n.op != "call_function" or not _writes_first(n) or not t._opname.endswith("_"):
        return None
    packet = getattr(_aten, t._opname[:-1], None) if t.namespace == "aten" else None
    return getattr(packet, t._overloadname, None) if packet is not None else None


_SCATTERS = {_aten.slice.Tensor: _aten.slice_scatter.default, _aten.select.int: _aten.select_scatter.default}


def _alias_root(n):
    """The buffer (get_attr node) `n` is, through no-op casts (`cache.to(x)` with x's dtype and device) and
    aliases; else None."""
    while isinstance(n, torch.fx.Node) and n.op == "call_function":
        v, a = gu.val(n), gu.val(n.args[0]) if n.args and isinstance(n.args[0], torch.fx.Node) else None
        noop_cast = n.target in gu.CASTS and v is not None and a is not None and v.dtype == a.dtype \
            and v.device == a.device and n.target is not _aten._to_copy.default
        if not (noop_cast or n.target is _aten.alias.default):
            return None
        n = n.args[0]
    return n if isinstance(n, torch.fx.Node) and n.op == "get_attr" else None


def _functional_buffer_writes(gm: torch.fx.GraphModule) -> dict[str, torch.fx.Node]:
    """Rewrite in-place writes into a buffer (`cache_k[:b, p:p + s] = k` in Meta's reference Llama, a KV cache kept
    in module state) into the functional ops (`slice_scatter` / `select_scatter` / `index_put`), with every later
    reader of the buffer reading the result: the keys and values then flow from the residual stream to the attention
    as data, so the blocks are recognised and rewritten like any other. The written state stays inside the graph:
    the compiled model does not update the model's buffers (`_state_independent` checks that its output does not
    depend on them; else `_persist` writes them back). Returns buffer name -> the node of its last written value.
    A write whose target was viewed before it and read after (an alias routefx cannot redirect) is left as it is."""
    from routefx.passes.fake_prop import propagate_changed_
    written: dict[str, torch.fx.Node] = {}
    changed: set[str] = set()
    g = gm.graph
    for n in list(g.nodes):
        if n.op != "call_function" or n.users or n.target not in (_aten.copy_.default, _aten.index_put_.default):
            continue
        chain, v = [], n.args[0]
        while isinstance(v, torch.fx.Node) and v.op == "call_function" and v.target in _SCATTERS:
            chain.append(v)
            v = v.args[0]
        buf = _alias_root(v)
        if buf is None or _is_parameter(gm, buf.target):
            continue
        order = {m: i for i, m in enumerate(g.nodes)}
        aliases = [a for a in gu.descendants(buf) | {buf} if a is buf or _alias_root(a) is buf]
        views = set(chain) | set(aliases)     # the aliases' later readers are redirected below
        for a in aliases:   # a view of the buffer made before the write and read after it would see the write
            stack = [u for u in a.users if u not in views and order[u] < order[n]]
            while stack:
                u = stack.pop()
                if any(order[w] > order[n] for w in u.users):
                    views = None
                    break
                stack.extend(w for w in u.users if w.op == "call_function")
            if views is None:
                break
        if views is None:
            continue
        with g.inserting_before(n):
            new = g.call_function(_functional_form(n), n.args, n.kwargs)   # the written view's new value
            for view in chain:    # innermost view first: write the new value into its parent
                changed.add(new.name)
                new = g.call_function(_SCATTERS[view.target], (view.args[0], new, *view.args[1:]), view.kwargs)
            changed.add(new.name)
        for a in aliases:
            for u in list(a.users):
                if order.get(u, -1) > order[n]:
                    u.replace_input_with(a, new)
                    changed.add(u.name)
        g.erase_node(n)
        for view in chain:
            if not view.users:
                g.erase_node(view)
        written[buf.target] = new
    if written:
        gm.recompile()
        propagate_changed_(gm, changed)
    return written


def _state_independent(gm: torch.fx.GraphModule, written: dict, args: tuple, kwargs: dict) -> bool:
    """Does the rewritten graph's output on the example input stay the same when the written buffers hold other
    values (what earlier calls of the model would have left there)? Where it does, not writing them back loses
    nothing the output depends on (a cache read only where this call wrote it)."""
    bufs = [gu.fetch_attr(gm, t) for t in written]
    saved = [b.clone() for b in bufs]
    try:
        with torch.no_grad():
            first = torch.utils._pytree.tree_leaves(gm(*args, **kwargs))
            for b in bufs:
                b.copy_(torch.rand_like(b) + 1 if b.is_floating_point() else b + 1)
            second = torch.utils._pytree.tree_leaves(gm(*args, **kwargs))
    except Exception:  # noqa: BLE001 - the graph does not run on the example here: keep the writes
        return False
    finally:
        for b, v in zip(bufs, saved):
            b.copy_(v)
    return len(first) == len(second) and all(
        not isinstance(a, torch.Tensor) or torch.equal(a, c) for a, c in zip(first, second))


def _persist(gm: torch.fx.GraphModule, written: dict) -> None:
    """Write each buffer's last value back at the end of the graph (the model's own state update)."""
    from routefx.passes.fake_prop import propagate_changed_
    g = gm.graph
    out = next(n for n in g.nodes if n.op == "output")
    new = set()
    with g.inserting_before(out):
        for target, last in written.items():
            attr = g.get_attr(target)
            new |= {attr.name, g.call_function(_aten.copy_.default, (attr, last)).name}
    gm.recompile()
    propagate_changed_(gm, new)


def _drop_export_artifacts(gm: torch.fx.GraphModule) -> None:
    """Remove what export leaves that no rewrite wants. Its dtype/device assertion nodes check nothing a rewrite
    needs, and as impure nodes they would keep dead branches (a pruned block's norm and attention) alive through
    dead-code elimination. Each in-place `detach_` is replaced by its input (it returns its input; the graphs run
    without autograd):
    `torch.tensor(...)` in model code (a Hugging Face cache layer's empty initial keys) is captured as
    `lift_fresh_copy` + `detach_`, and an in-place op makes the graph non-functional, which torch.export's
    verifier refuses (the ONNX backend then had to trace the graph again, losing its fused attention kernels).
    For the same reason in-place writes onto tensors the graph created become functional ops where that changes
    nothing (`_functional_fresh_writes`); a write onto anything else (an input, a buffer: see
    `_functional_buffer_writes`) is left alone.
    A write onto a parameter (RWKV rescales its weights in its first inference call) is refused: the graph would
    change its weights again on every call (a buffer the model updates by design is its state, left alone)."""
    writes = [n for n in gm.graph.nodes if n.op == "call_function" and n.args and isinstance(n.args[0], torch.fx.Node)
              and n.args[0].op == "get_attr" and _writes_first(n) and _is_parameter(gm, n.args[0].target)]
    if writes:
        n = writes[0]
        raise CaptureError(f"the forward writes its weights in place ({n.target} on {n.args[0].target}, "
                           f"{len(writes)} write(s)): a compiled graph would repeat that on every call; routefx "
                           "compiles forwards that leave their weights unchanged (a model that rescales its weights "
                           "on its first call: call it once before compiling, or turn the rescaling off)")
    for n in list(gm.graph.nodes):
        if n.op != "call_function":
            continue
        if n.target in _ASSERTS and not n.users:
            gm.graph.erase_node(n)
        elif n.target is torch.ops.aten.detach_.default:
            n.replace_all_uses_with(n.args[0])
            gm.graph.erase_node(n)
    gm.recompile()
    _functional_fresh_writes(gm)


def _fresh(x: torch.fx.Node) -> bool:
    """Is `x` a new tensor of its own: the result (or a tuple item of the result) of an op whose schema says the
    result aliases no input?"""
    index = 0
    if x.op == "call_function" and x.target is operator.getitem and isinstance(x.args[0], torch.fx.Node):
        x, index = x.args[0], x.args[1]
    if x.op != "call_function" or not isinstance(x.target, torch._ops.OpOverload):
        return False
    returns = x.target._schema.returns
    return isinstance(index, int) and index < len(returns) and returns[index].alias_info is None


def _may_alias(n: torch.fx.Node) -> bool:
    """Can `n`'s result share memory with its input (a view, a tuple item of a view op, an unknown op)?"""
    if n.op != "call_function":
        return True
    if n.target is operator.getitem:
        return not _fresh(n)
    if not isinstance(n.target, torch._ops.OpOverload):
        return True
    return any(r.alias_info is not None for r in n.target._schema.returns)


def _read_after(x: torch.fx.Node, write: torch.fx.Node, order: dict) -> bool:
    """Does a node after `write` read `x` (but `write`), directly or through a view of it?"""
    for u in x.users:
        if u is write:
            continue
        if order[u] > order[write] or (_may_alias(u) and _read_after(u, write, order)):
            return True
    return False


def _functional_fresh_writes(gm: torch.fx.GraphModule) -> int:
    """Rewrite in-place writes onto a fresh tensor (a result that aliases nothing: `torch.empty_like`, a top-k's
    values, any op's output) into functional ops, its later readers reading the result: Mixtral's router divides
    its top-k weights in place (`topk_weights /= sum`), transformers' MoE experts fill `inv = torch.empty_like(perm);
    inv[perm] = arange`, MLA attention assembles its key in a fresh buffer through slices (`k[..., :r] = k_pass`,
    written through `slice_scatter` / `select_scatter`). torch.export's verifier refuses in-place ops, so every
    backend (and ONNX's direct lowering) gets a functional graph. A write stays as it is when a view of the
    tensor made before it is read after it (the view would see the write), and a write into a view when the view
    is read after it or the write's own result is used. Returns how many writes became functional."""
    from routefx.passes.fake_prop import propagate_changed_
    g = gm.graph
    order = {n: i for i, n in enumerate(g.nodes)}
    changed: set[str] = set()
    done = 0
    for n in list(g.nodes):
        if not n.args or (functional := _functional_form(n)) is None or not isinstance(n.args[0], torch.fx.Node):
            continue
        chain, root = [], n.args[0]
        while root.op == "call_function" and root.target in _SCATTERS and isinstance(root.args[0], torch.fx.Node):
            chain.append(root)
            root = root.args[0]
        if not _fresh(root) or (chain and (n.users or any(len(v.users) != 1 for v in chain))):
            continue
        if any(u is not n and u not in chain and order[u] < order[n] and _may_alias(u)
               and _read_after(u, n, order) for u in root.users):
            continue   # a view made before the write, read after it
        with g.inserting_before(n):   # new nodes take the write's place in `order`
            new = g.call_function(functional, n.args, n.kwargs)   # the written tensor's new value
            _carry_meta(new, n, gu.val(n), changed)
            order[new] = order[n]
            if _promotes(new, gu.val(n)):   # x.add_(y) keeps x's dtype, add(x, y) may promote: cast back
                new = g.call_function(_aten._to_copy.default, (new,), {"dtype": gu.val(n).dtype})
                _carry_meta(new, n, gu.val(n), changed)
                order[new] = order[n]
            for view in chain:    # innermost view first: write the new value into its parent
                new = g.call_function(_SCATTERS[view.target], (view.args[0], new, *view.args[1:]), view.kwargs)
                _carry_meta(new, n, gu.val(view.args[0]), changed)
                order[new] = order[n]
        if not chain:
            n.replace_all_uses_with(new)
        for u in list(root.users):   # they read a value of the same shape and dtype: nothing to re-propagate
            if order.get(u, -1) > order[n]:
                u.replace_input_with(root, new)
        g.erase_node(n)
        for view in chain:
            if not view.users:
                g.erase_node(view)
        done += 1
    if done:
        gm.recompile()
    if changed:
        propagate_changed_(gm, changed)
    return done


def _promotes(functional: torch.fx.Node, written) -> bool:
    """Whether the functional op's result has another dtype than the tensor its in-place form wrote (`written`),
    computed on the fake values of its arguments; True where that cannot be computed (a cast is harmless)."""
    if written is None or (mode := getattr(written, "fake_mode", None)) is None:
        return True
    try:
        with mode:
            v = functional.target(*torch.fx.node.map_aggregate(functional.args, lambda a: a.meta.get("val") if
                                  isinstance(a, torch.fx.Node) else a), **torch.fx.node.map_aggregate(
                functional.kwargs, lambda a: a.meta.get("val") if isinstance(a, torch.fx.Node) else a))
    except Exception:  # noqa: BLE001 - cannot tell
        return True
    return not isinstance(v, torch.Tensor) or v.dtype != written.dtype


def _carry_meta(new: torch.fx.Node, write: torch.fx.Node, val, changed: set) -> None:
    """`new` (a node replacing the in-place `write`) gets its module path and stack trace, and `val` as its fake
    value (the written tensor's, unchanged by the write); without one it is left to fake propagation."""
    new.meta.update({k: v for k, v in write.meta.items() if k != "val"})
    if val is not None:
        new.meta["val"] = val
    else:
        changed.add(new.name)


def _cast_rsub_operands(gm: torch.fx.GraphModule) -> None:
    """`rsub(x, s)` (`s - x`) of an integer tensor and a float scalar gets x cast to the result's dtype first, the
    promotion torch applies inside the op: torch.onnx finds no translation for the mixed form (XLNet and
    ProphetNet compute `1.0 - mask` on an integer mask), and the exporter's type-promotion pass has no rule for
    rsub. The values are unchanged."""
    for n in list(gm.graph.nodes):
        if n.op != "call_function" or n.target not in (_aten.rsub.Scalar, _aten.rsub.Tensor):
            continue
        x, out = n.args[0], n.meta.get("val")
        v = x.meta.get("val") if isinstance(x, torch.fx.Node) else None
        if not isinstance(v, torch.Tensor) or not isinstance(out, torch.Tensor) or v.dtype == out.dtype:
            continue
        with gm.graph.inserting_before(n):
            cast = gm.graph.call_function(_aten._to_copy.default, (x,), {"dtype": out.dtype})
        cast.meta.update({k: n.meta[k] for k in ("nn_module_stack", "stack_trace") if k in n.meta})
        with v.fake_mode:
            cast.meta["val"] = v.to(out.dtype)
        n.replace_input_with(x, cast)
    gm.recompile()


def _split_baddbmm(gm: torch.fx.GraphModule) -> None:
    """Rewrite `baddbmm(c, a, b, beta, alpha)` (BLOOM's ALiBi scores) as `beta·c + alpha·bmm(a, b)`: torch's
    fake kernel of baddbmm fails on symbolic batch sizes, so graphs holding it could not be re-propagated after a
    rewrite. Each new node gets its fake value and the module path of the op it replaces."""
    aten = torch.ops.aten
    nodes = [n for n in gm.graph.nodes if n.op == "call_function" and n.target is aten.baddbmm.default]
    if not nodes:
        return
    mode = next(v.fake_mode for n in gm.graph.nodes if isinstance(v := n.meta.get("val"), torch.Tensor)
                and hasattr(v, "fake_mode"))
    g = gm.graph

    def make(target, args, like):
        m = g.call_function(target, args)
        m.meta.update({k: v for k, v in like.meta.items() if k in ("nn_module_stack", "stack_trace")})
        with mode:
            m.meta["val"] = target(*[a.meta["val"] if isinstance(a, torch.fx.Node) else a for a in args])
        return m

    for n in nodes:
        c, a, b = n.args[:3]
        beta, alpha = n.kwargs.get("beta", 1), n.kwargs.get("alpha", 1)
        with g.inserting_before(n):
            out = make(aten.bmm.default, (a, b), n)
            if alpha != 1:
                out = make(aten.mul.Tensor, (out, alpha), n)
            if beta != 0:
                out = make(aten.add.Tensor, (make(aten.mul.Tensor, (c, beta), n) if beta != 1 else c, out), n)
        n.replace_all_uses_with(out)
        g.erase_node(n)
    gm.recompile()
