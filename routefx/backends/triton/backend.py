"""Triton backend: routed FFNs with data-dependent routes run as Triton kernels, the rest of the graph is compiled
by Inductor.

`prepare(gm, example_kwargs)` lowers the rewritten graph (`lower`), then compiles it with
`torch.compile(..., backend="inductor", dynamic=None, fullgraph=True)`: torch's default, which specialises on the
first call's shapes and recompiles once, with dynamic batch and length, when a call brings other shapes (measured
on an H200, 8-layer d=2048 Llama, batch 4 x 2048: the shape-specialised graph ran 6% faster than the dynamic one,
15.60 vs 16.56 ms, bench/RESULTS_GPU.md); `dynamic=True` compiles the dynamic graph from the start:

- a `routefx::routed_ffn` whose routes are data (a router's argmax / top-k) becomes
  `routefx_triton::routed_ffn` (registered by `routefx.backends.triton.ffn` with `torch.library.triton_op`, so
  Dynamo captures it without a graph break and Inductor schedules the kernels it launches), or, when it is gated
  and its weights are routefx's own copies, `routefx_triton::routed_ffn_paired` on one matrix of interleaved
  gate and up rows (`interleave_gate_up_`); the router products of those FFNs become fused reductions
  (`router_reductions_`);
- a `routefx::routed_ffn` whose routes are a constant fill (`zeros_like` / `full_like` / `ones_like`: Dense, a
  static router) becomes a plain dense FFN on its fixed neuron range (`F.linear` products, cuBLAS on GPU), with
  no routing at all; a constant route to an empty range becomes zeros.

`fullgraph=True` makes a graph break an error instead of a silent fallback.

Devices: the graph's weights fix the device. On CUDA everything above applies. On CPU the backend needs
`TRITON_INTERPRET=1` (Triton's interpreter, fp32 only: it computes bf16 wrongly without an error, so low-precision
graphs are refused there). There the lowered graph runs eagerly by default (same lowering, same Triton kernels):
`wrap_triton` cannot trace an interpreted kernel, so under the interpreter `routefx.backends.triton.ffn`
registers the op as an opaque custom op, which Inductor's CPU code can call (`prepare(..., inductor=True)`, a few
seconds of C++ compilation per graph; used by one test). Without CUDA and without the interpreter, `prepare`
raises `BackendError` saying what is missing; a call whose tensors are on another device than the weights raises
`InputError`.

The runner is called like `gm(**kwargs)` and returns the same output structure.
"""
from __future__ import annotations

import dataclasses
import os
import warnings
from typing import Optional

import torch
from torch import fx

import routefx.ir.ops  # noqa: F401  (registers torch.ops.routefx.routed_ffn)
from routefx.backends.static_routes import lower_routed, static_ffn  # noqa: F401  (static_ffn: re-exported)
from routefx.errors import BackendError, InputError
from routefx.ir import graph_utils as gu
from routefx.ir.graph_utils import fetch_attr

__all__ = ["prepare", "lower", "TritonRunner", "LowerStats", "unavailable_reason", "static_ffn"]

_LOW_PRECISION = (torch.float16, torch.bfloat16)
ROUTER_REDUCTION_MAX_ROUTES = 16  # router products with at most this many outputs become fused reductions
aten = torch.ops.aten


def _interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def unavailable_reason(device: Optional[torch.device] = None) -> str | None:
    """Why backend "triton" cannot run (on `device`, default: wherever it could), or None when it can."""
    try:
        import triton  # noqa: F401
    except ImportError as e:
        return f"Triton is not installed ({e}); install triton (Linux) to use backend 'triton'"
    cuda = torch.cuda.is_available()
    if device is None:
        if cuda or _interpret():
            return None
        return ("backend 'triton' needs a CUDA GPU (torch.cuda.is_available() is False) or Triton's CPU "
                "interpreter (set TRITON_INTERPRET=1 before importing routefx; fp32 only, for tests)")
    if device.type == "cuda":
        if not cuda:
            return f"the graph's weights are on {device} but CUDA is not available"
        if _interpret():
            return (f"the graph's weights are on {device} but TRITON_INTERPRET is set: Triton's interpreter runs CPU "
                    "fp32 tensors only; unset TRITON_INTERPRET (before triton is imported) to run on the GPU")
        return None
    if device.type == "cpu":
        if _interpret():
            return None
        return ("the graph's weights are on the CPU; backend 'triton' runs on a CUDA GPU (move the model to a CUDA "
                "device) or, for tests, on CPU under TRITON_INTERPRET=1")
    return f"the graph's weights are on {device}; backend 'triton' supports CUDA devices (and CPU under " \
           "TRITON_INTERPRET=1)"


