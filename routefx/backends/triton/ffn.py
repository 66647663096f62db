"""`routefx_triton::routed_ffn`: the routed FFN as Triton kernels, registered with `torch.library.triton_op`.

Same signature and semantics as `torch.ops.routefx.routed_ffn` (see `routefx.ir.ops.routed_ffn`); importing this
module registers the op. Steps, all on the device and with no host synchronisation:
  1. `routing.route_metadata`: counting sort of the T*K (token, slot) assignments by route;
  2. `kernels.up_kernel`: gate/up GEMM on gathered rows, bias + activation + gated product fused in the
     epilogue, h written in sorted order (skip routes launch no tile);
  3. `kernels.down_kernel`: down GEMM over each route's own width, + b_down, * gate, stored at the assignment's
     row: the output itself when K = 1 (direct store); when K > 1 a [T*K, d] buffer of per-slot rows in x's
     dtype (as the reference rounds each route's output) summed over K in fp32 (deterministic: each slot owns its
     row, so no atomics; the sum over K is one small reduction).
Tokens whose routes are all skips keep the zeros the output is initialised with.

Decode path (`decode_kernels`, T <= 64 tokens): a masked dense FFN over the span of the used ranges, each used
weight block read once, no routing metadata (see that module).

Dense fast path (as in the reference): one full range, K = 1, no gates -> the plain FFN through F.linear (cuBLAS).

Devices: CUDA tensors run compiled kernels (autotuned per (d, widest range, assignment-count bucket, variant)).
CPU tensors run under Triton's interpreter, which needs TRITON_INTERPRET=1 set before triton is first imported
(the test suite's conftest does this when there is no GPU); the interpreter computes fp16/bf16 wrongly without
an error, so it is refused there. Route ids are checked on CPU (RoutedFFNError); on CUDA a check would need a host
sync, so an id outside [0, R) is sent to a drop bucket and contributes 0.
"""

from __future__ import annotations

import functools
import os
from typing import List, Optional

import torch
import torch.nn.functional as F
import triton
from torch import Tensor

from routefx.backends.triton import decode_kernels, kernels
from routefx.backends.triton.routing import range_tables, route_metadata
from routefx.errors import BackendError, RoutedFFNError
from routefx.ir.activations import get_activation
from routefx.ir.ops import _check_static

__all__ = ["routed_ffn", "routed_ffn_paired", "INTERPRET", "kernel_configs", "paired_layout", "paired_matrix",
           "interleave", "interleave_gate_up"]

INTERPRET = os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "yes", "on", "y")

_ACC = {torch.float16: torch.float32, torch.bfloat16: torch.float32}
_SMALL_N = 256  # assignments at or below this use the small-row-block configurations
DECODE_MAX_T = 64  # tokens at or below this take the decode path (masked dense over the used span)


def _cfg(bm, bn, bk, warps, stages, group=8, persist=0, tma=0, flatten=0):
    return triton.Config({"BM": bm, "BN": bn, "BK": bk, "GROUP_M": group, "PERSIST": persist, "TMA": tma,
                          "FLATTEN": flatten}, num_warps=warps, num_stages=stages)


def _cfg_nm(bn, bk, warps, stages):
    return triton.Config({"BN": bn, "BK": bk}, num_warps=warps, num_stages=stages)


def _with_tma(configs, levels=(1,), up=False):
    """Each configuration also with its weight tiles through tensor descriptors (TMA=1) and, for TMA=2, its row
    tiles too (kernels.up_kernel / down_kernel). For kernel 1 (`up`) flattened loops with TMA=1 are left out:
    gated, they need 295-393 KB of shared memory (bench/triton_compile_check.py --all, sm_90), more than any
    GPU has."""
    return configs + [triton.Config({**c.kwargs, "TMA": t}, num_warps=c.num_warps, num_stages=c.num_stages)
                      for t in levels for c in configs if not (up and t == 1 and c.kwargs.get("FLATTEN"))]


