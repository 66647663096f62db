"""Triton routed FFN kernels on a CUDA GPU (skipped without one): bf16 and fp32 against the reference op run in
float64, relative error ||out - ref|| / ||ref||; outputs checked for unwritten elements by poisoning the caching
allocator with NaN first; CUDA graph capture of a decode step; torch.compile(fullgraph=True)."""

import pytest
import torch

from routefx.ir.ops import routed_ffn as reference
from tests.tolerances import TRITON_BF16_REL

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

FP32_REL = 1e-5  # IEEE fp32 dots: float32 rounding only


@pytest.fixture
def ffn(monkeypatch):
    """The Triton op module, with each autotuner cut to its first and last configuration (the last of the
    large lists is persistent): every variant compiles per configuration, and all of them would take minutes."""
    from routefx.backends.triton import ffn
    if ffn.INTERPRET:
        pytest.skip("TRITON_INTERPRET is set in this process: CUDA kernels are not compiled")
    tuners = list(ffn._UP.values()) + list(ffn._UP_PAIRED.values()) + list(ffn._DOWN.values()) + [ffn._SPAN_UP,
                                                                                                   ffn._SPAN_DOWN]
    for tuner in tuners:
        monkeypatch.setattr(tuner, "configs", [tuner.configs[0], tuner.configs[-1]])
    return ffn


def _weights(d, n, dtype, gated=True, bias=True):
    def rnd(*s, scale=1.0):
        return (torch.randn(*s, device="cuda") * scale).to(dtype)
    return [rnd(n, d, scale=d ** -0.5), rnd(n, d, scale=d ** -0.5) if gated else None, rnd(d, n, scale=n ** -0.5),
            rnd(n, scale=0.1) if bias else None, rnd(n, scale=0.1) if (bias and gated) else None,
            rnd(d, scale=0.1) if bias else None]