# ---- lowering -----------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class LowerStats:
    triton_ops: int   # dynamic routed FFNs -> routefx_triton::routed_ffn (routed_ffn_paired when gated)
    dense_ffns: int   # constant-route routed FFNs -> plain dense products on one neuron range
    flex_attentions: int = 0  # SDPA with a boolean mask -> block-sparse FlexAttention (`attention.py`)
    causal_checks: int = 0    # SDPA with a boolean mask -> causal kernel when the mask is causal (`causal_sdpa`)


def lower(gm: fx.GraphModule, flex_attention: bool = False,
          causal_check: bool = False) -> tuple[fx.GraphModule, LowerStats]:
    """A new GraphModule (sharing `gm`'s weights) with every routed_ffn lowered as the module docstring says.
    `gm`'s graph is left unchanged; the gate and up buffers routefx made for its routed FFNs become views of one
    interleaved matrix in both modules (same values, same memory: `interleave_gate_up_`). flex_attention: also
    rewrite SDPA with a boolean mask as block-sparse FlexAttention (`attention.flex_attention_`, any float
    dtype); causal_check: the SDPA left with a boolean mask checks it for the causal kernel (`causal_sdpa`)."""
    from routefx.backends.triton import ffn  # noqa: F401  (registers torch.ops.routefx_triton.routed_ffn)
    triton_op = torch.ops.routefx_triton.routed_ffn.default

    new, n_dense, n_triton = lower_routed(gm, triton_op)
    if n_triton:
        router_reductions_(new, triton_op)
        interleave_gate_up_(new, gm, triton_op)
    n_flex = n_causal = 0
    if flex_attention:
        from routefx.backends.triton.attention import flex_attention_
        n_flex = flex_attention_(new, dtypes=(torch.float16, torch.bfloat16, torch.float32))
    if causal_check:
        from routefx.backends.causal_sdpa import causal_sdpa_
        n_causal = causal_sdpa_(new)
    return new, LowerStats(n_triton, n_dense, n_flex, n_causal)