# Kernel 1 holds two fp32 accumulators when gated: BM*BN*2*4 bytes of registers. Hopper bf16 sizes per the
# Triton matmul tutorial / vLLM fused MoE; configs that overflow shared memory are dropped by the autotuner.
_UP_LARGE = [
    _cfg(128, 128, 64, 8, 3), _cfg(128, 128, 64, 8, 4), _cfg(128, 64, 64, 4, 4), _cfg(64, 128, 64, 4, 4),
    _cfg(64, 64, 32, 4, 3), _cfg(128, 128, 64, 8, 3, persist=1), _cfg(128, 128, 64, 8, 4, persist=1),
    # fewer, longer k steps (d = 2048 is 32 steps of 64: each tile's pipeline fill and epilogue weigh more), and
    # persistent programs whose tile and k loops are one pipelined loop
    _cfg(128, 128, 128, 8, 2), _cfg(128, 64, 128, 4, 3),
    _cfg(128, 128, 64, 8, 3, persist=1, flatten=1), _cfg(128, 128, 64, 8, 4, persist=1, flatten=1),
]
_DOWN_LARGE = [
    _cfg(128, 256, 64, 8, 3), _cfg(128, 256, 64, 8, 4), _cfg(128, 128, 64, 8, 4), _cfg(128, 128, 64, 4, 4),
    _cfg(64, 128, 64, 4, 4), _cfg(64, 64, 32, 4, 3),
    _cfg(128, 256, 64, 8, 3, persist=1), _cfg(128, 128, 64, 8, 4, persist=1),
    _cfg(128, 256, 64, 8, 3, persist=1, flatten=1), _cfg(128, 128, 64, 8, 4, persist=1, flatten=1),
]
# Decode: few rows, the weights stream once; narrow column blocks give enough programs to fill the SMs.
_UP_SMALL = [
    _cfg(16, 32, 128, 4, 4), _cfg(16, 64, 128, 4, 4), _cfg(16, 64, 256, 4, 3), _cfg(32, 64, 128, 4, 4),
    _cfg(64, 64, 64, 4, 4), _cfg(16, 32, 64, 2, 4),
]
_DOWN_SMALL = [
    _cfg(16, 16, 256, 4, 4), _cfg(16, 32, 128, 4, 4), _cfg(16, 64, 128, 4, 4), _cfg(32, 64, 128, 4, 4),
    _cfg(64, 64, 64, 4, 4), _cfg(16, 32, 64, 2, 4),
]
_SPAN_UP_CFGS = [_cfg_nm(bn, bk, 4, st) for bn, bk, st in ((32, 128, 4), (64, 128, 4), (32, 256, 3), (64, 64, 4),
                                                           (16, 256, 4))]
_SPAN_DOWN_CFGS = [_cfg_nm(bn, bk, 4, st) for bn, bk, st in ((32, 128, 4), (64, 128, 4), (16, 256, 4), (64, 64, 4),
                                                             (128, 64, 4))]


def _tuning(configs):
    """ROUTEFX_TRITON_TUNE=first: the first configuration only, no autotuning (tests on a GPU: correctness, not
    speed); default: all of them."""
    return configs[:1] if os.environ.get("ROUTEFX_TRITON_TUNE", "").lower() == "first" else configs


# Keys: shapes and (kernel 1) gated or not, since a gated tile needs twice the weight tiles in shared memory (a
# configuration that fits a plain FFN may not fit a gated one). Tensor dtypes are part of every key. One
# autotuner per (size class, TMA allowed): weights through tensor descriptors need 16-byte aligned rows.
_KEYS = ["D", "WMAX", "N_BUCKET"]
_LEVELS = {"small": (1,), "large": (1, 2)}  # TMA=2 needs x gathered into sorted rows first: large sizes only
_UP = {(size, tma): triton.autotune(_tuning(_with_tma(cfgs, _LEVELS[size], up=True) if tma else cfgs),
                                    key=_KEYS + ["GATED"])(kernels.up_kernel)
       for size, cfgs in (("small", _UP_SMALL), ("large", _UP_LARGE)) for tma in (False, True)}
