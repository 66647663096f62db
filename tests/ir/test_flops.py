"""FLOP counts from the graph against closed forms written out here from the configs."""
import pytest
import sympy
import torch
import transformers as hf

import routefx
from routefx.ir import capture, recognize
from routefx.ir.flops import S, count_flops
from tests.flop_reference import FAMILIES, counted_by_torch, uncounted_per_token
from tests.zoo import ZOO, example_inputs


def _llama_formula(seq, d=64, H=8, Hkv=2, F=176, V=211, L=3):
    Dh = d // H
    proj = 2 * d * (H * Dh) + 2 * 2 * d * (Hkv * Dh) + 2 * (H * Dh) * d   # q, k, v, o
    attn = 2 * H * (seq + 1) / 2 * (Dh + Dh)                              # causal: (S+1)/2 keys per query
    ffn = 2 * 3 * d * F                                                   # gate, up, down
    return L * (proj + attn + ffn) + 2 * d * V                            # + LM head


def _bert_formula(seq, d=48, H=4, F=96, L=2):
    Dh = d // H
    proj = 4 * 2 * d * d                  # q, k, v, attention output
    attn = 2 * H * seq * (Dh + Dh)        # bidirectional: S keys per query
    ffn = 2 * 2 * d * F
    pooler = 2 * d * d / seq              # the pooler runs on one token per sequence
    return L * (proj + attn + ffn) + pooler


def _capture(model, seq=9):
    ids = torch.randint(1, 50, (2, seq))
    gm = capture(model, (ids,), {"attention_mask": torch.ones_like(ids)})
    return gm, recognize(gm)


def test_llama_flops_closed_form():
    cfg = hf.LlamaConfig(vocab_size=211, hidden_size=64, intermediate_size=176, num_hidden_layers=3,
                         num_attention_heads=8, num_key_value_heads=2, bos_token_id=1, eos_token_id=2)
    gm, ir = _capture(hf.LlamaForCausalLM(cfg).eval())
    assert ir.causal and all(a.window is None for b in ir.blocks for a in b.attention)
    fc = count_flops(gm, ir)
    for seq in (17, 512):
        assert fc.at(seq)["total"] == pytest.approx(_llama_formula(seq), rel=1e-12)
    assert sympy.simplify(fc.total - _llama_formula(S)) == 0
    # per block: attention and FFN separately
    b = fc.at(512)["blocks"][1]
    assert b["ffn"] == 2 * 3 * 64 * 176


def test_bert_flops_closed_form():
    cfg = hf.BertConfig(vocab_size=97, hidden_size=48, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=96, max_position_embeddings=600)
    gm, ir = _capture(hf.BertModel(cfg).eval())
    assert not ir.causal
    fc = count_flops(gm, ir)
    for seq in (13, 500):
        assert fc.at(seq)["total"] == pytest.approx(_bert_formula(seq), rel=1e-12)


def test_sliding_window_counts_at_most_w_keys():
    w = 5
    cfg = hf.MistralConfig(vocab_size=60, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                           num_attention_heads=4, num_key_value_heads=2, sliding_window=w, bos_token_id=1,
                           eos_token_id=2)
    gm, ir = _capture(hf.MistralForCausalLM(cfg).eval())
    (att,) = ir.blocks[0].attention
    assert (att.causal, att.window, att.pattern) == (True, w, "sliding")
    fc = count_flops(gm, ir)
    H, Dh = 4, 8
    for seq in (3, 5, 40):
        keys = sum(min(i, w) for i in range(1, seq + 1)) / seq      # mean keys per query
        assert fc.at(seq)["blocks"][0]["attention"] == pytest.approx(
            2 * 32 * 32 * 2 + 2 * 2 * 32 * 16 + 2 * H * keys * 2 * Dh, rel=1e-12)


def test_compile_report_flops_and_realised_routes():
    entry = ZOO["llama"]                                   # tests/zoo.py: d=48, 4 heads, 2 KV heads, F=104, V=101
    args, kwargs = example_inputs(entry, seq=11)
    cm = routefx.compile(entry.build(), routefx.policies.PruneLayers(layers=[0]), example_inputs=args,
                         example_kwargs=kwargs)
    f = cm.report.flops_per_token
    full = _llama_formula(11, d=48, H=4, Hkv=2, F=104, V=101, L=3)
    assert f["S"] == 11
    assert f["before"] == pytest.approx(full, rel=1e-12)
    assert f["after"] == pytest.approx(_llama_formula(11, d=48, H=4, Hkv=2, F=104, V=101, L=2), rel=1e-12)
    assert len(f["blocks_before"]) == 3 and len(f["blocks_after"]) == 2
    # static routes: realised FLOPs equal the static count at the batch's length
    assert cm.flops_per_token([{"input_ids": args[0], **kwargs}]) == pytest.approx(f["after"])


