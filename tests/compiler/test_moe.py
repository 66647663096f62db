"""MoE families compiled with Dense: each MoE block's expert dispatch runs as one routed_ffn over its experts
(RaiseMoE), and the compiled model equals the Hugging Face model on a left-padded batch, on the eager and onnx
backends, and on the Triton backend under the CPU interpreter for one family."""
import os

import pytest
import torch

import routefx
from routefx.ir import graph_utils as gu
from routefx.policies import Dense
from tests.compare import assert_close_nonpad, graph_kwargs
from tests.tolerances import EXACT_REWRITE, ONNX_VS_EAGER, TRITON_VS_EAGER
from tests.zoo import ZOO, example_inputs

MOE = ["mixtral", "qwen2moe", "qwen3moe", "olmoe", "granitemoe", "phimoe"]


def _routed_ops(gm):
    return [n for n in gm.graph.nodes if gu.is_routed(n)]


@pytest.mark.parametrize("name", MOE + ["deepseekv3"])
def test_dense_moe_equals_hugging_face(name, zoo_capture):
    """One compile per family (backend onnx): ONNX Runtime's output and the rewritten graph run eagerly (what the
    eager backend runs) both equal Hugging Face's on a left-padded batch; every MoE block is one routed_ffn over
    its experts. DeepSeek-V3 (sigmoid scores, group-limited top-k, scaled gates, shared expert) needs no pattern
    of its own: the router is kept as captured."""
    model, _ = zoo_capture(name)
    exp = ZOO[name].expect
    args, kwargs = example_inputs(ZOO[name], batch=3, seq=9, left_pad=3, seed=5)
    cm = routefx.compile(model, Dense(), example_inputs=args, example_kwargs=kwargs, backend="onnx")
    with torch.no_grad():
        ref = model(*args, **kwargs)
        eager = cm.graph_module(**graph_kwargs(cm.graph_module, args, kwargs))
    assert_close_nonpad(eager, ref, kwargs["attention_mask"], EXACT_REWRITE)
    assert_close_nonpad(cm(*args, **kwargs), ref, kwargs["attention_mask"], EXACT_REWRITE)

    moe_blocks = [i for i, k in enumerate(exp.kinds) if k == "moe"]
    raise_moe = next(p for p in cm.report.passes if p.name == "raise_moe")
    assert raise_moe.rewrites == len(moe_blocks) and raise_moe.misses == []
    F, E = exp.inter[moe_blocks[0]], exp.num_experts
    for i in moe_blocks:   # every expert a range of width F of one weight; K routes per token with gates
        assert cm.ir.blocks[i].ffn.routed == [[e * F, (e + 1) * F] for e in range(E)]
    ops = [n for n in _routed_ops(cm.graph_module) if len(n.args[9]) == 2 * E]
    assert len(ops) == len(moe_blocks)
    assert all(gu.val(n.args[1]).shape[-1] == exp.top_k and n.args[2] is not None for n in ops)
    assert not any(gu.is_grouped_mm(n) for n in cm.graph_module.graph.nodes)
    assert not any("MoE" in note for note in cm.report.notes)


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET", "0") in ("", "0"),
                    reason="TRITON_INTERPRET is off (CUDA present): the CPU interpreter tests run where CUDA is hidden")
def test_triton_backend_runs_moe_under_the_interpreter(zoo_capture):
    """backend="triton" on CPU: each MoE routed_ffn (K=2, gates) lowers to the Triton op and matches eager and
    Hugging Face."""
    from routefx.backends.triton import ffn  # noqa: F401  (registers the op)
    name = "mixtral"
    model, _ = zoo_capture(name)
    args, kwargs = example_inputs(ZOO[name], batch=2, seq=7, left_pad=2, seed=3)
    cm = routefx.compile(model, Dense(), example_inputs=args, example_kwargs=kwargs, backend="triton")
    eager = routefx.compile(model, Dense(), example_inputs=args, example_kwargs=kwargs)
    out = cm(*args, **kwargs)
    assert cm.runner.stats.triton_ops == ZOO[name].expect.blocks
    assert_close_nonpad(out, eager(*args, **kwargs), kwargs["attention_mask"], TRITON_VS_EAGER)
    with torch.no_grad():
        ref = model(*args, **kwargs)
    assert_close_nonpad(out, ref, kwargs["attention_mask"], TRITON_VS_EAGER)


def _variant(cls, cfg_cls, **kw):
    base = dict(vocab_size=97, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                max_position_embeddings=128)
    torch.manual_seed(0)
    return cls(cfg_cls(**base, **kw)).eval()


