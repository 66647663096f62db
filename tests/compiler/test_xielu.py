"""xIELU (Apertus): an activation with four parameters learned per layer, two of them softplus of stored weights.
Read from the graph by fitting the probed function and snapping each parameter to the learned scalars the
activation reads; the name carries the values (`xielu;alpha_p=..;alpha_n=..;beta=..;eps=..`). Checked against
transformers' own XIELUActivation, on the routed_ffn reference, ONNX, and Duo on an Apertus model (the Triton
epilogue: tests/backends/triton/test_ffn_interpreter.py)."""
import copy

import pytest
import torch
import torch.nn.functional as F
import transformers as hf
from transformers.activations import XIELUActivation

import routefx
from routefx.errors import UnsupportedActivationError
from routefx.ir.activations import get_activation, parse_activation
from tests.compare import assert_compiles_to_model, assert_duo_routes_the_mlps, padded_ids
from tests.test_cuda import DEVICES
from tests.tolerances import ACTIVATION
from tests.zoo import hf_model

V = 112


def _params(act: XIELUActivation) -> dict:
    """The module's effective parameters, as its forward computes them."""
    return dict(alpha_p=float(F.softplus(act.alpha_p)), alpha_n=float(act.beta + F.softplus(act.alpha_n)),
                beta=float(act.beta), eps=float(act.eps))


def test_xielu_equals_transformers_module():
    act = XIELUActivation(alpha_p_init=0.6, alpha_n_init=1.3, beta=0.4, dtype=torch.float32)
    spec = ";".join(["xielu"] + [f"{k}={v!r}" for k, v in _params(act).items()])
    x = torch.linspace(-8, 8, 1001)
    with torch.no_grad():
        torch.testing.assert_close(get_activation(spec)(x), act(x), rtol=ACTIVATION, atol=ACTIVATION)


@pytest.mark.parametrize("name, why", [("xielu;alpha_p=1.0;alpha_n=1.0;beta=0.5", "needs all four"),
                                       ("silu;beta=0.5", "parameters of xielu"),
                                       ("xielu;alpha_p=1.0;alpha_n=1.0;beta=0.5;eps=x", "not a number")])
def test_malformed_xielu_names(name, why):
    with pytest.raises(UnsupportedActivationError, match=why):
        parse_activation(name)


@pytest.fixture(scope="module")
def apertus():
    cfg = hf.ApertusConfig(vocab_size=V, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                           num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                           pad_token_id=0, dtype=torch.float32)
    model = hf_model(hf.ApertusForCausalLM, cfg)
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():            # each layer's parameters of its own (HF initialises them all alike)
        for layer in model.model.layers:
            layer.mlp.act_fn.alpha_p.copy_(torch.randn(1, generator=g) * 0.5)
            layer.mlp.act_fn.alpha_n.copy_(torch.randn(1, generator=g) * 0.5)
    return model


def _inputs(seed=3, batch=2, seq=11, pad=3):
    return padded_ids(V, seed, batch, seq, pad, low=3)


def test_apertus_reads_each_layers_xielu(apertus):
    ids, mask = _inputs()
    cm = assert_compiles_to_model(apertus, ids, mask)["onnx"]
    for b, layer in zip(cm.ir.blocks, apertus.model.layers):
        assert (b.ffn.kind, b.ffn.intermediate_size) == ("mlp", 128)
        spec = parse_activation(b.ffn.activation)
        assert spec.base == "xielu"
        want = _params(layer.mlp.act_fn)
        assert {k: getattr(spec, k) for k in want} == pytest.approx(want, rel=1e-7)


@pytest.mark.parametrize("device", DEVICES)
def test_xielu_read_on_the_models_device(apertus, device):
    """The learned scalars are read where the weights live (the probe runs on CPU: they are copied there once)."""
    model = copy.deepcopy(apertus).to(device)
    ids, mask = (t.to(device) for t in _inputs())
    ir = routefx.inspect(model, example_inputs=(ids,), example_kwargs={"attention_mask": mask})
    for b, layer in zip(ir.blocks, apertus.model.layers):
        spec = parse_activation(b.ffn.activation)
        want = _params(layer.mlp.act_fn)
        assert {k: getattr(spec, k) for k in want} == pytest.approx(want, rel=1e-7)


@pytest.mark.parametrize("backend", ["eager", "onnx"])
def test_duo_on_apertus(apertus, backend):
    """Duo's routes equal the model's own MLPs routed per token with the plan's routers and neuron orders."""
    cal = [dict(zip(("input_ids", "attention_mask"), _inputs(seed=s, batch=4, seq=16, pad=0))) for s in range(3)]
    assert_duo_routes_the_mlps(apertus, cal, *_inputs(seed=9), [f"model.layers.{i}.mlp" for i in range(3)], backend)


@pytest.mark.parametrize("gated", [False, True])
def test_routed_ffn_xielu_matches_a_float64_loop(gated):
    """routed_ffn and its reference with xielu, plain and gated, K=2 with gates, against a per-token float64 loop
    that writes xIELU out."""
    from routefx.ir.ops import routed_ffn, routed_ffn_reference
    from tests.ir.test_routed_ffn import TOLERANCES, make_args
    name = "xielu;alpha_p=0.7;alpha_n=1.2;beta=0.4;eps=-1e-06"
    args = make_args(lead=(3, 7), d=13, n=45, ranges=[0, 20, 20, 45, 7, 7], k_routes=2, with_gates=True,
                     gated=gated, activation=name, seed=5)
    x, routes, gates, w_up, w_gate, w_down = (None if a is None else a.double() if a.is_floating_point() else a
                                              for a in args[:6])
    ranges, d = args[9], x.shape[-1]

    def xielu(z):
        return torch.where(z > 0, 0.7 * z * z + 0.4 * z, 1.2 * (torch.expm1(z.clamp(max=-1e-6)) - z) + 0.4 * z)
    out = torch.zeros(x.reshape(-1, d).shape, dtype=torch.float64)
    for t, (xt, rt, gt) in enumerate(zip(x.reshape(-1, d), routes.reshape(-1, 2), gates.reshape(-1, 2))):
        for r, g in zip(rt.tolist(), gt):
            s, e = ranges[2 * r], ranges[2 * r + 1]
            h = xielu((w_gate if gated else w_up)[s:e] @ xt) * ((w_up[s:e] @ xt) if gated else 1.0)
            out[t] += g * (w_down[:, s:e] @ h)
    want = out.reshape(x.shape).float()
    torch.testing.assert_close(routed_ffn(*args), want, **TOLERANCES[torch.float32])
    torch.testing.assert_close(routed_ffn_reference(*args), want, **TOLERANCES[torch.float32])
