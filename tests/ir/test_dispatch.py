"""The grouped dispatch `routed_ffn` runs (routefx/ir/dispatch.py) against the plain per-route reference
(`routed_ffn_reference`) and the float64 per-token loop, on the cases where a sort-based dispatch goes wrong:
K = 1 and K = 2 with gates, routes no token takes, every token on one route, one token, skips mixed in, a token
taking the same route twice, biases, bf16."""
import pytest
import torch

from routefx.errors import RoutedFFNError
from routefx.ir.ops import routed_ffn, routed_ffn_reference
from tests.ir.test_routed_ffn import naive_routed_ffn
from tests.tolerances import EXACT_REWRITE, OP_VS_LOOP, OP_VS_LOOP_BF16

E, W, D = 5, 6, 13  # experts, expert width, hidden (odd on purpose)
RANGES = [v for e in range(E) for v in (e * W, (e + 1) * W)]


def _weights(gen, dtype=torch.float32, bias=False, gated=True, n=E * W):
    w = lambda *s: (torch.randn(*s, generator=gen) * 0.3).to(dtype)  # noqa: E731
    return (w(n, D), w(n, D) if gated else None, w(D, n), w(n) if bias else None,
            w(n) if bias and gated else None, w(D) if bias else None)


def _check(x, routes, gates, weights, ranges, act="silu", tol=OP_VS_LOOP):
    args = (x, routes, gates, *weights, ranges, act)
    out, ref = routed_ffn(*args), routed_ffn_reference(*args)
    assert out.shape == x.shape and out.dtype == x.dtype
    # same ops in the same order per token as the reference for K <= 2
    assert (out.float() - ref.float()).abs().max().item() <= EXACT_REWRITE
    loop = naive_routed_ffn(*args)
    torch.testing.assert_close(out.double(), loop, atol=tol, rtol=tol)
    return out


def _topk(gen, T, k=2):
    scores = torch.randn(T, E, generator=gen).softmax(-1)
    g, r = scores.topk(k, -1)
    return r, g / g.sum(-1, keepdim=True)


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("gated", [True, False])
def test_top2_with_gates(bias, gated):
    gen = torch.Generator().manual_seed(0)
    routes, gates = _topk(gen, 45)
    _check(torch.randn(45, D, generator=gen), routes, gates, _weights(gen, bias=bias, gated=gated), RANGES,
           act="gelu" if not gated else "silu")


def test_k1_without_gates_and_leading_dims():
    gen = torch.Generator().manual_seed(1)
    routes = torch.randint(0, E, (3, 7, 1), generator=gen)
    _check(torch.randn(3, 7, D, generator=gen), routes, None, _weights(gen, bias=True), RANGES)


def test_routes_no_token_takes_cost_nothing_and_change_nothing():
    """Only experts 1 and 3 are used: the others' weights are NaN, which would poison the output if they ran."""
    gen = torch.Generator().manual_seed(2)
    w_up, w_gate, w_down, *_ = _weights(gen)
    for e in (0, 2, 4):
        for w in (w_up, w_gate):
            w[e * W:(e + 1) * W] = float("nan")
        w_down[:, e * W:(e + 1) * W] = float("nan")
    routes = torch.tensor([[1, 3], [3, 1], [1, 3], [3, 3]])
    gates = torch.rand(4, 2, generator=gen)
    out = _check(torch.randn(4, D, generator=gen), routes, gates, (w_up, w_gate, w_down, None, None, None), RANGES)
    assert torch.isfinite(out).all()


def test_every_token_on_one_expert():
    gen = torch.Generator().manual_seed(3)
    routes = torch.full((65, 2), 4)  # both slots on expert 4: its contributions add
    _check(torch.randn(65, D, generator=gen), routes, torch.rand(65, 2, generator=gen), _weights(gen), RANGES)


def test_one_token():
    gen = torch.Generator().manual_seed(4)
    routes, gates = _topk(gen, 1)
    _check(torch.randn(1, D, generator=gen), routes, gates, _weights(gen, bias=True), RANGES)


def test_skip_ranges_mixed_with_experts_are_exactly_zero():
    """An empty range (AdaptExperts' skip, route E) adds nothing, not even b_down; a token whose routes are all
    skips gets exact zeros."""
    gen = torch.Generator().manual_seed(5)
    ranges = RANGES + [0, 0]
    routes = torch.tensor([[0, E], [E, E], [2, 1], [E, 3]])
    out = _check(torch.randn(4, D, generator=gen), routes, torch.rand(4, 2, generator=gen),
                 _weights(gen, bias=True), ranges)
    assert torch.equal(out[1], torch.zeros(D))


def test_k3_unequal_overlapping_ranges():
    """Not only experts: nested ranges of different widths (Duo-like) with three routes per token."""
    gen = torch.Generator().manual_seed(6)
    ranges = [0, 0, 0, 4, 0, 30, 10, 30]
    routes = torch.randint(0, 4, (13, 3), generator=gen)
    _check(torch.randn(13, D, generator=gen), routes, torch.rand(13, 3, generator=gen), _weights(gen), ranges)


def test_bfloat16_accumulates_like_the_reference():
    gen = torch.Generator().manual_seed(7)
    routes, gates = _topk(gen, 45)
    _check(torch.randn(45, D, generator=gen).bfloat16(), routes, gates.bfloat16(),
           _weights(gen, dtype=torch.bfloat16, bias=True), RANGES, tol=OP_VS_LOOP_BF16)


@pytest.mark.parametrize("bad", [-1, E])
def test_route_id_out_of_range_is_refused(bad):
    gen = torch.Generator().manual_seed(8)
    routes = torch.tensor([[0, 1], [bad, 2]])
    with pytest.raises(RoutedFFNError, match=f"route id {bad} is outside"):
        routed_ffn(torch.randn(2, D), routes, torch.rand(2, 2), *_weights(gen), RANGES, "silu")