def interleave_gate_up_(new: fx.GraphModule, gm: fx.GraphModule, routed_target) -> int:
    """Give each gated `routed_target` node of `new` its gate and up weights as one matrix with the gate and up
    rows of each neuron side by side (`ffn.interleave_gate_up`) and call `routefx_triton::routed_ffn_paired` on
    it: kernel 1 can then read a neuron block's gate and up rows as one tile and run one product of twice the
    width (its PAIRED configurations; the autotuner may still pick the two-product form). Only weights routefx
    made (`passes.attrs.is_own_copy`: permuted or concatenated copies), never the user's. The two old buffers
    become views of the new matrix in both modules (`gm`'s graph computes with them unchanged), so values and
    memory stay as they were: the old buffers are freed once nothing else holds them. Returns the number of
    nodes rewritten."""
    from routefx.backends.triton import ffn
    from routefx.passes.attrs import add_tensor_attr, is_own_copy
    paired_op = torch.ops.routefx_triton.routed_ffn_paired.default
    g = new.graph
    done, made = 0, {}   # (up name, gate name) -> name of the interleaved matrix in `new`
    users = {}           # buffer name -> the (up, gate) pairs it appears in
    ops = [n for n in g.nodes if n.op == "call_function" and n.target is routed_target and n.args[4] is not None]
    for n in ops:
        for a in (n.args[3], n.args[4]):
            if isinstance(a, fx.Node):
                users.setdefault(a.target, set()).add((n.args[3].target, n.args[4].target))
    for n in ops:
        up_n, gate_n = n.args[3], n.args[4]
        if not (is_own_copy(new, up_n) and is_own_copy(new, gate_n)) or up_n.target == gate_n.target:
            continue
        key = (up_n.target, gate_n.target)
        if len(users[up_n.target]) > 1 or len(users[gate_n.target]) > 1:
            continue  # a buffer paired with two partners: leave both as they are
        if key not in made:
            up, gate = fetch_attr(new, up_n.target), fetch_attr(new, gate_n.target)
            both = ffn.paired_matrix(up, gate)  # laid out by an earlier lowering of this graph: the same matrix
            if both is None:
                if up.dim() != 2 or up.shape != gate.shape or up.dtype != gate.dtype or up.device != gate.device \
                        or not (up.is_contiguous() and gate.is_contiguous()):
                    continue
                both = ffn.interleave(up, gate)
                up_v, gate_v = ffn._split_paired(both)
                for mod in (new, gm):
                    if fetch_attr(mod, up_n.target) is up and fetch_attr(mod, gate_n.target) is gate:
                        mod.register_buffer(up_n.target, up_v)
                        mod.register_buffer(gate_n.target, gate_v)
            made[key] = add_tensor_attr(new, f"{up_n.target}_gate_up", both)
        x, routes, gates, _, _, w_down, b_up, b_gate, b_down, ranges, act = n.args
        with g.inserting_before(n):
            w_gu = g.get_attr(made[key])
            rep = g.call_function(paired_op, (x, routes, gates, w_gu, w_down, b_up, b_gate, b_down, ranges, act))
        gu.replace_node(n, rep)
        done += 1
    if done:
        g.eliminate_dead_code()
        used = {n.target for n in g.nodes if n.op == "get_attr"}
        for name in {t for key in made for t in key} - used:  # the views live on in `gm` only
            if "." not in name and name in new._buffers:
                del new._buffers[name]
        new.recompile()
    return done


def router_reductions_(gm: fx.GraphModule, routed_target) -> int:
    """Rewrite each fp32 router product `linear(a, W, b)` (W a graph tensor of at most
    ROUTER_REDUCTION_MAX_ROUTES rows) that chooses a `routed_target` node's routes (argmax(linear - price)) as
    `sum(a[..., None, :] * W, -1) + b`: Inductor fuses that into one reduction that reads `a` once per route
    from cache, where a GEMM of 3 output columns runs cuBLAS's SIMT fp32 kernel (0.04 ms per router at
    8192 x 2048 on an H200, 2.5% of a Duo forward). fp32 only, so the sum differs from the GEMM's by rounding
    order alone. Returns the number rewritten."""
    g = gm.graph
    done = 0
    for n in list(g.nodes):
        if n.op != "call_function" or n.target is not routed_target:
            continue
        r = n.args[1]
        sub = r.args[0] if isinstance(r, fx.Node) and r.target is aten.argmax.default else None
        lin = sub.args[0] if isinstance(sub, fx.Node) and sub.target is aten.sub.Tensor else None
        if not isinstance(lin, fx.Node) or lin.target is not aten.linear.default or len(lin.users) != 1:
            continue
        a, w = lin.args[0], lin.args[1]
        b = lin.args[2] if len(lin.args) > 2 else None
        wt = fetch_attr(gm, str(w.target)) if isinstance(w, fx.Node) and w.op == "get_attr" else None
        av = a.meta.get("val") if isinstance(a, fx.Node) else None
        if not isinstance(wt, torch.Tensor) or wt.dim() != 2 or wt.shape[0] > ROUTER_REDUCTION_MAX_ROUTES \
                or wt.dtype != torch.float32 or av is None or av.dtype != torch.float32:
            continue
        with g.inserting_before(lin):
            prod = g.call_function(aten.mul.Tensor, (g.call_function(aten.unsqueeze.default, (a, -2)), w))
            out = g.call_function(aten.sum.dim_IntList, (prod, [-1]))
            if b is not None:
                out = g.call_function(aten.add.Tensor, (out, b))
        gu.replace_node(lin, out)
        done += 1
    if done:
        gm.recompile()
    return done


# ---- running ------------------------------------------------------------------------------------------------

