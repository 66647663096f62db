"""`routefx::routed_ffn` against a naive per-token loop in float64, plus its errors, fake kernel and export."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from routefx.errors import RoutedFFNError, UnsupportedActivationError
from routefx.ir.activations import ACTIVATIONS, get_activation, parse_activation
from routefx.ir.ops import routed_ffn, routed_ffn_reference
from tests.tolerances import ACTIVATION, OP_VS_LOOP, OP_VS_LOOP_BF16

# Tolerances of the op (output dtype) against the float64 naive loop (tests/tolerances.py).
TOLERANCES = {
    torch.float32: dict(atol=OP_VS_LOOP, rtol=OP_VS_LOOP),
    torch.bfloat16: dict(atol=OP_VS_LOOP_BF16, rtol=OP_VS_LOOP_BF16),
}

# Independent float64 definitions of every activation (not the registry under test).
_SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)
REF_ACTIVATIONS = {
    "silu": lambda x: x / (1 + torch.exp(-x)),
    "gelu": lambda x: 0.5 * x * (1 + torch.erf(x / math.sqrt(2.0))),
    "gelu_tanh": lambda x: 0.5 * x * (1 + torch.tanh(_SQRT_2_OVER_PI * (x + 0.044715 * x**3))),
    "relu": lambda x: torch.where(x > 0, x, torch.zeros_like(x)),
    "relu2": lambda x: torch.where(x > 0, x * x, torch.zeros_like(x)),
    "sigmoid": lambda x: 1 / (1 + torch.exp(-x)),
    "quick_gelu": lambda x: x / (1 + torch.exp(-1.702 * x)),
    "identity": lambda x: x,
}

# Clamped gated units (parametrised names), each written out independently in float64 as (gate side, up side),
# with limits inside the O(1) range of the test projections so that every clamp engages.
REF_UNITS = {
    # GPT-OSS's form (its limit is 7; here 0.5 / 0.7)
    "swish;alpha=1.702;gate_max=0.5;up_limit=0.7;up_add=1.0": (
        lambda g: torch.minimum(g, torch.tensor(0.5, dtype=g.dtype)) / (1 + torch.exp(
            -1.702 * torch.minimum(g, torch.tensor(0.5, dtype=g.dtype)))),
        lambda u: torch.maximum(torch.minimum(u, torch.tensor(0.7, dtype=u.dtype)), torch.tensor(-0.7, dtype=u.dtype))
        + 1.0),
    # DeepSeek-V4 / GLM-5: silu(min(g, L)) * clamp(u, -L, L)
    "silu;gate_max=0.3;up_limit=0.4": (
        lambda g: torch.minimum(g, torch.tensor(0.3, dtype=g.dtype)) / (1 + torch.exp(
            -torch.minimum(g, torch.tensor(0.3, dtype=g.dtype)))),
        lambda u: torch.maximum(torch.minimum(u, torch.tensor(0.4, dtype=u.dtype)), torch.tensor(-0.4, dtype=u.dtype))),
    # Step-3.7: min(gelu(g), L) * clamp(u, -L, L)
    "gelu;act_max=0.2;up_limit=0.6": (
        lambda g: torch.minimum(0.5 * g * (1 + torch.erf(g / math.sqrt(2.0))), torch.tensor(0.2, dtype=g.dtype)),
        lambda u: torch.maximum(torch.minimum(u, torch.tensor(0.6, dtype=u.dtype)), torch.tensor(-0.6, dtype=u.dtype))),
}

SIZES = [1, 7, 13, 45, 65]


def naive_routed_ffn(x, routes, gates, w_up, w_gate, w_down, b_up, b_gate, b_down, ranges, activation):
    """Loop over tokens t and route slots k, slicing the weights explicitly; float64 throughout."""
    act, up_side = REF_UNITS.get(activation) or (REF_ACTIVATIONS[activation], lambda u: u)
    f64 = lambda t: None if t is None else t.double()  # noqa: E731
    w_up, w_gate, w_down, b_up, b_gate, b_down = map(f64, (w_up, w_gate, w_down, b_up, b_gate, b_down))
    d, k_routes = x.shape[-1], routes.shape[-1]
    xs = x.double().reshape(-1, d)  # [T, d]
    rs = routes.reshape(-1, k_routes)  # [T, K]
    gs = None if gates is None else gates.double().reshape(-1, k_routes)  # [T, K]
    out = torch.zeros_like(xs)
    for t in range(xs.shape[0]):
        for k in range(k_routes):
            r = int(rs[t, k])
            s, e = ranges[2 * r], ranges[2 * r + 1]
            if s == e:
                continue
            up = w_up[s:e] @ xs[t] + (0 if b_up is None else b_up[s:e])  # [F_r]
            if w_gate is None:
                h = act(up)
            else:
                h = act(w_gate[s:e] @ xs[t] + (0 if b_gate is None else b_gate[s:e])) * up_side(up)
            y = w_down[:, s:e] @ h + (0 if b_down is None else b_down)  # [d]
            out[t] += (1.0 if gs is None else gs[t, k]) * y
    return out.reshape(x.shape)


def make_args(
    *,
    lead,
    d,
    n,
    ranges,
    k_routes=1,
    with_gates=False,
    gated=True,
    b_up=False,
    b_gate=False,
    b_down=False,
    activation="silu",
    routes=None,
    seed=0,
    dtype=torch.float32,
):
    """Positional args of routed_ffn. x ~ N(0, 1), weights ~ N(0, 1/fan_in) so every activation stays O(1)."""
    gen = torch.Generator().manual_seed(seed)
    randn = lambda *shape, scale=1.0: (torch.randn(*shape, generator=gen) * scale).to(dtype)  # noqa: E731
    num_ranges = len(ranges) // 2
    x = randn(*lead, d)
    if routes is None:
        routes = torch.randint(0, num_ranges, (*lead, k_routes), generator=gen)
    gates = torch.rand(*routes.shape, generator=gen).to(dtype) if with_gates else None
    w_up = randn(n, d, scale=d**-0.5)
    w_gate = randn(n, d, scale=d**-0.5) if gated else None
    w_down = randn(d, n, scale=max(n, 1) ** -0.5)
    bu = randn(n, scale=0.1) if b_up else None
    bg = randn(n, scale=0.1) if (b_gate and gated) else None
    bd = randn(d, scale=0.1) if b_down else None
    return (x, routes, gates, w_up, w_gate, w_down, bu, bg, bd, list(ranges), activation)


@st.composite
def range_lists(draw, n, min_ranges=1, max_ranges=4, allow_empty=True):
    """Flat [s0, e0, s1, e1, ...] with 0 <= s <= e <= n; ranges may be empty and may overlap."""
    flat = []
    for _ in range(draw(st.integers(min_ranges, max_ranges))):
        start = draw(st.integers(0, n))
        empty = allow_empty and draw(st.booleans())
        end = start if empty else draw(st.integers(start, n))
        flat += [start, end]
    return flat


@st.composite
def cases(draw):
    d, n = draw(st.sampled_from(SIZES)), draw(st.sampled_from(SIZES))
    lead = draw(st.lists(st.integers(1, 4), min_size=1, max_size=3))  # rank 1/2/3, T >= 1
    k_routes = draw(st.sampled_from([1, 2]))
    gated = draw(st.booleans())
    return dict(
        lead=lead,
        d=d,
        n=n,
        ranges=draw(range_lists(n)),
        k_routes=k_routes,
        with_gates=True if k_routes == 2 else draw(st.booleans()),  # top-2 style always gated
        gated=gated,
        b_up=draw(st.booleans()),
        b_gate=gated and draw(st.booleans()),
        b_down=draw(st.booleans()),
        activation=draw(st.sampled_from(sorted(ACTIVATIONS) + (sorted(REF_UNITS) if gated else []))),
        seed=draw(st.integers(0, 2**31 - 1)),
    )


def test_reference_activations_cover_registry():
    assert set(REF_ACTIVATIONS) == set(ACTIVATIONS)


@pytest.mark.parametrize("name", sorted(ACTIVATIONS))
def test_activation_matches_formula(name):
    x = torch.linspace(-6, 6, 97, dtype=torch.float64)
    y = get_activation(name)(x.float())
    assert y.dtype == torch.float32 and y.shape == x.shape
    torch.testing.assert_close(y, REF_ACTIVATIONS[name](x).float(), atol=ACTIVATION, rtol=ACTIVATION)


@settings(max_examples=25, deadline=None)
@given(cases())
def test_matches_naive_loop(case):
    args = make_args(**case)
    y = routed_ffn(*args)
    assert y.shape == args[0].shape and y.dtype == args[0].dtype
    torch.testing.assert_close(y, naive_routed_ffn(*args).float(), **TOLERANCES[torch.float32])


@settings(max_examples=25, deadline=None)
@given(case=cases(), data=st.data())
def test_all_skip_is_exact_zeros(case, data):
    # Every route points at an empty range: no matmul runs, and b_down is not added.
    n = case["n"]
    starts = data.draw(st.lists(st.integers(0, n), min_size=1, max_size=4))
    case = dict(case, ranges=[v for s in starts for v in (s, s)])
    case["b_down"] = True
    y = routed_ffn(*make_args(**case))
    assert torch.equal(y, torch.zeros_like(y))


@pytest.mark.parametrize("activation", sorted(ACTIVATIONS))
@pytest.mark.parametrize("gated", [True, False])
@pytest.mark.parametrize("bias", [True, False])
def test_dense_fast_path_matches_nn_linear(activation, gated, bias):
    d, n, lead = 45, 65, (3, 5)
    torch.manual_seed(0)
    up, gate, down = torch.nn.Linear(d, n, bias=bias), torch.nn.Linear(d, n, bias=bias), torch.nn.Linear(n, d, bias=bias)
    act = get_activation(activation)
    x = torch.randn(*lead, d)
    with torch.no_grad():
        expected = down(act(gate(x)) * up(x)) if gated else down(act(up(x)))
        y = routed_ffn(
            x,
            torch.zeros(*lead, 1, dtype=torch.int64),
            None,
            up.weight,
            gate.weight if gated else None,
            down.weight,
            up.bias,
            gate.bias if gated else None,
            down.bias,
            [0, n],
            activation,
        )
    torch.testing.assert_close(y, expected, atol=ACTIVATION, rtol=0)


def test_single_token_without_leading_dims():
    # x [d], routes [K]: T = 1.
    args = make_args(lead=(), d=13, n=7, ranges=[0, 3, 3, 7], k_routes=2, with_gates=True, b_down=True)
    y = routed_ffn(*args)
    assert y.shape == (13,)
    torch.testing.assert_close(y, naive_routed_ffn(*args).float(), **TOLERANCES[torch.float32])


def test_same_route_twice_adds_up():
    args = make_args(lead=(4,), d=7, n=13, ranges=[2, 11], routes=torch.zeros(4, 2, dtype=torch.int64), b_down=True)
    args_k1 = (args[0], args[1][:, :1], *args[2:])
    torch.testing.assert_close(routed_ffn(*args), 2 * routed_ffn(*args_k1))


def test_non_contiguous_x():
    args = list(make_args(lead=(5, 3), d=13, n=45, ranges=[0, 20, 20, 45], k_routes=2, with_gates=True))
    args[0] = args[0].transpose(0, 1).contiguous().transpose(0, 1)  # same values, transposed strides
    assert not args[0].is_contiguous()
    torch.testing.assert_close(routed_ffn(*args), naive_routed_ffn(*args).float(), **TOLERANCES[torch.float32])


def test_empty_tokens():
    args = make_args(lead=(0, 3), d=7, n=13, ranges=[0, 13], k_routes=2, with_gates=True, b_down=True)
    y = routed_ffn(*args)
    assert y.shape == (0, 3, 7)


def test_bfloat16_matches_the_float64_loop():
    args = make_args(
        lead=(3, 7), d=65, n=45, ranges=[0, 30, 10, 45, 5, 5], k_routes=2, with_gates=True, b_down=True,
        dtype=torch.bfloat16,
    )
    y = routed_ffn(*args)
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y, naive_routed_ffn(*args).to(torch.bfloat16), **TOLERANCES[torch.bfloat16])


def test_bfloat16_accumulates_in_fp32():
    """One token, K = 64 distinct routes: route 0 contributes 256, routes 1..63 contribute 0.5 each (every value
    exact in bf16). Summed in fp32 the result is 287.5, which rounds to 288 in bf16; accumulated in bf16, each
    0.5 added to 256 (bf16 spacing 2 there) is lost and the result is 256."""
    K = 64
    x = torch.ones(1, 1, dtype=torch.bfloat16)                          # [T=1, d=1]
    w_up = torch.ones(2, 1, dtype=torch.bfloat16)                       # neurons 0 and 1: h = relu(x) = 1
    w_down = torch.tensor([[256.0, 0.5]], dtype=torch.bfloat16)         # [d=1, n=2]
    ranges = [0, 1] + [1, 2] * (K - 1)                                  # route 0: neuron 0; routes 1..63: neuron 1
    routes = torch.arange(K).unsqueeze(0)                               # [1, K]: every route once
    y = routed_ffn(x, routes, None, w_up, None, w_down, None, None, None, ranges, "relu")
    assert y.dtype == torch.bfloat16 and y.item() == 288.0              # bf16(256 + 63 * 0.5 = 287.5)


# --- errors ---------------------------------------------------------------------------------------------------


def _args(**overrides):
    base = dict(zip(
        ["x", "routes", "gates", "w_up", "w_gate", "w_down", "b_up", "b_gate", "b_down", "ranges", "activation"],
        make_args(lead=(2, 3), d=7, n=13, ranges=[0, 5, 5, 13], k_routes=2, with_gates=True),
    ))
    base.update(overrides)
    return base


@pytest.mark.parametrize(
    "overrides, match",
    [
        (dict(ranges=[0, 5, 5]), r"even length, found length 3"),
        (dict(ranges=[5, 2]), r"range 0 = \[5, 2\) must satisfy 0 <= start <= end <= F=13"),
        (dict(ranges=[0, 5, 5, 14]), r"range 1 = \[5, 14\) must satisfy .* F=13"),
        (dict(ranges=[-1, 5, 5, 13]), r"range 0 = \[-1, 5\)"),
        (dict(w_up=torch.zeros(13, 8)), r"w_up must have shape \[F, d=7\], found \[13, 8\]"),
        (dict(w_gate=torch.zeros(12, 7)), r"w_gate must have shape \[13, 7\] \(F=13, d=7\), found \[12, 7\]"),
        (dict(w_down=torch.zeros(13, 7)), r"w_down must have shape \[7, 13\]"),
        (dict(b_down=torch.zeros(13)), r"b_down must have shape \[7\]"),
        (dict(b_up=torch.zeros(7)), r"b_up must have shape \[13\]"),
        (dict(w_gate=None, b_gate=torch.zeros(13)), r"b_gate was given without w_gate"),
        (dict(w_down=torch.zeros(7, 13, dtype=torch.float64)), r"w_down must match x's dtype"),
        (dict(routes=torch.zeros(2, 3, 2, dtype=torch.int32)), r"routes must be int64, found torch.int32"),
        (dict(routes=torch.zeros(3, 2, 2, dtype=torch.int64)), r"routes must have shape .* = \[2, 3, K\], found \[3, 2, 2\]"),
        (dict(gates=torch.ones(2, 3, 1)), r"gates must have the shape of routes \[2, 3, 2\]"),
        (dict(routes=torch.full((2, 3, 2), 2)), r"route id 2 is outside \[0, R=2\)"),
        (dict(routes=torch.full((2, 3, 2), -1)), r"route id -1 is outside \[0, R=2\)"),
    ],
)
def test_errors(overrides, match):
    with pytest.raises(RoutedFFNError, match=match):
        routed_ffn(**_args(**overrides))


def test_unknown_activation():
    with pytest.raises(UnsupportedActivationError,
                       match=r"unsupported activation 'swiglu': unknown base 'swiglu'; supported: .*gelu_tanh.*silu"):
        routed_ffn(**_args(activation="swiglu"))
    with pytest.raises(ValueError, match=r"'tanh'.*quick_gelu, relu, relu2"):
        get_activation("tanh")


@pytest.mark.parametrize("name, match", [
    ("silu;gate_max", r"bad parameter 'gate_max'"),
    ("silu;limit=7", r"bad parameter 'limit=7'"),
    ("silu;gate_max=1;gate_max=2", r"bad parameter 'gate_max=2'"),
    ("silu;up_limit=seven", r"up_limit is not a number"),
    ("silu;up_add=inf", r"up_add is not finite"),
    ("swish", r"alpha is the parameter of swish"),
    ("silu;alpha=2", r"alpha is the parameter of swish"),
    ("silu;up_limit=-1", r"up_limit must be >= 0"),
])
def test_bad_activation_parameters(name, match):
    with pytest.raises(UnsupportedActivationError, match=match):
        routed_ffn(**_args(activation=name))


@pytest.mark.parametrize("name", sorted(REF_UNITS))
def test_activation_names_round_trip(name):
    assert parse_activation(name).name == name
    assert parse_activation("silu;up_add=0.0").name == "silu"   # the default is not written


def test_plain_ffn_refuses_up_side_parameters():
    with pytest.raises(RoutedFFNError, match=r"parameters on the up side of a gated unit, but w_gate is None"):
        routed_ffn(**_args(w_gate=None, activation="silu;up_limit=1.0"))
    # gate-side parameters apply to a plain FFN's one product
    args = make_args(lead=(3, 5), d=13, n=45, ranges=[0, 20, 20, 45], gated=False, activation="silu;act_max=0.1")
    x, w_up, w_down, ranges = args[0].reshape(-1, 13).double(), args[3].double(), args[5].double(), args[9]
    rows = []
    for t, r in enumerate(args[1].reshape(-1).tolist()):     # min(silu(x Wu^T), 0.1) Wd^T per token, float64
        s, e = ranges[2 * r], ranges[2 * r + 1]
        h = torch.minimum(torch.nn.functional.silu(x[t] @ w_up[s:e].t()), torch.tensor(0.1, dtype=torch.float64))
        rows.append(h @ w_down[:, s:e].t())
    want = torch.stack(rows).reshape(args[0].shape).float()
    torch.testing.assert_close(routed_ffn(*args), want, **TOLERANCES[torch.float32])
    plain = list(args)
    plain[-1] = "silu"
    assert (routed_ffn(*plain) - want).abs().max() > 1e-2   # the cap engages


@pytest.mark.parametrize("name", sorted(REF_UNITS))
@pytest.mark.parametrize("bias", [False, True])
def test_clamped_units_match_the_float64_loop(name, bias):
    args = make_args(lead=(4, 9), d=13, n=45, ranges=[0, 20, 20, 45, 7, 7], k_routes=2, with_gates=True,
                     b_up=bias, b_gate=bias, b_down=bias, activation=name, seed=3)
    want = naive_routed_ffn(*args).float()
    torch.testing.assert_close(routed_ffn(*args), want, **TOLERANCES[torch.float32])
    torch.testing.assert_close(routed_ffn_reference(*args), want, **TOLERANCES[torch.float32])
    # the clamps engage: the same call without them differs
    base = list(args)
    base[-1] = parse_activation(name).base if parse_activation(name).base != "swish" else "quick_gelu"
    assert (routed_ffn(*base) - want).abs().max() > 1e-2


def test_fake_kernel_checks_shapes_but_not_route_ids():
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        y = routed_ffn(**_args(routes=torch.full((2, 3, 2), 7)))  # ids are data: not checked on fake tensors
        assert y.shape == (2, 3, 7)
        with pytest.raises(RoutedFFNError, match=r"w_up must have shape"):
            routed_ffn(**_args(w_up=torch.zeros(13, 8)))


# --- registration, opcheck, export ----------------------------------------------------------------------------

_OPCHECK_SAMPLES = {
    "gated_top2_bias": make_args(
        lead=(2, 3), d=7, n=13, ranges=[0, 5, 5, 5, 3, 13], k_routes=2, with_gates=True, b_up=True, b_gate=True,
        b_down=True, activation="gelu",
    ),
    "plain_dense": make_args(lead=(5,), d=13, n=45, ranges=[0, 45], gated=False, activation="relu2"),
    "single_token": make_args(lead=(1, 1), d=45, n=7, ranges=[0, 0, 0, 7], activation="quick_gelu"),
}


@pytest.mark.parametrize("name", sorted(_OPCHECK_SAMPLES))
def test_opcheck(name):
    torch.library.opcheck(
        torch.ops.routefx.routed_ffn.default,
        _OPCHECK_SAMPLES[name],
        test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_static", "test_aot_dispatch_dynamic"),
    )


class _TinyRoutedFFN(torch.nn.Module):
    def __init__(self, d=13, n=45, ranges=(0, 20, 20, 20, 10, 45)):
        super().__init__()
        gen = torch.Generator().manual_seed(0)
        self.w_up = torch.nn.Parameter(torch.randn(n, d, generator=gen) * d**-0.5)
        self.w_gate = torch.nn.Parameter(torch.randn(n, d, generator=gen) * d**-0.5)
        self.w_down = torch.nn.Parameter(torch.randn(d, n, generator=gen) * n**-0.5)
        self.b_down = torch.nn.Parameter(torch.randn(d, generator=gen))
        self.ranges = list(ranges)

    def forward(self, x, routes, gates):
        return torch.ops.routefx.routed_ffn.default(
            x, routes, gates, self.w_up, self.w_gate, self.w_down, None, None, self.b_down, self.ranges, "silu"
        )


def test_torch_export_roundtrip():
    model = _TinyRoutedFFN().eval()
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(2, 5, 13, generator=gen)
    routes = torch.randint(0, 3, (2, 5, 2), generator=gen)
    gates = torch.softmax(torch.randn(2, 5, 2, generator=gen), dim=-1)
    batch = torch.export.Dim("batch")
    ep = torch.export.export(model, (x, routes, gates), dynamic_shapes=({0: batch}, {0: batch}, {0: batch}))
    targets = [node.target for node in ep.graph.nodes if node.op == "call_function"]
    assert torch.ops.routefx.routed_ffn.default in targets

    with torch.no_grad():
        torch.testing.assert_close(ep.module()(x, routes, gates), model(x, routes, gates), atol=0, rtol=0)
        x4, r4, g4 = torch.randn(4, 5, 13), torch.randint(0, 3, (4, 5, 2)), torch.rand(4, 5, 2)
        torch.testing.assert_close(ep.module()(x4, r4, g4), model(x4, r4, g4), atol=0, rtol=0)
        torch.testing.assert_close(
            model(x4, r4, g4),
            naive_routed_ffn(x4, r4, g4, model.w_up, model.w_gate, model.w_down, None, None, model.b_down,
                             model.ranges, "silu").float(),
            **TOLERANCES[torch.float32],
        )