_DOWN = {(size, tma): triton.autotune(_tuning(_with_tma(cfgs, _LEVELS[size]) if tma else cfgs),
                                      key=_KEYS)(kernels.down_kernel)
         for size, cfgs in (("small", _DOWN_SMALL), ("large", _DOWN_LARGE)) for tma in (False, True)}
# Gate and up rows interleaved in one matrix (`paired_layout`): kernel 1 may read them as one [2·BN, BK] tile
# and run one product of N = 2·BN (PAIRED=1), or as two tiles of the interleaved views (PAIRED=0); the
# autotuner picks. Descriptor configurations only (the paired tile is a descriptor load), and for large sizes
# only those that read the rows through descriptors too (TMA=2, the fastest for kernel 1 at T=8192 on an H200,
# bench/TRITON_NOTES.md v4), so that the first call autotunes no more configurations than before.
_PAIRED_LEVEL = {"small": 1, "large": 2}
UP_PAIRED_CONFIGS = {size: [triton.Config({**c.kwargs, "PAIRED": p}, num_warps=c.num_warps, num_stages=c.num_stages)
                            for p in (1, 0) for c in _with_tma(cfgs, _LEVELS[size], up=True)
                            if c.kwargs["TMA"] == _PAIRED_LEVEL[size]]
                     for size, cfgs in (("small", _UP_SMALL), ("large", _UP_LARGE))}
_UP_PAIRED = {size: triton.autotune(_tuning(cfgs), key=_KEYS + ["GATED"])(kernels.up_kernel)
              for size, cfgs in UP_PAIRED_CONFIGS.items()}
_SPAN_KEYS = ["D", "SPAN", "T"]
_SPAN_UP = triton.autotune(_tuning(_SPAN_UP_CFGS), key=_SPAN_KEYS + ["GATED"])(decode_kernels.span_up_kernel)
_SPAN_DOWN = triton.autotune(_tuning(_SPAN_DOWN_CFGS), key=_SPAN_KEYS)(decode_kernels.span_down_kernel)
# Interpreter (CPU tests): one small configuration, so test sizes cover several row, column and k blocks.
# Persistent with at most 7 programs: programs run several tiles, and some none.
_INTERP_CFG = {"BM": 16, "BN": 32, "BK": 32, "GROUP_M": 2, "PERSIST": 1, "TMA": 1, "FLATTEN": 1}
_INTERP_PROGRAMS = 7


def kernel_configs() -> dict:
    """The configurations the autotuner picked so far, per kernel and size class: {name: {key: config str}}."""
    tables = {**{f"up_{size}{'_tma' if tma else ''}": t for (size, tma), t in _UP.items()},
              **{f"up_{size}_paired": t for size, t in _UP_PAIRED.items()},
              **{f"down_{size}{'_tma' if tma else ''}": t for (size, tma), t in _DOWN.items()},
              "span_up": _SPAN_UP, "span_down": _SPAN_DOWN}
    out = {}
    for name, tuner in tables.items():
        cache = getattr(tuner, "cache", {}) or {}
        if cache:
            out[name] = {str(k): str(v) for k, v in cache.items()}
    return out


def _scratch(size: int, alignment: int, stream):
    """Triton's allocator for kernels that build tensor descriptors on the device (their global scratch)."""
    return torch.empty(size, dtype=torch.int8, device="cuda")


if not INTERPRET and hasattr(triton, "set_allocator"):
    triton.set_allocator(_scratch)


@functools.lru_cache(maxsize=None)
def _hopper_or_newer(device: torch.device) -> bool:
    """Tensor descriptors need Triton's device-side API and compute capability 9 or newer (asked once per device)."""
    return hasattr(triton.language, "make_tensor_descriptor") and torch.cuda.get_device_capability(device)[0] >= 9


def _tma_ok(*tensors) -> bool:
    """Weights through tensor descriptors (TMA): Hopper or newer, 16-byte aligned start and row stride. Read from
    the storage offset (torch's allocations are aligned far beyond 16 bytes), so that it holds for fake tensors
    while torch.compile traces the op too."""
    if not INTERPRET and not _hopper_or_newer(tensors[0].device):
        return False
    return all((t.storage_offset() * t.element_size()) % 16 == 0 and (t.stride(0) * t.element_size()) % 16 == 0
               for t in tensors)