@pytest.mark.parametrize("variant", ["top1", "top_all", "qwen3_top_all_unnormalised"])
def test_moe_with_one_or_every_expert_per_token(variant):
    """k = 1 ([T·k, d] dispatch values then have the shape of per-token ones: the sorted gates and the expert
    outputs before their un-permute must not be taken for the gates and the combine) and k = E (every expert
    chosen): raised to routed_ffn, equal to Hugging Face on a padded batch on eager and onnx."""
    import transformers as hf
    if variant == "top1":
        model = _variant(hf.MixtralForCausalLM, hf.MixtralConfig, intermediate_size=40, num_local_experts=4,
                         num_experts_per_tok=1)
    elif variant == "top_all":
        model = _variant(hf.MixtralForCausalLM, hf.MixtralConfig, intermediate_size=40, num_local_experts=2,
                         num_experts_per_tok=2)
    else:
        model = _variant(hf.Qwen3MoeForCausalLM, hf.Qwen3MoeConfig, intermediate_size=48, moe_intermediate_size=24,
                         num_experts=3, num_experts_per_tok=3, norm_topk_prob=False, head_dim=8)
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(1, 97, (2, 9), generator=g)
    mask = torch.ones(2, 9, dtype=torch.long)
    mask[0, :3] = 0
    with torch.no_grad():
        ref = model(ids, attention_mask=mask)
    for backend in ("eager", "onnx"):
        cm = routefx.compile(model, Dense(), example_inputs=(ids,), example_kwargs={"attention_mask": mask},
                             backend=backend)
        raise_moe = next(p for p in cm.report.passes if p.name == "raise_moe")
        assert raise_moe.rewrites == 2 and raise_moe.misses == []
        assert_close_nonpad(cm(ids, attention_mask=mask), ref, mask, EXACT_REWRITE)


def test_moe_budget_on_a_top1_model_says_why_not():
    import transformers as hf
    model = _variant(hf.MixtralForCausalLM, hf.MixtralConfig, intermediate_size=40, num_local_experts=4,
                     num_experts_per_tok=1)
    with pytest.raises(routefx.RoutefxError, match="top-1.*needs k >= 2"):
        routefx.compile(model, routefx.policies.MoEBudget(0.5), calibration=[torch.randint(1, 97, (2, 8))])


@pytest.mark.parametrize("implementation", ["eager", "batched_mm"])
def test_every_experts_implementation_is_captured_as_grouped_gemms(implementation):
    """transformers runs experts as a per-expert loop ("eager", a data-dependent loop torch.export cannot trace)
    or as gathered per-token weights ("batched_mm"); capture runs them by the grouped-GEMM implementation (the
    same function), so RaiseMoE reads them, the compiled model equals the model as the user set it, and the
    user's setting is restored."""
    entry = ZOO["mixtral"]
    model = entry.build()
    if not hasattr(model, "set_experts_implementation"):
        pytest.skip("this transformers release has no set_experts_implementation")
    model.set_experts_implementation(implementation)
    args, kwargs = example_inputs(entry, batch=2, seq=8, left_pad=2)
    with torch.no_grad():
        ref = model(*args, **kwargs).logits
    cm = routefx.compile(model, Dense(), example_inputs=args, example_kwargs=kwargs, backend="onnx")
    assert cm.report.pass_report("raise_moe").rewrites == len(entry.expect.kinds)
    assert set(model.get_experts_implementation().values()) == {implementation}
    assert_close_nonpad(cm(*args, **kwargs).logits, ref, kwargs["attention_mask"], ONNX_VS_EAGER)


def test_moe_budget_on_a_model_without_readable_moe_blocks_says_why():
    entry = ZOO["llama"]
    with pytest.raises(routefx.PolicyError, match=r"MoEBudget: the model has no MoE block to adapt \(found FFN "
                                                  r"kinds: \['gated'\]\).*dense FFNs take the Duo policy"):
        routefx.compile(entry.build(), routefx.policies.MoEBudget(0.5), calibration=[torch.randint(1, 97, (2, 8))])