def _weights_device(gm: fx.GraphModule) -> torch.device:
    devices = {t.device for t in list(gm.parameters()) + list(gm.buffers())}
    for n in gm.graph.nodes:  # tensor constants that are plain attributes
        if n.op == "get_attr":
            t = getattr(gm, str(n.target), None) if "." not in str(n.target) else None
            if isinstance(t, torch.Tensor):
                devices.add(t.device)
    if len(devices) > 1:
        raise BackendError(f"the graph's weights are on several devices {sorted(map(str, devices))}; backend "
                           "'triton' runs a model on one device")
    return devices.pop() if devices else torch.device("cpu")


def _graph_dtypes(gm: fx.GraphModule) -> set[torch.dtype]:
    return {t.dtype for t in list(gm.parameters()) + list(gm.buffers()) if t.is_floating_point()}


class TritonRunner:
    """Runs the lowered graph; called like the graph module (`run(**kwargs)`).

    graph_module: the lowered fx graph; stats: `LowerStats`; mode: "inductor" (CUDA), "inductor-cudagraphs"
    (CUDA, `prepare(..., cudagraphs=True)`: replays CUDA graphs), "eager-interpreter" (CPU under
    TRITON_INTERPRET=1), "inductor-interpreter" or "eager" when asked; device: the weights' device; compiled: what
    is called (the `torch.compile` wrapper, or the lowered graph itself)."""

    def __init__(self, graph_module: fx.GraphModule, stats: LowerStats, device: torch.device, mode: str,
                 compiled, without_flex=None):
        self.graph_module = graph_module
        self.stats = stats
        self.device = device
        self.mode = mode
        self.compiled = compiled
        self._without_flex = without_flex  # () -> (graph, stats, compiled) with SDPA kept; None: nothing to undo
        self.flex_fallback: str | None = None  # why FlexAttention was given up (compile failure), if it was

    def _give_up_flex(self, err: Exception) -> None:
        """FlexAttention's compile support differs between torch releases: when the graph with it fails to
        compile or run, go on with attention as captured (SDPA), and say so."""
        self.flex_fallback = f"{type(err).__name__}: {str(err).splitlines()[0][:300] if str(err) else ''}"
        warnings.warn(f"routefx triton backend: the graph with FlexAttention failed ({self.flex_fallback}); "
                      "running attention as SDPA with the mask instead (backend option flex_attention=False "
                      "skips the attempt)", RuntimeWarning, stacklevel=3)
        self.graph_module, self.stats, self.compiled = self._without_flex()
        self._without_flex = None

    def _check_devices(self, args, kwargs) -> None:
        for name, v in list(enumerate(args)) + list(kwargs.items()):
            if isinstance(v, torch.Tensor) and v.device != self.device:
                where = f"input {name!r}" if isinstance(name, str) else f"positional input {name}"
                raise InputError(f"{where} is on {v.device}, the compiled model's weights are on {self.device}: "
                                 f"move the inputs to {self.device}")

    def __call__(self, *args, **kwargs):
        self._check_devices(args, kwargs)
        if self.mode == "inductor-cudagraphs":
            torch.compiler.cudagraph_mark_step_begin()  # each call is a new step: earlier outputs may be reused
        with torch.no_grad():  # inference only: the Triton op has no autograd formula, and Inductor would
            if self._without_flex is None:  # otherwise trace a training graph when weights require grad
                return self.compiled(*args, **kwargs)
            try:
                return self.compiled(*args, **kwargs)
            except (InputError, torch.OutOfMemoryError):
                raise
            except Exception as e:  # noqa: BLE001 - any compile failure of the flex graph: retry without it
                self._give_up_flex(e)
                if self.mode == "inductor-cudagraphs":
                    torch.compiler.cudagraph_mark_step_begin()
                return self.compiled(*args, **kwargs)

    def __repr__(self) -> str:
        return (f"TritonRunner(device={self.device}, mode={self.mode!r}, triton_ops={self.stats.triton_ops}, "
                f"dense_ffns={self.stats.dense_ffns}, flex_attentions={self.stats.flex_attentions}, "
                f"causal_checks={self.stats.causal_checks}"
                + (f", flex_fallback={self.flex_fallback!r})" if self.flex_fallback else ")"))