def paired_layout(w_up: Tensor, w_gate: Optional[Tensor]) -> bool:
    """Whether w_gate and w_up are the even and odd rows of one row-major [2·F, d] matrix W (w_gate = W[0::2],
    w_up = W[1::2]): gate and up of a neuron side by side, so kernel 1 can load both as one tile.
    `interleave_gate_up` builds such views."""
    if w_gate is None or w_up.dim() != 2 or w_up.shape != w_gate.shape or w_up.dtype != w_gate.dtype:
        return False
    d = w_up.shape[1]
    try:
        same = w_up.untyped_storage().data_ptr() == w_gate.untyped_storage().data_ptr()
    except (RuntimeError, NotImplementedError):  # storages without data (fake / meta tensors)
        return False
    return (same and tuple(w_gate.stride()) == tuple(w_up.stride()) == (2 * d, 1)
            and w_up.storage_offset() == w_gate.storage_offset() + d)


def paired_matrix(w_up: Tensor, w_gate: Optional[Tensor]) -> Optional[Tensor]:
    """The interleaved [2·F, d] matrix that w_up and w_gate are views of (`paired_layout`), or None."""
    if not paired_layout(w_up, w_gate):
        return None
    return w_gate.as_strided((2 * w_up.shape[0], w_up.shape[1]), (w_up.shape[1], 1), w_gate.storage_offset())


def interleave(w_up: Tensor, w_gate: Tensor) -> Tensor:
    """One new [2·F, d] matrix with gate row n at 2n and up row n at 2n + 1 (the weights of
    `routed_ffn_paired`)."""
    if w_up.shape != w_gate.shape or w_up.dim() != 2:
        raise RoutedFFNError(f"w_up and w_gate must be [F, d] of one shape, found {tuple(w_up.shape)} and "
                             f"{tuple(w_gate.shape)}")
    return torch.stack([w_gate, w_up], dim=1).reshape(2 * w_up.shape[0], w_up.shape[1])


def interleave_gate_up(w_up: Tensor, w_gate: Tensor) -> tuple[Tensor, Tensor]:
    """(up, gate) as views of `interleave(w_up, w_gate)` (see `paired_layout`): the same values as the arguments,
    one new allocation of both together."""
    return _split_paired(interleave(w_up, w_gate))


def _check_device(x: Tensor, routes: Tensor, gates: Optional[Tensor], weights: dict) -> None:
    if x.device.type == "cuda":
        if INTERPRET:
            raise BackendError("Triton routed_ffn: CUDA tensors under TRITON_INTERPRET=1 are not supported; "
                               "unset TRITON_INTERPRET for the GPU, or pass CPU fp32 tensors to the interpreter")
    elif x.device.type == "cpu":
        if not INTERPRET:
            raise BackendError("Triton routed_ffn on CPU tensors needs Triton's interpreter (TRITON_INTERPRET=1 set "
                               "before triton is imported); supported: CUDA tensors, or CPU fp32 under the interpreter")
        if x.dtype != torch.float32:
            raise BackendError(f"Triton's interpreter computes {x.dtype} matmuls wrongly without an error, so the "
                               f"CPU path supports float32 only; found {x.dtype}")
    else:
        raise BackendError(f"Triton routed_ffn runs on CUDA (or CPU under the interpreter), found device {x.device}")
    for name, t in (("routes", routes), ("gates", gates)):
        if t is not None and t.device != x.device:
            raise RoutedFFNError(f"{name} must be on x's device {x.device}, found {t.device}")
    for name, t in weights.items():
        if t is not None and t.stride(-1) != 1:
            raise RoutedFFNError(f"{name} must have unit stride in its last dim (row-major, e.g. .contiguous()), "
                                 f"found strides {tuple(t.stride())}")


