"""Structure recognition on every covered family: blocks, forms, FFN kinds and sizes come from the graph."""
import copy
import re

import pytest
import torch
from torch import nn

import routefx
from routefx.ir import recognize
from tests.zoo import ZOO, example_inputs


def _without_paths(d):
    if isinstance(d, dict):
        return {k: _without_paths(v) for k, v in d.items() if k != "path"}
    if isinstance(d, list):
        return [_without_paths(v) for v in d]
    return d


@pytest.mark.parametrize("name", list(ZOO))
def test_recognises_blocks_and_ffns(name, zoo_capture):
    exp = ZOO[name].expect
    model, gm = zoo_capture(name)
    ir = recognize(gm)
    assert len(ir.blocks) == exp.blocks
    if hasattr(model, "config"):
        assert len(ir.blocks) == model.config.num_hidden_layers
    assert ir.hidden_size == exp.hidden
    if exp.patterns is not None:
        assert [a.pattern for b in ir.blocks for a in b.attention] == list(exp.patterns)
    assert [b.index for b in ir.blocks] == list(range(exp.blocks))
    for b, kind, width in zip(ir.blocks, exp.kinds, exp.inter):
        assert b.form == exp.form, (b.index, b.form)
        assert len(b.attention) == 1
        f = b.ffn
        assert (f.kind, f.reason) == (kind, None)
        assert f.hidden_size == exp.hidden
        assert f.intermediate_size == width
        assert f.activation == exp.activation
        if kind == "moe":
            assert (f.num_experts, f.top_k, f.shared_expert_size) == (exp.num_experts, exp.top_k,
                                                                      exp.shared_expert)
        else:
            assert f.has_bias == exp.has_bias
            assert f.num_experts is None
    # names come from nn_module_stack: every block has its own path
    assert len({b.path for b in ir.blocks}) == exp.blocks


@pytest.mark.parametrize("name", list(ZOO))
def test_recognition_ignores_module_names(name, zoo_capture):
    _, gm = zoo_capture(name)
    ir = recognize(gm).to_dict()
    stripped = copy.deepcopy(gm)
    for n in stripped.graph.nodes:
        n.meta.pop("nn_module_stack", None)
    bare = recognize(stripped).to_dict()
    assert all(b["path"] is None for b in bare["blocks"])
    assert _without_paths(bare) == _without_paths(ir)


def test_hf_paths_name_modules(zoo_capture):
    _, gm = zoo_capture("llama")
    ir = recognize(gm)
    assert [b.path for b in ir.blocks] == [f"model.layers.{i}" for i in range(3)]
    assert [b.ffn.path for b in ir.blocks] == [f"model.layers.{i}.mlp" for i in range(3)]
    _, gm = zoo_capture("bert")
    assert [b.path for b in recognize(gm).blocks] == [f"encoder.layer.{i}" for i in range(3)]


@pytest.mark.parametrize("name", ["llama", "bert", "plain_resized"])
def test_user_model_untouched(name):
    entry = ZOO[name]
    model = entry.build().train()  # a training-mode model must come back in training mode
    before = {k: v.clone() for k, v in model.state_dict(keep_vars=False).items()}
    args, kwargs = example_inputs(entry, batch=1, seq=5)  # batch 1 is widened internally
    ir = routefx.inspect(model, args, kwargs)
    assert len(ir.blocks) == entry.expect.blocks
    after = model.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert all(m.training for m in model.modules())


def test_capture_is_dynamic_in_batch_and_sequence(zoo_capture):
    model, gm = zoo_capture("llama")
    for b, s in [(1, 3), (3, 11)]:
        args, kwargs = example_inputs(ZOO["llama"], batch=b, seq=s)
        kwargs["use_cache"] = False
        with torch.no_grad():
            ref = model(*args, **kwargs).logits
        torch.testing.assert_close(gm(*args, **kwargs).logits, ref, rtol=0, atol=1e-5)


def test_print_and_json(zoo_capture):
    import json
    _, gm = zoo_capture("qwen2moe")
    ir = recognize(gm)
    text = str(ir)
    assert "6 top-2 +shared 40" in text and "model.layers.1" in text
    d = json.loads(ir.to_json())
    assert [b["ffn"]["kind"] for b in d["blocks"]] == ["moe", "gated", "moe"]


# ---- refusals -------------------------------------------------------------------------------------------

class _Mlp(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(12, 24), nn.Linear(24, 12)

    def forward(self, x):
        return self.b(torch.relu(self.a(x))) + x


class _Cnn(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1)

    def forward(self, x):
        y = torch.relu(self.a(x))
        return y + self.b(y)


def test_refuses_mlp():
    with pytest.raises(routefx.UnsupportedModelError, match=r"1 residual branch.*\(1 ffn\).*none holds an attention op"):
        routefx.inspect(_Mlp(), (torch.randn(2, 5, 12),))


def test_refuses_cnn():
    with pytest.raises(routefx.UnsupportedModelError, match=r"no residual connection.*conv2d"):
        routefx.inspect(_Cnn(), (torch.randn(2, 3, 8, 8),))


class _ThreeLayerFFN(nn.Module):
    def __init__(self, d, f):
        super().__init__()
        self.a, self.b, self.c = nn.Linear(d, f), nn.Linear(f, f), nn.Linear(f, d)

    def forward(self, x):
        return self.c(torch.relu(self.b(torch.relu(self.a(x)))))


class _OddAct(nn.Module):
    def __init__(self, d, f):
        super().__init__()
        self.a, self.b = nn.Linear(d, f), nn.Linear(f, d)

    def forward(self, x):
        return self.b(torch.sin(self.a(x)))


@pytest.mark.parametrize("ffn,reason", [
    (_ThreeLayerFFN, r"3 matrix products"),
    (_OddAct, r"activation computed by .*sin.* matches none of"),
])
def test_unclassifiable_ffn_is_reported_not_guessed(ffn, reason):
    from tests.zoo import PlainLM
    torch.manual_seed(0)
    model = PlainLM(ffn=ffn).eval()
    ir = routefx.inspect(model, (torch.randint(0, 89, (2, 6)),))
    assert len(ir.blocks) == 3
    for b in ir.blocks:
        assert b.ffn.kind == "unknown"
        assert b.ffn.intermediate_size is None
        assert re.search(reason, b.ffn.reason), b.ffn.reason
    assert "unknown (" in str(ir)
