"""Triton routed FFN kernels under TRITON_INTERPRET=1 (CPU, fp32) against the reference op run in float64.

Sizes are odd on purpose (1 and 37 tokens, d=96 and d=40, ranges that are multiples of no block size) and small:
the interpreter runs each program in Python. The interpreter's block sizes (ffn._INTERP_CFG: BM=16, BN=32,
BK=32) make these cases cover several row, neuron and reduction blocks, partial blocks and masked reductions.
"""

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from routefx.errors import BackendError, RoutedFFNError, UnsupportedActivationError
from routefx.ir.activations import ACTIVATIONS
from tests.ir.test_routed_ffn import REF_UNITS
from routefx.ir.ops import routed_ffn as reference
from tests.tolerances import TRITON_VS_REF

pytestmark = pytest.mark.interpreter


def _weights(d, n, gated=True, bias=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    rnd = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    return dict(
        w_up=rnd(n, d) / d ** 0.5, w_gate=rnd(n, d) / d ** 0.5 if gated else None, w_down=rnd(d, n) / n ** 0.5,
        b_up=rnd(n) * 0.1 if bias else None, b_gate=rnd(n) * 0.1 if (bias and gated) else None,
        b_down=rnd(d) * 0.1 if bias else None,
    )


def _run_both(ffn, x, routes, gates, w, ranges, act, path=None):
    """(triton fp32 output, float64 reference rounded to fp32). path None: the registered op (which picks the
    decode path for T <= 64 tokens); "sorted" / "decode": that path forced."""
    args = (x, routes, gates, w["w_up"], w["w_gate"], w["w_down"], w["b_up"], w["b_gate"], w["b_down"], ranges, act)
    out = ffn.routed_ffn(*args) if path is None else ffn._forward(*args, path=path)
    d64 = lambda t: None if t is None else t.double()  # noqa: E731
    ref = reference(x.double(), routes, d64(gates), *(d64(w[k]) for k in
                    ("w_up", "w_gate", "w_down", "b_up", "b_gate", "b_down")), ranges, act)
    return out, ref.float()


def _assert_close(out, ref):
    """Max abs error within TRITON_VS_REF, scaled by the output's magnitude when that exceeds 1 (squared
    activations reach |y| ~ 1e3 on random weights, where fp32 rounding alone gives ~1e-4)."""
    assert out.shape == ref.shape and out.dtype == torch.float32
    assert torch.isfinite(out).all()
    err = (out - ref).abs().max().item()
    tol = TRITON_VS_REF * max(1.0, ref.abs().max().item())
    assert err <= tol, f"max abs error {err:.3g} > {tol:.3g}"


# Duo-like nested (small = first k of big), separate small branch after the big one, and a skip route.
NESTED = [0, 150, 0, 37, 0, 0]           # F=150: big, small k=37, skip
SEPARATE = [0, 150, 150, 191, 191, 191]  # F=191: big, separate small module, skip
MOE = [0, 23, 23, 46, 46, 69, 69, 92]    # F=92: 4 equal experts of width 23


PATHS = pytest.mark.parametrize("path", ["sorted", "decode"])


@PATHS
@pytest.mark.parametrize("n_tok", [1, 37])
@pytest.mark.parametrize("ranges", [NESTED, SEPARATE], ids=["nested", "separate"])
def test_duo_routes_k1(interpreter, n_tok, ranges, path):
    d, n = 96, max(ranges)
    w = _weights(d, n, seed=n_tok)
    x = torch.randn(n_tok, d)
    routes = torch.randint(0, 3, (n_tok, 1))
    routes[0, 0] = 0  # at least one big route, so the single token case is not a skip
    out, ref = _run_both(interpreter, x, routes, None, w, ranges, "silu", path)
    _assert_close(out, ref)


@PATHS
def test_k2_gates_repeats_and_skips(interpreter, path):
    d, n_tok = 96, 37
    w = _weights(d, 150, seed=1)
    x = torch.randn(2, n_tok, d)[1:]  # [1, 37, d] with leading batch dims
    routes = torch.randint(0, 3, (1, n_tok, 2))
    routes[0, :4] = torch.tensor([[0, 0], [1, 1], [2, 2], [1, 0]])  # repeats (contributions add) and all-skip
    gates = torch.rand(1, n_tok, 2)
    out, ref = _run_both(interpreter, x, routes, gates, w, NESTED, "silu", path)
    _assert_close(out, ref)
    assert torch.equal(out[0, 2], torch.zeros(d)), "a token whose routes are all skips must get exact zeros"


@PATHS
def test_moe_equal_experts_k2(interpreter, path):
    d, n_tok = 40, 21  # d not a multiple of BK=32: masked reduction in kernel 1
    w = _weights(d, 92, bias=False, seed=2)
    x = torch.randn(n_tok, d)
    routes = torch.stack([torch.randperm(4)[:2] for _ in range(n_tok)])  # top-2 of 4 distinct experts
    gates = torch.softmax(torch.randn(n_tok, 2), -1)
    out, ref = _run_both(interpreter, x, routes, gates, w, MOE, "silu", path)
    _assert_close(out, ref)


@PATHS
def test_all_skip_gives_exact_zeros(interpreter, path):
    d = 96
    w = _weights(d, 150, seed=3)
    x = torch.randn(5, d)
    for routes in (torch.full((5, 1), 2), torch.full((5, 2), 2)):
        out, _ = _run_both(interpreter, x, routes, None, w, NESTED, "silu", path)
        assert torch.equal(out, torch.zeros_like(x))
    out, _ = _run_both(interpreter, x, routes - 1, None, w, [0, 0, 0, 0], "silu", path)  # every range empty
    assert torch.equal(out, torch.zeros_like(x))


@pytest.mark.parametrize("gated", [True, False], ids=["gated", "plain"])
@pytest.mark.parametrize("act", sorted(ACTIVATIONS))
def test_each_activation(interpreter, act, gated):
    """Each activation on both paths (sorted, then decode)."""
    d, n_tok = 40, 6
    w = _weights(d, 50, gated=gated, seed=4)
    x = torch.randn(n_tok, d)
    routes = torch.tensor([[0], [1], [0], [1], [0], [2]])
    for path in ("sorted", "decode"):
        out, ref = _run_both(interpreter, x, routes, None, w, [0, 50, 13, 30, 0, 0], act, path)
        _assert_close(out, ref)


@pytest.mark.parametrize("act", sorted(REF_UNITS))
def test_clamped_units(interpreter, act):
    """The clamped gated units (parametrised names) on both paths, with biases, K = 2 and a skip route; their
    limits sit inside the projections' range so that every clamp engages."""
    d, n_tok = 40, 9
    w = _weights(d, 50, seed=5)
    x = torch.randn(n_tok, d, generator=torch.Generator().manual_seed(6))
    routes = torch.tensor([[0, 1], [1, 2], [0, 0], [2, 2], [1, 0], [0, 2], [1, 1], [0, 1], [2, 0]])
    gates = torch.rand(n_tok, 2, generator=torch.Generator().manual_seed(7))
    for path in ("sorted", "decode"):
        out, ref = _run_both(interpreter, x, routes, gates, w, [0, 50, 13, 30, 0, 0], act, path)
        _assert_close(out, ref)
        plain, _ = _run_both(interpreter, x, routes, gates, w, [0, 50, 13, 30, 0, 0], "silu", path)
        assert (plain - ref).abs().max() > 1e-2


@pytest.mark.parametrize("gated", [True, False], ids=["gated", "plain"])
def test_xielu(interpreter, gated):
    """xIELU's four learned parameters reach the epilogue (both paths, biases, K = 2): a differently parametrised
    xIELU gives other outputs."""
    d, n_tok = 40, 9
    w = _weights(d, 50, gated=gated, seed=8)
    x = torch.randn(n_tok, d, generator=torch.Generator().manual_seed(9))
    routes = torch.tensor([[0, 1], [1, 2], [0, 0], [2, 2], [1, 0], [0, 2], [1, 1], [0, 1], [2, 0]])
    gates = torch.rand(n_tok, 2, generator=torch.Generator().manual_seed(10))
    act = "xielu;alpha_p=0.7;alpha_n=1.3;beta=0.4;eps=-0.05"
    for path in ("sorted", "decode"):
        out, ref = _run_both(interpreter, x, routes, gates, w, [0, 50, 13, 30, 0, 0], act, path)
        _assert_close(out, ref)
        other, _ = _run_both(interpreter, x, routes, gates, w, [0, 50, 13, 30, 0, 0],
                             "xielu;alpha_p=0.7;alpha_n=0.6;beta=0.4;eps=-0.05", path)
        assert (other - ref).abs().max() > 1e-3


@PATHS
def test_dense_full_range_and_gated_single_range(interpreter, path):
    d, n_tok = 96, 37
    w = _weights(d, 70, seed=5)
    x = torch.randn(n_tok, d)
    routes = torch.zeros(n_tok, 1, dtype=torch.int64)
    out, ref = _run_both(interpreter, x, routes, None, w, [0, 70], "gelu", path)  # dense fast path (F.linear)
    _assert_close(out, ref)
    out, ref = _run_both(interpreter, x, routes, torch.rand(n_tok, 1), w, [0, 70], "gelu", path)  # gated
    _assert_close(out, ref)


def test_compiles_fullgraph(interpreter):
    d, n_tok = 40, 9
    w = _weights(d, 50, seed=6)
    args = [w[k] for k in ("w_up", "w_gate", "w_down", "b_up", "b_gate", "b_down")]

    def f(x, routes):
        return torch.ops.routefx_triton.routed_ffn(x * 2.0, routes, None, *args, [0, 50, 0, 20, 0, 0], "silu") + 1.0

    x = torch.randn(n_tok, d)
    routes = torch.randint(0, 3, (n_tok, 1))
    out = torch.compile(f, fullgraph=True, backend="aot_eager")(x, routes)
    ref = reference(2.0 * x.double(), routes, None, *(a.double() for a in args), [0, 50, 0, 20, 0, 0], "silu") + 1.0
    _assert_close(out, ref.float())


def _errors_case():
    w = _weights(40, 50, seed=7)
    return torch.randn(3, 40), torch.zeros(3, 1, dtype=torch.int64), w


def test_refuses_low_precision_on_interpreter(interpreter):
    x, routes, w = _errors_case()
    wb = {k: None if v is None else v.bfloat16() for k, v in w.items()}
    with pytest.raises(BackendError, match="float32 only; found torch.bfloat16"):
        interpreter.routed_ffn(x.bfloat16(), routes, None, *wb.values(), [0, 50, 0, 0], "silu")


def test_wrapper_errors(interpreter):
    x, routes, w = _errors_case()
    args = list(w.values())
    with pytest.raises(RoutedFFNError, match="route id 5 is outside"):
        interpreter.routed_ffn(x, torch.full((3, 1), 5), None, *args, [0, 50, 0, 0], "silu")
    with pytest.raises(RoutedFFNError, match="unit stride in its last dim"):
        bad = list(args)
        bad[2] = w["w_down"].t().contiguous().t()  # [d, F] view with stride (1, d)
        interpreter.routed_ffn(x, routes, None, *bad, [0, 50, 0, 0], "silu")
    with pytest.raises(RoutedFFNError, match="w_up must have shape"):
        interpreter.routed_ffn(x[:, :39], routes, None, *args, [0, 50, 0, 0], "silu")
    with pytest.raises(RoutedFFNError, match="routes must be int64"):
        interpreter.routed_ffn(x, routes.int(), None, *args, [0, 50, 0, 0], "silu")
    with pytest.raises(UnsupportedActivationError, match="unsupported activation 'swish2'"):
        interpreter.routed_ffn(x, routes, None, *args, [0, 50, 0, 0], "swish2")


@st.composite
def _problems(draw):
    n = draw(st.integers(1, 70))  # F
    n_ranges = draw(st.integers(1, 4))
    ranges = []
    for _ in range(n_ranges):
        a, b = sorted((draw(st.integers(0, n)), draw(st.integers(0, n))))
        ranges += [a, b]  # overlapping, empty and width-1 ranges all allowed
    return dict(n=n, ranges=ranges, d=draw(st.sampled_from([16, 40, 96])), n_tok=draw(st.integers(1, 40)),
                k=draw(st.integers(1, 3)), gates=draw(st.booleans()), gated=draw(st.booleans()),
                bias=draw(st.booleans()), act=draw(st.sampled_from(sorted(ACTIVATIONS))),
                path=draw(st.sampled_from(["sorted", "decode"])), seed=draw(st.integers(0, 2 ** 16)))


@settings(max_examples=12, deadline=None, suppress_health_check=list(HealthCheck))
@given(_problems())
def test_random_problems_match_reference(interpreter, p):
    torch.manual_seed(p["seed"])
    w = _weights(p["d"], p["n"], gated=p["gated"], bias=p["bias"], seed=p["seed"])
    x = torch.randn(p["n_tok"], p["d"])
    routes = torch.randint(0, len(p["ranges"]) // 2, (p["n_tok"], p["k"]))
    gates = torch.rand(p["n_tok"], p["k"]) if p["gates"] else None
    out, ref = _run_both(interpreter, x, routes, gates, w, p["ranges"], p["act"], p["path"])
    _assert_close(out, ref)


@pytest.mark.parametrize("d,n", [(40, 192), (37, 191)], ids=["aligned-rows", "unaligned-rows"])
@pytest.mark.parametrize("tma", [0, 1, 2], ids=["pointers", "weight-descriptors", "all-descriptors"])
def test_weights_through_pointers_or_tensor_descriptors(interpreter, monkeypatch, tma, d, n):
    """Both kernels read weight tiles by pointer loads or through tensor descriptors (TMA, zero-filled past the
    weight's bounds, so neurons past a route's width are computed and never stored), and with TMA=2 their row
    tiles too (x gathered into sorted rows first; rows past a route's count are computed, never stored);
    weights whose row stride is not a multiple of 16 bytes (d=37 or F=191 in fp32) fall back to pointers."""
    monkeypatch.setitem(interpreter._INTERP_CFG, "TMA", tma)
    w = _weights(d, n, seed=8)
    assert interpreter._tma_ok(w["w_up"], w["w_gate"], w["w_down"]) == (d % 4 == 0 and n % 4 == 0)
    n_tok = 37
    x = torch.randn(n_tok, d)
    routes = torch.randint(0, 3, (n_tok, 2))
    ranges = [0, 160, 160, n, 0, n]  # big, separate small, all neurons (16-aligned starts when n % 16 == 0)
    out, ref = _run_both(interpreter, x, routes, torch.rand(n_tok, 2), w, ranges, "gelu_tanh", "sorted")
    _assert_close(out, ref)


@pytest.mark.parametrize("tma", [1, 2], ids=["weight-descriptors", "all-descriptors"])
@pytest.mark.parametrize("d,n,ranges", [(40, 192, [0, 192, 0, 48, 0, 0]), (48, 160, [0, 160, 0, 37, 0, 0])],
                         ids=["d40-F192-nested", "d48-F160-k37"])
def test_interleaved_gate_up_runs_one_product(interpreter, monkeypatch, tma, d, n, ranges):
    """Gate and up rows interleaved in one matrix (`interleave_gate_up`): kernel 1 loads both as one [2·BN, BK]
    tile and splits the [BM, 2·BN] product into gate and up columns (PAIRED=1, checked by spying on the launch);
    the result equals the reference on the same values. d=40 leaves a k tail of 8 past BK=32 (by pointers)."""
    monkeypatch.setitem(interpreter._INTERP_CFG, "TMA", tma)
    w = _weights(d, n, seed=9)
    up, gate = interpreter.interleave_gate_up(w["w_up"], w["w_gate"])
    assert torch.equal(up, w["w_up"]) and torch.equal(gate, w["w_gate"])
    assert interpreter.paired_layout(up, gate) and not interpreter.paired_layout(w["w_up"], w["w_gate"])
    assert not interpreter.paired_layout(gate, up)  # the order matters: gate rows first
    w = {**w, "w_up": up, "w_gate": gate}
    seen = []
    real = interpreter.kernels.up_kernel

    class Spy:
        def __getitem__(self, grid):
            def launch(*args, **kw):
                seen.append(kw["PAIRED"])
                return real[grid](*args, **kw)
            return launch

    monkeypatch.setattr(interpreter.kernels, "up_kernel", Spy())
    n_tok = 37
    x = torch.randn(n_tok, d)
    routes = torch.randint(0, 3, (n_tok, 1))
    out, ref = _run_both(interpreter, x, routes, None, w, ranges, "silu", "sorted")
    assert seen == [1]
    _assert_close(out, ref)


def test_paired_op_equals_the_op_on_separate_weights(interpreter):
    """`routed_ffn_paired` (what the triton backend lowers gated FFNs to) on `interleave(w_up, w_gate)` equals the
    op on the separate weights, K=2 with gates and biases; a matrix of an odd number of rows is refused."""
    d, n = 48, 160
    w = _weights(d, n, seed=10)
    w_gu = interpreter.interleave(w["w_up"], w["w_gate"])
    assert torch.equal(w_gu[0::2], w["w_gate"]) and torch.equal(w_gu[1::2], w["w_up"])
    x = torch.randn(37, d)
    routes = torch.randint(0, 3, (37, 2))
    gates = torch.rand(37, 2)
    ranges = [0, 160, 0, 37, 0, 0]
    out = interpreter.routed_ffn_paired(x, routes, gates, w_gu, w["w_down"], w["b_up"], w["b_gate"], w["b_down"],
                                        ranges, "silu")
    _, ref = _run_both(interpreter, x, routes, gates, w, ranges, "silu")
    _assert_close(out, ref)
    with pytest.raises(RoutedFFNError, match=r"w_gate_up must be \[2·F, d\]"):
        interpreter.routed_ffn_paired(x, routes, gates, w_gu[:-1], w["w_down"], None, None, None, ranges, "silu")
