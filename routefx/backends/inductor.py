"""Inductor backend: the rewritten graph compiled by `torch.compile(backend="inductor")`, on the CPU (or wherever
the weights are).

`prepare(gm, example_kwargs)` lowers the graph, compiles it with `dynamic=True, fullgraph=True` (a graph break is
an error, not a silent fallback) and runs it once on the example, so Inductor's compile time is spent here:
- a `routefx::routed_ffn` whose routes are a constant fill (Dense, a static router) becomes the plain FFN on its
  fixed neuron range (`static_ffn`: `F.linear` products Inductor schedules with the rest of the graph), no routing;
- any other `routefx::routed_ffn` (Duo routes, MoE top-k with gates) stays an opaque custom op (Inductor calls
  it as an extern kernel). Its implementation is the grouped dispatch of `routefx.ir.dispatch`: one stable
  argsort of the (token, slot) route ids, one host read of the per-route counts (which also checks the ids),
  one gather of the rows in sorted order, per live route GEMMs on its own contiguous rows, one gate multiply
  and one scatter back; skip routes and routes no token takes run nothing. In fp32 on the CPU the compiled copy
  calls `routefx::routed_ffn_packed` instead, whose per-route GEMMs run on weights pre-packed for oneDNN at
  prepare time (`routefx.backends.packed_ffn`: torch's GEMMs on plain weight slices ran at half the packed
  rate on an AMD EPYC); `graph_module` keeps the plain op (what `routefx.export` packages).

Inductor's `freezing` is on for the compile and every call (a recompile for new shapes happens inside a call):
the weights are constants of an inference graph, so Inductor folds them and pre-packs the GEMM weights for
oneDNN on CPU, as ONNX Runtime pre-packs its constant MatMul operands. Measured on the CPU benchmark model (shape
A of bench/cpu.py, Xeon, 2 threads): 3-4% faster than without. As with the ONNX backend, edit weights before
compiling, not after.

The runner is called like `gm(**kwargs)` and returns the same output structure.
"""
from __future__ import annotations

import time

import torch
from torch import fx

import routefx.ir.ops  # noqa: F401  (registers torch.ops.routefx.routed_ffn)
from routefx.backends.packed_ffn import pack_routed_ffns
from routefx.backends.static_routes import copy_module, lower_routed
from routefx.errors import BackendError

__all__ = ["prepare", "lower_static", "InductorRunner"]


def _inference_config():
    import torch._inductor.config as inductor_config
    return inductor_config.patch(freezing=True)


def lower_static(gm: fx.GraphModule) -> tuple[fx.GraphModule, int]:
    """A new GraphModule (sharing `gm`'s weights) whose constant-route routed FFNs are plain FFNs on their range;
    returns it and how many were lowered. `gm` is left unchanged."""
    new, lowered, _ = lower_routed(gm)
    return new, lowered


class InductorRunner:
    """Calls the compiled graph. graph_module: the lowered graph; static_ffns: routed FFNs lowered to plain FFNs;
    causal_checks: masked attentions that take the causal kernel when their mask is causal (`causal_sdpa`);
    compiled: the `torch.compile` wrapper; timings: {"compile": seconds of the first (compiling) call};
    packed_ffns: the routed FFNs the compiled copy runs on pre-packed weights (kept alive here)."""

    def __init__(self, graph_module: fx.GraphModule, static_ffns: int, compiled, timings: dict,
                 causal_checks: int = 0, packed_ffns: list | None = None):
        self.graph_module = graph_module
        self.static_ffns = static_ffns
        self.packed_ffns = list(packed_ffns or [])
        self.causal_checks = causal_checks
        self.compiled = compiled
        self.timings = timings

    def __call__(self, *args, **kwargs):
        with torch.no_grad(), _inference_config():
            return self.compiled(*args, **kwargs)

    def __repr__(self) -> str:
        return (f"InductorRunner(static_ffns={self.static_ffns}, packed_ffns={len(self.packed_ffns)}, "
                f"causal_checks={self.causal_checks}, timings={self.timings})")


def prepare(gm: fx.GraphModule, example_kwargs: dict, *, dynamic: bool = True,
            causal_check: bool = False) -> InductorRunner:
    """Lower and compile `gm`, then run it once on `example_kwargs` (see the module docstring). Raises
    `BackendError` when Inductor cannot compile the graph.

    causal_check: each SDPA with a boolean mask checks at run time whether the mask is the causal triangle and
    then runs SDPA's causal kernel (`routefx.backends.causal_sdpa`). Off by default: on the Intel Xeon, one
    thread, torch 2.13, the CPU kernel with the causal mask is only ~10% slower than with `is_causal` (16 heads
    of 64, S = 512: 8.7 vs 7.9 ms), and the 8-layer d=1024 model at 1 x 512 ran 926 ms with the check against
    913 without (noise level)."""
    lowered, n_static = lower_static(gm)
    n_causal = 0
    if causal_check:
        from routefx.backends.causal_sdpa import causal_sdpa_
        n_causal = causal_sdpa_(lowered)
    run_gm, packed = pack_routed_ffns(copy_module(lowered))   # lowered keeps the plain op (export packages it)
    compiled = torch.compile(run_gm, backend="inductor", dynamic=dynamic, fullgraph=True)
    runner = InductorRunner(lowered, n_static, compiled, {}, n_causal, packed)
    t0 = time.perf_counter()
    try:
        runner(**example_kwargs)
    except Exception as e:  # Dynamo / Inductor raise many types; one typed error
        text = str(e).strip().splitlines()
        raise BackendError(f"torch.compile (inductor) could not compile the graph: {type(e).__name__}: "
                           f"{text[0] if text else ''}") from e
    runner.timings["compile"] = round(time.perf_counter() - t0, 3)
    return runner