@functools.lru_cache(maxsize=None)
def _num_sms(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count


def _launch(kernel, grid, *args, **kwargs):
    """Launch a plain (not autotuned) kernel: directly under the interpreter, through wrap_triton otherwise
    (so torch.compile traces it)."""
    if INTERPRET:
        kernel[grid](*args, **kwargs)
    else:
        torch.library.wrap_triton(kernel)[grid](*args, **kwargs)


def _forward(x, routes, gates, w_up, w_gate, w_down, b_up, b_gate, b_down, ranges: List[int], activation: str,
             path: Optional[str] = None, w_gate_up: Optional[Tensor] = None):
    """Host side of the op (checks, metadata, launches); the body of the registered triton_op. `path` forces
    "decode" or "sorted" (benchmarks and tests); None picks decode for T <= DECODE_MAX_T tokens (see below).
    `w_gate_up`: the interleaved matrix whose odd / even rows w_up / w_gate are (`routed_ffn_paired` passes it;
    None: the layout is asked of the tensors, which a traced fake tensor cannot answer, hence that op)."""
    _check_static(x, routes, gates, w_up, w_gate, w_down, b_up, b_gate, b_down, ranges, activation)
    weights = {"w_up": w_up, "w_gate": w_gate, "w_down": w_down, "b_up": b_up, "b_gate": b_gate, "b_down": b_down}
    _check_device(x, routes, gates, weights)
    n_ranges = len(ranges) // 2
    d = x.shape[-1]
    n_neurons = w_up.shape[0]
    k_routes = routes.shape[-1]
    real = type(x) in (torch.Tensor, torch.nn.Parameter)  # False while traced with fake / functional tensors
    if x.numel() == 0 or routes.numel() == 0:
        return x.new_zeros(x.shape)
    if x.device.type == "cpu":  # the interpreter path may sync: check ids as the reference does
        lo, hi = (int(v) for v in torch.aminmax(routes))
        if lo < 0 or hi >= n_ranges:
            bad = lo if lo < 0 else hi
            raise RoutedFFNError(f"route id {bad} is outside [0, R={n_ranges}) for ranges {list(ranges)}")

    if n_ranges == 1 and list(ranges) == [0, n_neurons] and n_neurons > 0 and gates is None and k_routes == 1:
        act = get_activation(activation)
        up = F.linear(x, w_up, b_up)
        h = act(up) if w_gate is None else act.glu(F.linear(x, w_gate, b_gate), up)
        return F.linear(h, w_down, b_down).contiguous()

    x2 = x.reshape(-1, d).contiguous()  # [T, d]
    # Python ints: the path, the autotune bucket and the grids depend on them (under torch.compile with dynamic
    # shapes this specializes on the token count)
    n_tok = int(x2.shape[0])
    d, k_routes = int(d), int(k_routes)
    n_assign = n_tok * k_routes
    widths = [int(ranges[2 * r + 1]) - int(ranges[2 * r]) for r in range(n_ranges)]
    starts = [int(ranges[2 * r]) for r in range(n_ranges)]
    wmax = max(widths)
    nonempty = [w for w in widths if w > 0]
    if wmax == 0:  # every route is a skip
        return x.new_zeros(x.shape)

    # Decode path for few tokens, unless the ranges are many and the assignments too few to cover them (MoE
    # with T*K < experts): there the span of the used ranges holds unused ones that the sorted path skips.
    n_used = len(nonempty)
    if path == "decode" or (path is None and n_tok <= DECODE_MAX_T and (n_used <= 3 or n_assign >= n_used)):
        return _decode(x, x2, routes, gates, w_up, w_gate, w_down, b_up, b_gate, b_down, ranges, activation,
                       real).reshape(x.shape)

    meta = route_metadata(routes.reshape(-1).contiguous(), n_ranges, launch=_launch)
    rstart, rwidth = range_tables(ranges, x.device, cache=real)
    n_buckets = n_ranges + 1
    r_p2 = max(16, triton.next_power_of_2(n_buckets))
    wpad = triton.cdiv(wmax, 64) * 64
    h = torch.empty(n_assign, wpad, dtype=x.dtype, device=x.device)  # [N, WP] sorted rows
    if k_routes == 1:
        y = torch.zeros(n_tok, d, dtype=x.dtype, device=x.device)  # [T, d]: assignment id == token
    else:
        # [T*K, d] per-slot rows in x's dtype (the reference also rounds each route's output to x's dtype
        # before its fp32 sum); zeros for skip slots
        y = torch.zeros(n_assign, d, dtype=x.dtype, device=x.device)
    flat_gates = None if gates is None else gates.reshape(-1).contiguous()  # [N]
    gated = w_gate is not None
    ieee = x.dtype == torch.float32
    aligned = all(s % 16 == 0 for s in starts) and all(w % 16 == 0 for w in widths)
    n_bucket = max(16, triton.next_power_of_2(n_assign))
    size = "small" if n_assign <= _SMALL_N else "large"

    n_persist = _INTERP_PROGRAMS if INTERPRET else _num_sms(x.device)

    def up_grid(m):  # upper bound on kernel 1's tiles (sum over routes of cdiv(count, BM) * cdiv(width, BN))
        nb = [triton.cdiv(w, m["BN"]) for w in nonempty]
        bound = max(nb) * (n_assign // m["BM"]) + sum(nb)
        return (min(bound, n_persist) if m["PERSIST"] else bound,)

    def down_grid(m):
        bound = triton.cdiv(d, m["BN"]) * (n_assign // m["BM"] + len(nonempty))
        return (min(bound, n_persist) if m["PERSIST"] else bound,)

    tma = _tma_ok(w_up, w_gate if gated else w_up, w_down) and (d * x.element_size()) % 16 == 0
    if gated and w_gate_up is None:
        w_gate_up = paired_matrix(w_up, w_gate)
    paired = gated and tma and w_gate_up is not None and _tma_ok(w_gate_up)
    if INTERPRET:
        cfg = {**_INTERP_CFG, "TMA": _INTERP_CFG["TMA"] if tma else 0, "PAIRED": int(paired)}
        gather = cfg["TMA"] == 2
    else:
        gather = tma and 2 in _LEVELS[size]
    # x's rows in sorted order, for configurations that read row tiles through descriptors (TMA=2)
    xs = x2.index_select(0, (meta.order // k_routes).long()) if gather else x2
    w_pair = w_gate_up if paired else (w_gate if gated else w_up)  # read only by PAIRED configurations
    up_args = (x2, xs, w_up, w_gate if gated else w_up, w_pair, b_up if b_up is not None else w_up,
               b_gate if b_gate is not None else w_up, h,
               meta.order, meta.count, meta.offset, rstart, rwidth,
               n_buckets, d, k_routes, n_assign, n_neurons, wmax, n_bucket,
               x2.stride(0), w_up.stride(0), (w_gate if gated else w_up).stride(0), w_pair.stride(0), h.stride(0))
    up_const = dict(R_P2=r_p2, GATED=gated, HAS_BU=b_up is not None, HAS_BG=b_gate is not None,
                    IEEE=ieee, ALIGNED=aligned, **kernels.act_constants(activation))
    down_args = (h, w_down, b_down if b_down is not None else w_down,
                 flat_gates if flat_gates is not None else w_down, y,
                 meta.order, meta.count, meta.offset, rstart, rwidth,
                 n_buckets, d, n_assign, n_neurons, wmax, n_bucket, h.stride(0), w_down.stride(0), y.stride(0))
    down_const = dict(R_P2=r_p2, HAS_BD=b_down is not None, HAS_GATES=flat_gates is not None, IEEE=ieee,
                      ALIGNED=aligned)

    if INTERPRET:  # an opaque custom op here: always called with real CPU tensors
        kernels.up_kernel[up_grid(cfg)](*up_args, **up_const, **cfg)
        down_cfg = {k: v for k, v in cfg.items() if k != "PAIRED"}
        kernels.down_kernel[down_grid(cfg)](*down_args, **down_const, **down_cfg)
    else:
        wrap = torch.library.wrap_triton
        wrap(_UP_PAIRED[size] if paired else _UP[size, tma])[up_grid](*up_args, **up_const)
        wrap(_DOWN[size, tma])[down_grid](*down_args, **down_const)

    if k_routes > 1:
        y = y.view(n_tok, k_routes, d).sum(1, dtype=_ACC.get(x.dtype, x.dtype)).to(x.dtype)
    return y.reshape(x.shape)


def _decode(x, x2, routes, gates, w_up, w_gate, w_down, b_up, b_gate, b_down, ranges, activation, real):
    """Decode path (decode_kernels): the masked dense FFN over [lo, hi), the span of the non-empty ranges."""
    n_tok, d = int(x2.shape[0]), int(x2.shape[1])
    k_routes = int(routes.shape[-1])
    nonempty = [(int(ranges[2 * r]), int(ranges[2 * r + 1])) for r in range(len(ranges) // 2)
                if ranges[2 * r + 1] > ranges[2 * r]]
    lo, hi = min(s for s, _ in nonempty), max(e for _, e in nonempty)
    span = hi - lo
    rstart, rwidth = range_tables(ranges, x.device, cache=real)
    n_buckets = len(ranges) // 2 + 1
    bm = max(16, triton.next_power_of_2(n_tok))
    h = torch.empty(n_tok, triton.cdiv(span, 64) * 64, dtype=x.dtype, device=x.device)  # [T, span] masked h
    n_split = (2 if span > 64 else 1) if INTERPRET else (4 if span >= 2048 else 1)
    part = torch.empty(n_split, n_tok, d, dtype=torch.float32, device=x.device)  # [S, T, d] split-K partials
    flat_routes = routes.reshape(-1).contiguous()  # [T*K]
    flat_gates = None if gates is None else gates.reshape(-1).contiguous()
    gated = w_gate is not None
    ieee = x.dtype == torch.float32
    up_args = (x2, w_up, w_gate if gated else w_up, b_up if b_up is not None else w_up,
               b_gate if b_gate is not None else w_up, h, flat_routes,
               flat_gates if flat_gates is not None else w_up, rstart, rwidth,
               n_tok, d, k_routes, n_buckets, lo, span,
               x2.stride(0), w_up.stride(0), (w_gate if gated else w_up).stride(0), h.stride(0))
    up_const = dict(GATED=gated, HAS_BU=b_up is not None, HAS_BG=b_gate is not None,
                    HAS_GATES=flat_gates is not None, IEEE=ieee, **kernels.act_constants(activation),
                    BM=bm)
    down_args = (h, w_down, b_down if b_down is not None else w_down, part, flat_routes,
                 flat_gates if flat_gates is not None else w_down, rstart, rwidth,
                 n_tok, d, k_routes, n_buckets, lo, span, h.stride(0), w_down.stride(0))
    down_const = dict(HAS_BD=b_down is not None, HAS_GATES=flat_gates is not None, IEEE=ieee, BM=bm)
    if INTERPRET:
        cfg = {"BN": _INTERP_CFG["BN"], "BK": _INTERP_CFG["BK"]}
        decode_kernels.span_up_kernel[(triton.cdiv(span, cfg["BN"]),)](*up_args, **up_const, **cfg)
        decode_kernels.span_down_kernel[(triton.cdiv(d, cfg["BN"]), n_split)](*down_args, **down_const, **cfg)
    else:
        wrap = torch.library.wrap_triton
        wrap(_SPAN_UP)[lambda m: (triton.cdiv(span, m["BN"]),)](*up_args, **up_const)
        wrap(_SPAN_DOWN)[lambda m: (triton.cdiv(d, m["BN"]), n_split)](*down_args, **down_const)
    out = part[0] if n_split == 1 else part.sum(0)
    return out.to(x.dtype)


def _op_body(
    x: Tensor,
    routes: Tensor,
    gates: Optional[Tensor],
    w_up: Tensor,
    w_gate: Optional[Tensor],
    w_down: Tensor,
    b_up: Optional[Tensor],
    b_gate: Optional[Tensor],
    b_down: Optional[Tensor],
    ranges: List[int],
    activation: str,
) -> Tensor:
    return _forward(x, routes, gates, w_up, w_gate, w_down, b_up, b_gate, b_down, ranges, activation)


def _op_fake(x, routes, gates, w_up, w_gate, w_down, b_up, b_gate, b_down, ranges, activation):
    _check_static(x, routes, gates, w_up, w_gate, w_down, b_up, b_gate, b_down, ranges, activation)
    return x.new_empty(x.shape)


def _register(name: str, body, fake):
    """The op `name` with `body`: under the interpreter an opaque custom op with `fake` as its fake kernel
    (interpreted kernels cannot be traced by wrap_triton on every supported torch release, so torch.compile /
    export treat it as one node and call it at run time); on CUDA a triton_op, which torch.compile decomposes
    into its body, so Inductor sees the two kernels (wrap_triton) and the metadata ops, with no graph break."""
    if not INTERPRET:
        return torch.library.triton_op(name, mutates_args=())(body)
    op = torch.library.custom_op(name, mutates_args=())(body)
    op.register_fake(fake)
    return op


_op = _register("routefx_triton::routed_ffn", _op_body, _op_fake)


def _split_paired(w_gu: Tensor) -> tuple[Tensor, Tensor]:
    """(up, gate) views of an interleaved [2·F, d] gate/up matrix (gate row n at 2n, up row n at 2n + 1)."""
    if w_gu.dim() != 2 or w_gu.shape[0] % 2:
        raise RoutedFFNError(f"w_gate_up must be [2·F, d] with gate and up rows interleaved, found shape "
                             f"{tuple(w_gu.shape)}")
    return w_gu[1::2], w_gu[0::2]


def _paired_body(
    x: Tensor,
    routes: Tensor,
    gates: Optional[Tensor],
    w_gate_up: Tensor,
    w_down: Tensor,
    b_up: Optional[Tensor],
    b_gate: Optional[Tensor],
    b_down: Optional[Tensor],
    ranges: List[int],
    activation: str,
) -> Tensor:
    w_up, w_gate = _split_paired(w_gate_up)
    return _forward(x, routes, gates, w_up, w_gate, w_down, b_up, b_gate, b_down, ranges, activation,
                    w_gate_up=w_gate_up)


def _op_paired_fake(x, routes, gates, w_gate_up, w_down, b_up, b_gate, b_down, ranges, activation):
    w_up, w_gate = _split_paired(w_gate_up)
    return _op_fake(x, routes, gates, w_up, w_gate, w_down, b_up, b_gate, b_down, ranges, activation)


_op_paired = _register("routefx_triton::routed_ffn_paired", _paired_body, _op_paired_fake)


def routed_ffn(x, routes, gates, w_up, w_gate, w_down, b_up, b_gate, b_down, ranges, activation) -> Tensor:
    """Routed FFN on Triton kernels; arguments, shapes and semantics as `routefx.ir.ops.routed_ffn`.

    Raises `RoutedFFNError` for broken shapes, dtypes, strides, devices or (on CPU) route ids,
    `UnsupportedActivationError` for an unknown activation, `BackendError` for a device or dtype this
    backend cannot run (CPU without the interpreter, fp16/bf16 under the interpreter)."""
    return torch.ops.routefx_triton.routed_ffn(x, routes, gates, w_up, w_gate, w_down, b_up, b_gate, b_down,
                                               list(ranges), activation)


def routed_ffn_paired(x, routes, gates, w_gate_up, w_down, b_up, b_gate, b_down, ranges, activation) -> Tensor:
    """`routed_ffn` with the gate and up weights given as one interleaved [2·F, d] matrix (gate row n at 2n, up
    row n at 2n + 1; `interleave_gate_up` builds it): kernel 1 may then read a neuron block's gate and up rows as
    one tile and run one product of twice the width. The triton backend's lowering calls this for gated
    routed FFNs whose weights routefx made."""
    return torch.ops.routefx_triton.routed_ffn_paired(x, routes, gates, w_gate_up, w_down, b_up, b_gate, b_down,
                                                      list(ranges), activation)