def prepare(gm: fx.GraphModule, example_kwargs: dict, *, dynamic: bool | None = None,
            inductor: bool | None = None, cudagraphs: bool = False,
            flex_attention: bool = False, causal_check: bool = False) -> TritonRunner:
    """Lower `gm` and compile it (see the module docstring). Raises `BackendError` when Triton cannot run where
    the graph's weights are.

    inductor: compile the lowered graph with Inductor (None: on CUDA yes; on CPU under the interpreter no, the
    graph runs eagerly: Inductor's C++ compile costs seconds per graph, and the interpreter is a test tool).
    Compilation is lazy: Inductor compiles on the first call (and again for input forms it has not seen).

    cudagraphs: CUDA only; compile with `torch.compile(mode="reduce-overhead")`, so that each call replays one
    CUDA graph of the whole forward (Inductor's CUDA graph trees, recorded on the second call of each shape)
    instead of launching its kernels from Python: the routing metadata is computed on the GPU with no host
    synchronisation, so routed graphs are capturable. As with torch's own mode, the outputs live in the graph's
    memory pool and are overwritten by the next call: clone what you keep across calls (torch raises an error
    when an overwritten output is read).

    flex_attention: run attention with a boolean mask as block-sparse FlexAttention (`attention.py`: tiles the
    mask disallows are skipped, e.g. half of a causal attention). EXPERIMENTAL, off by default:
    on an H200 with torch 2.11 the compiled graph failed with an illegal memory access
    (bench/results/gpu_run_2243_h200_flex/; Dynamo's "Attempt to trace generator" there is a side effect of
    the runtime error), before the mask was materialised for the template (`attention.materialize`); not yet
    run on a GPU since (`bench/gpu_flex_probe.py` is the prepared check). True: wherever the graph runs (any
    float dtype; on CPU eagerly, or compiled by Inductor's CPU FlexAttention template).

    causal_check: each SDPA with a boolean mask (left by flex_attention) checks once per forward whether its
    mask is the causal triangle and then runs SDPA's causal kernel (`routefx.backends.causal_sdpa`): one host
    synchronisation per forward, so it cannot be combined with cudagraphs. EXPERIMENTAL, off by default (not
    yet measured on a GPU)."""
    device = _weights_device(gm)
    reason = unavailable_reason(device)
    if reason is not None:
        raise BackendError(reason)
    if cudagraphs and device.type != "cuda":
        raise BackendError(f"cudagraphs=True needs the model on a CUDA device; its weights are on {device}")
    if cudagraphs and inductor is False:
        raise BackendError("cudagraphs=True captures the Inductor-compiled graph: it cannot be combined with "
                           "inductor=False")
    low = _graph_dtypes(gm) & set(_LOW_PRECISION)
    if device.type == "cpu" and low:
        raise BackendError(f"Triton's CPU interpreter computes {sorted(map(str, low))} wrongly without an error; "
                           "backend 'triton' on CPU (TRITON_INTERPRET=1) runs fp32 graphs only: convert the model "
                           "with .float(), or run on a CUDA GPU")
    if causal_check and cudagraphs:
        raise BackendError("causal_check=True reads a host value each forward (whether the mask is causal), which "
                           "a CUDA graph cannot replay; use it without cudagraphs")
    if inductor is None:
        inductor = device.type == "cuda"

    def build(flex: bool):
        lowered, stats = lower(gm, flex_attention=flex, causal_check=causal_check)
        if not inductor:
            return lowered, stats, lowered
        return lowered, stats, torch.compile(lowered, backend="inductor", dynamic=dynamic, fullgraph=True,
                                             mode="reduce-overhead" if cudagraphs else None)

    lowered, stats, compiled = build(flex_attention)
    if inductor:
        mode = ("inductor-cudagraphs" if cudagraphs else "inductor") if device.type == "cuda" \
            else "inductor-interpreter"
    else:
        mode = "eager" if device.type == "cuda" else "eager-interpreter"
    without_flex = (lambda: build(False)) if stats.flex_attentions and inductor else None
    return TritonRunner(lowered, stats, device, mode, compiled, without_flex)