def _poison_allocator(nbytes):
    """Fill freed caching-allocator memory with NaN so that a kernel reading memory nothing wrote shows up."""
    junk = torch.full((nbytes // 4 + 1,), float("nan"), device="cuda")
    del junk


def _rel_err(out, x, routes, gates, w, ranges, act):
    d64 = lambda t: None if t is None else t.double()  # noqa: E731
    ref = reference(x.double(), routes, d64(gates), *(d64(t) for t in w), ranges, act)
    assert torch.isfinite(out).all(), "NaN/inf in the output (unwritten or poisoned memory read)"
    return ((out.double() - ref).norm() / ref.norm().clamp_min(1e-30)).item()


CASES = [
    # (tokens, d, F, ranges, K, gated, act): odd sizes, Duo nested / separate, MoE, all-skip rows
    (1, 200, 333, [0, 333, 0, 77, 0, 0], 1, True, "silu"),
    (37, 200, 333, [0, 333, 0, 77, 0, 0], 1, True, "silu"),
    (37, 200, 411, [0, 333, 333, 411, 5, 5], 2, False, "gelu"),
    (300, 256, 512, [0, 512, 0, 128, 0, 0], 1, True, "silu"),
    (700, 256, 512, [0, 128, 128, 256, 256, 384, 384, 512], 2, True, "silu"),
]


# T <= 64 runs the decode path by default: also force the sorted path there
CASE_PATHS = [(c, None) for c in CASES] + [(c, "sorted") for c in CASES if c[0] <= 64]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
@pytest.mark.parametrize("case,path", CASE_PATHS,
                         ids=[f"T{c[0]}-d{c[1]}-F{c[2]}-K{c[4]}-{p or 'auto'}" for c, p in CASE_PATHS])
def test_matches_float64_reference(ffn, case, dtype, path):
    """auto: the op's own choice (decode path for T <= 64, sorted otherwise); sorted: forced."""
    n_tok, d, n, ranges, k, gated, act = case
    torch.manual_seed(n_tok + d)
    w = _weights(d, n, dtype, gated=gated)
    x = torch.randn(n_tok, d, device="cuda").to(dtype)
    routes = torch.randint(0, len(ranges) // 2, (n_tok, k), device="cuda")
    gates = torch.rand(n_tok, k, device="cuda").to(dtype) if k > 1 else None
    _poison_allocator(64 << 20)
    if path is None:
        out = ffn.routed_ffn(x, routes, gates, *w, ranges, act)
    else:
        out = ffn._forward(x, routes, gates, *w, ranges, act, path=path)
    torch.cuda.synchronize()
    assert out.dtype == dtype and out.shape == x.shape
    tol = TRITON_BF16_REL if dtype == torch.bfloat16 else FP32_REL
    err = _rel_err(out, x, routes, gates, w, ranges, act)
    assert err <= tol, f"relative error {err:.3g} > {tol}"


def test_all_skip_rows_are_exact_zeros(ffn):
    d, n = 128, 256
    w = _weights(d, n, torch.bfloat16)
    x = torch.randn(50, d, device="cuda", dtype=torch.bfloat16)
    routes = torch.randint(0, 2, (50, 2), device="cuda")
    routes[:7] = 2  # both slots skip
    _poison_allocator(64 << 20)
    out = ffn.routed_ffn(x, routes, torch.rand(50, 2, device="cuda"), *w, [0, 256, 0, 64, 0, 0], "silu")
    assert torch.equal(out[:7], torch.zeros_like(out[:7]))
    assert (out[7:].abs().sum(-1) > 0).all()


@pytest.mark.parametrize("path", [None, "sorted"], ids=["auto", "sorted"])
def test_cuda_graph_decode_step(ffn, path):
    """Capture one decode step (8 tokens, Duo routes) in a CUDA graph, replay it with new routes and inputs:
    capture fails on any host synchronisation, and the replays must match the reference on the new data."""
    d, n, n_tok = 256, 512, 8
    ranges = [0, 512, 0, 128, 0, 0]
    w = _weights(d, n, torch.bfloat16)
    x = torch.randn(n_tok, d, device="cuda", dtype=torch.bfloat16)
    routes = torch.randint(0, 3, (n_tok, 1), device="cuda")
    def step():
        return ffn._forward(x, routes, None, *w, ranges, "silu", path=path)

    step()  # warm-up: autotune, compile, range tables
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = step()
    for seed in range(3):
        torch.manual_seed(100 + seed)
        x.copy_(torch.randn(n_tok, d, device="cuda"))
        routes.copy_(torch.randint(0, 3, (n_tok, 1), device="cuda"))
        graph.replay()
        torch.cuda.synchronize()
        err = _rel_err(out, x, routes, None, w, ranges, "silu")
        assert err <= TRITON_BF16_REL, f"replay {seed}: relative error {err:.3g}"


def test_torch_compile_fullgraph(ffn):
    d, n, n_tok = 256, 512, 64
    ranges = [0, 512, 0, 128, 0, 0]
    w = _weights(d, n, torch.bfloat16)

    def f(x, routes):
        return torch.ops.routefx_triton.routed_ffn(torch.nn.functional.rms_norm(x, (d,)), routes, None, *w,
                                                   ranges, "silu") + x

    x = torch.randn(n_tok, d, device="cuda", dtype=torch.bfloat16)
    routes = torch.randint(0, 3, (n_tok, 1), device="cuda")
    compiled = torch.compile(f, fullgraph=True)
    out = compiled(x, routes)
    routes2 = torch.randint(0, 3, (n_tok, 1), device="cuda")
    out2 = compiled(x, routes2)
    for o, r in ((out, routes), (out2, routes2)):
        xd = x.double()
        ref = reference(torch.nn.functional.rms_norm(xd, (d,)), r, None, *(t.double() for t in w), ranges,
                        "silu") + xd
        rel = ((o.double() - ref).norm() / ref.norm()).item()
        assert rel <= TRITON_BF16_REL, f"compiled op vs float64 reference: relative error {rel:.3g}"


def _cuda_ffn():
    from routefx.backends.triton import ffn
    if ffn.INTERPRET:
        pytest.skip("TRITON_INTERPRET is set in this process: CUDA kernels are not compiled")
    return ffn


def _each_configuration(monkeypatch, ffn, tuners: dict, trials: list, w, seed: int, d: int = 256,
                        n_tok: int = 700) -> None:
    """Run the op with each (tuner name, configuration) of `trials` alone (every other tuner in `tuners` held at
    its first configuration) on a Duo-shaped problem (n_tok tokens, F=512, small = first 128) and assert that
    every configuration that fits the GPU matches the float64 reference. The autotuner keeps the fastest, so a
    configuration that is fast and wrong must fail here; the ones that do not fit are left out, as the
    autotuner leaves them out."""
    import triton
    ranges = [0, 512, 0, 128, 0, 0]
    torch.manual_seed(seed)
    x = torch.randn(n_tok, d, device="cuda").to(torch.bfloat16)
    routes = torch.randint(0, 3, (n_tok, 1), device="cuda")
    first = {name: next(c for t, c in trials if t == name) for name in tuners}
    bad, ran = [], 0
    for which, c in trials:
        for name, tuner in tuners.items():
            monkeypatch.setattr(tuner, "configs", [c if name == which else first[name]])
            tuner.cache.clear()
        _poison_allocator(64 << 20)
        try:
            out = ffn._forward(x, routes, None, *w, ranges, "silu", path="sorted")
            torch.cuda.synchronize()
        except triton.runtime.errors.OutOfResources:
            continue
        ran += 1
        err = _rel_err(out, x, routes, None, w, ranges, "silu")
        if err > TRITON_BF16_REL:
            bad.append((which, str(c), err))
    for tuner in tuners.values():
        tuner.cache.clear()
    assert ran >= len(trials) // 2, f"only {ran} of {len(trials)} configurations could run"
    assert not bad, bad


@pytest.mark.parametrize("level", [0, 1, 2], ids=["pointers", "tma-weights", "tma-all"])
def test_every_large_configuration_matches_reference(monkeypatch, level):
    """Each configuration the autotuners may pick for large token counts (pointers, descriptors, persistent,
    flattened tile and k loops), kernel 1's and kernel 2's, alone against the reference; one descriptor level
    per test (each configuration compiles)."""
    ffn = _cuda_ffn()
    w = _weights(256, 512, torch.bfloat16)
    tma = ffn._tma_ok(w[0], w[1], w[2])
    if level and not tma:
        pytest.skip("tensor descriptors need a Hopper or newer GPU")
    levels = ffn._LEVELS["large"]
    trials = [(name, c) for name, cfgs in (("up", ffn._UP_LARGE), ("down", ffn._DOWN_LARGE))
              for c in (ffn._with_tma(cfgs, levels, up=name == "up") if tma else cfgs) if c.kwargs["TMA"] == level]
    _each_configuration(monkeypatch, ffn, {"up": ffn._UP["large", tma], "down": ffn._DOWN["large", tma]}, trials,
                        w, seed=3)


@pytest.mark.parametrize("size", ["small", "large"])
def test_every_paired_configuration_matches_reference(monkeypatch, size):
    """Kernel 1 on gate/up rows interleaved in one matrix (what the triton backend's lowering lays out): every
    configuration of its paired autotuner (one product of N = 2·BN, PAIRED=1, or two over the interleaved views,
    PAIRED=0), alone against the reference, for the small (200 tokens) and the large (700) size class; d = 200
    leaves a k tail for the descriptor-weights (TMA=1) configurations of the small class."""
    ffn = _cuda_ffn()
    w = _weights(200, 512, torch.bfloat16)
    w[0], w[1] = ffn.interleave_gate_up(w[0], w[1])
    assert ffn.paired_layout(w[0], w[1])
    if not ffn._tma_ok(w[0], w[1], w[2]):
        pytest.skip("tensor descriptors need a Hopper or newer GPU")
    trials = [("up", c) for c in ffn.UP_PAIRED_CONFIGS[size]]
    _each_configuration(monkeypatch, ffn, {"up": ffn._UP_PAIRED[size]}, trials, w, seed=4, d=200,
                        n_tok=200 if size == "small" else 700)