def _dense_raises_every_block(model, vocab: int, backends=("eager", "onnx")):
    """Dense on each backend in turn, on a batch of two with row 0 left-padded: every block's MoE dispatch raised
    (no miss) and the output equal to Hugging Face's. Returns (the last compiled model, the ids, the mask)."""
    ids = torch.randint(3, vocab, (2, 11), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[0, :3] = 0
    with torch.no_grad():
        ref = model(ids, attention_mask=mask).logits
    for backend in backends:
        cm = routefx.compile(model, Dense(), example_inputs=(ids,), example_kwargs={"attention_mask": mask},
                             backend=backend)
        rep = cm.report.pass_report("raise_moe")
        assert rep.rewrites == len(cm.ir.blocks) and rep.misses == []
        assert_close_nonpad(cm(ids, attention_mask=mask).logits, ref, mask,
                            ONNX_VS_EAGER if backend == "onnx" else EXACT_REWRITE)
    return cm, ids, mask


def test_jetmoe_experts_split_by_count_are_raised():
    """JetMoE's experts run on tokens sorted by expert and split by per-expert counts (`.tolist()`: data-dependent
    sizes): Dense raises them to one routed_ffn per block, equal to Hugging Face on a left-padded batch on eager and
    onnx, and MoEBudget adapts them. The onnx export re-traces the graph's data-dependent sizes (its attention's
    experts stay as captured); a policy compiled after it on the same model (the capture is reused, with its shape
    environment) still propagates shapes through its passes."""
    from transformers import JetMoeConfig, JetMoeForCausalLM
    from tests.zoo import hf_model
    cfg = JetMoeConfig(vocab_size=101, hidden_size=64, intermediate_size=48, num_hidden_layers=2,
                       num_key_value_heads=2, kv_channels=16, num_local_experts=4, num_experts_per_tok=2,
                       max_position_embeddings=64, bos_token_id=1, eos_token_id=2)
    model = hf_model(JetMoeForCausalLM, cfg)
    cm, ids, mask = _dense_raises_every_block(model, 101, backends=("onnx", "eager"))
    assert [(b.ffn.kind, b.ffn.num_experts, b.ffn.top_k, b.ffn.intermediate_size) for b in cm.ir.blocks] == \
        [("moe", 4, 2, 48)] * 2
    cal = [{"input_ids": torch.randint(3, 101, (2, 12), generator=torch.Generator().manual_seed(s))}
           for s in range(2)]
    half = routefx.compile(model, routefx.policies.MoEBudget(0.6), calibration=cal, example_inputs=(ids,),
                           example_kwargs={"attention_mask": mask})
    assert half.report.pass_report("adapt_experts").rewrites == 2
    with torch.no_grad():
        assert torch.isfinite(half(ids, attention_mask=mask).logits).all()


def test_hash_routed_experts_are_raised():
    """DeepSeek-V4's hash-routed layers: a fixed token-id -> experts table chooses each token's experts and the
    router's scores only weight them (the router feeds no value the experts read). RaiseMoE takes the table's ids as
    the routes (`ffn.table_routes`): a hash layer and a top-k layer both become one routed_ffn, equal to Hugging Face
    on a left-padded batch on eager and onnx, and MoEBudget drops the lighter of each token's two experts."""
    from transformers import DeepseekV4Config, DeepseekV4ForCausalLM
    from tests.zoo import hf_model
    cfg = DeepseekV4Config(vocab_size=112, hidden_size=64, moe_intermediate_size=48, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, head_dim=16, q_lora_rank=16,
                           num_experts_per_tok=2, n_routed_experts=4, n_shared_experts=1,
                           mlp_layer_types=["hash_moe", "moe"], layer_types=["heavily_compressed_attention"] * 2,
                           max_position_embeddings=256, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    model = hf_model(DeepseekV4ForCausalLM, cfg)
    table = model.model.layers[0].mlp.gate.tid2eid          # zeros until a checkpoint fills it: draw one
    g = torch.Generator().manual_seed(0)
    table.copy_(torch.stack([torch.randperm(4, generator=g)[:2] for _ in range(table.shape[0])]))
    cm, ids, mask = _dense_raises_every_block(model, 112)
    assert [(b.ffn.kind, b.ffn.num_experts, b.ffn.top_k, b.ffn.shared_expert_size) for b in cm.ir.blocks] == \
        [("moe", 4, 2, 48)] * 2
    hash_op = _routed_ops(cm.graph_module)[0]
    # its routes: the table looked up by the input ids, no product (the router) before them
    before = gu.ancestors([hash_op.args[1]])
    assert {n.target for n in before if n.op in ("get_attr", "placeholder")} == {"model.layers.0.mlp.gate.tid2eid",
                                                                                 "input_ids"}
    assert not any(gu.is_matmul(n) for n in before)
    cal = [{"input_ids": torch.randint(3, 112, (2, 12), generator=torch.Generator().manual_seed(s)),
            "attention_mask": torch.ones(2, 12, dtype=torch.long)} for s in range(2)]   # the example's form
    half = routefx.compile(model, routefx.policies.MoEBudget(0.75), calibration=cal, example_inputs=(ids,),
                           example_kwargs={"attention_mask": mask})
    assert half.report.pass_report("adapt_experts").rewrites == 2
    assert abs(half.plan.budget.realised - 0.75) <= 0.02