@pytest.mark.parametrize("name", FAMILIES)
def test_dense_count_matches_torch_flop_counter(name):
    """routefx's count of the captured graph against torch's FlopCounterMode on the model (tests/flop_reference)."""
    entry = ZOO[name]
    model = entry.build()
    B, seq = 2, 10
    args, kwargs = example_inputs(entry, batch=B, seq=seq)
    expected = counted_by_torch(model, entry, args, kwargs) / (B * seq) + uncounted_per_token(model, entry, seq)
    gm = capture(model, args, kwargs)
    assert count_flops(gm, recognize(gm)).at(seq)["total"] == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize("name", ["plain", "plain_parallel"])
def test_graph_specialised_to_one_shape_counts_per_token(name):
    """A graph without batch or sequence symbols (torch.export without dynamic dims, as a torch.compile piece
    Dynamo specialised): the per-call count divided by that call's tokens, equal to the torch reference; the
    compile report's ratio is defined (it divided by a zero count before)."""
    from routefx.compiler.compile import _flops_summary
    entry = ZOO[name]
    model = entry.build()
    B, seq = 3, 7
    args, kwargs = example_inputs(entry, batch=B, seq=seq)
    kw = dict(kwargs, **({"use_cache": False} if hasattr(model, "config") else {}))
    gm = torch.export.export(model, args, kwargs=kw, strict=False).module()
    assert not any(isinstance(d, torch.SymInt) for n in gm.graph.nodes if n.op == "placeholder"
                   and isinstance(n.meta.get("val"), torch.Tensor) for d in n.meta["val"].shape)
    flops = count_flops(gm, recognize(gm))
    expected = counted_by_torch(model, entry, args, kwargs) / (B * seq) + uncounted_per_token(model, entry, seq)
    assert flops.at(seq)["total"] == pytest.approx(expected, rel=1e-12)
    summary = _flops_summary(flops, flops, seq, None)
    assert summary["before"] == pytest.approx(expected, rel=1e-12) and summary["ratio"] == pytest.approx(1.0)


class _SplitExperts(torch.nn.Module):
    """Top-1 experts run as a loop over a data-dependent split of the sorted rows (JetMoE's layout): the rows each
    expert receives are a size only a run can tell."""

    def __init__(self, d, f, n=3):
        super().__init__()
        self.router = torch.nn.Linear(d, n, bias=False)
        self.up = torch.nn.ModuleList(torch.nn.Linear(d, f) for _ in range(n))
        self.down = torch.nn.ModuleList(torch.nn.Linear(f, d) for _ in range(n))

    def forward(self, x):
        flat = x.reshape(-1, x.shape[-1])
        expert = self.router(flat).argmax(-1)
        order = torch.argsort(expert, stable=True)
        counts = torch.nn.functional.one_hot(expert, len(self.up)).sum(0).tolist()
        parts = flat[order].split(counts)
        y = torch.cat([down(torch.relu(up(p))) for up, down, p in zip(self.up, self.down, parts)])
        return torch.zeros_like(flat).index_add(0, order, y).reshape(x.shape)


def test_data_dependent_expert_sizes_are_counted_at_the_example_run():
    """A matrix product on a data-dependent number of rows has no count in B and S alone: without a run the count
    refuses by name; with the sizes of the example's run it equals torch's FlopCounterMode on the model; compile
    counts it so (and says so) instead of refusing the model."""
    from routefx.calibrate.record import data_dependent_sizes
    from routefx.errors import UnsupportedModelError
    from routefx.policies import Dense
    from tests.zoo import PlainLM
    entry = ZOO["plain"]
    torch.manual_seed(0)
    model = PlainLM(ffn=_SplitExperts).eval()
    B, seq = 2, 9
    args, kwargs = example_inputs(entry, batch=B, seq=seq, seed=3)
    expected = counted_by_torch(model, entry, args, kwargs) / (B * seq) + uncounted_per_token(model, entry, seq)
    gm = capture(model, (), {"input_ids": args[0]})  # as compile captures: inputs by name
    with pytest.raises(UnsupportedModelError, match=r"depend on shape symbols \['u\d+'.*data-dependent sizes"):
        count_flops(gm, recognize(gm))
    sizes = data_dependent_sizes(gm, {"input_ids": args[0]})
    assert sorted(v for k, v in sizes.items() if str(k).startswith("u")) != []
    assert count_flops(gm, recognize(gm), sizes).at(seq)["total"] == pytest.approx(expected, rel=1e-12)
    cm = routefx.compile(model, Dense(), example_inputs=args)
    assert cm.report.flops_per_token["before"] == pytest.approx(expected, rel=1e-12)
    assert any("depend on the data" in note for note in cm.report.notes)
    with torch.no_grad():
        torch.testing.assert_close(cm(*args), model(*args), atol=1e-5, rtol=1e-5)
