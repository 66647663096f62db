"""Structures found by the family sweep (bench/family_sweep.py) over Hugging Face families the zoo does not name:
refusals that say what was found, and the rewrites the sweep's fixes made possible."""
import copy

import warnings

import pytest
import torch
from torch import nn

import routefx
from routefx.policies import Dense, Duo, MoEfy, PruneLayers
from tests.compare import assert_close_nonpad
from tests.tolerances import EXACT_REWRITE, HALF_VS_HF, ONNX_VS_EAGER
from tests.zoo import ZOO, PlainLM, example_inputs


class _LearnedSwishMlp(nn.Module):
    """An FFN whose activation has a learned per-neuron parameter (as xIELU's): not one routefx can name."""

    def __init__(self, d, f):
        super().__init__()
        self.a, self.b = nn.Linear(d, f), nn.Linear(f, d)
        self.beta = nn.Parameter(1 + 0.1 * torch.randn(f))

    def forward(self, x):
        h = self.a(x)
        return self.b(h * torch.sigmoid(nn.functional.softplus(self.beta) * h))


def _cal(entry, n=2):
    return [dict(zip(("input_ids",), a)) | k for a, k in
            (example_inputs(entry, batch=2, seq=8, left_pad=1, seed=40 + i) for i in range(n))]


def test_duo_on_unreadable_ffns_says_which_and_why():
    torch.manual_seed(0)
    model = PlainLM(ffn=_LearnedSwishMlp).eval()
    ids = torch.randint(0, 89, (2, 8), generator=torch.Generator().manual_seed(0))
    ir = routefx.inspect(model, (ids,))
    assert {b.ffn.kind for b in ir.blocks} == {"unknown"}
    with pytest.raises(routefx.PolicyError, match=r"no dense FFN to route \(found FFN kinds: \['unknown'\]; "
                                                  r"block 0's FFN is not read: .+\); Duo routes dense FFNs"):
        routefx.compile(model, Duo(budget=0.5, small="nested"), calibration=[ids])


def test_duo_on_an_all_moe_model_points_to_moe_budget():
    entry = ZOO["mixtral"]
    with pytest.raises(routefx.PolicyError, match=r"found FFN kinds: \['moe'\]\); Duo routes dense FFNs .*"
                                                  r"MoE blocks take the MoEBudget policy"):
        routefx.compile(entry.build(), Duo(budget=0.5, small="nested"), calibration=_cal(entry))


class _BiasedAttnBlock(nn.Module):
    """GPT-NeoX-Japanese's last layer: the attention output's bias expanded to the stream's shape (`expand_as`,
    which reads the stream for its shape only) and added before the residual add."""

    def __init__(self, d, f, h):
        super().__init__()
        from tests.zoo import _RMS, _Attn, _Gated
        self.n1, self.n2, self.a, self.b = _RMS(d), _RMS(d), _Attn(d, h), _Gated(d, f)
        self.bias = nn.Parameter(0.1 * torch.randn(d))

    def forward(self, x):
        x = x + (self.a(self.n1(x)) + self.bias.expand_as(x))
        return x + self.b(self.n2(x))


def test_a_bias_expanded_to_the_streams_shape_is_part_of_its_block():
    torch.manual_seed(0)
    model = PlainLM().eval()
    model.z[1] = _BiasedAttnBlock(36, 76, 3)
    ids = torch.randint(0, 89, (2, 9), generator=torch.Generator().manual_seed(0))
    cm = routefx.compile(model, PruneLayers(layers=[1]), example_inputs=(ids,))
    assert [b.index for b in routefx.inspect(model, (ids,)).blocks] == [0, 1, 2]
    ref = copy.deepcopy(model)
    del ref.z[1]
    ids = torch.randint(0, 89, (3, 11), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert_close_nonpad(cm(ids), ref(ids), None, EXACT_REWRITE)


class _PromptLM(nn.Module):
    """CPM-Ant's layout: learned prompt positions prepended to the tokens inside the model, cut off the logits."""

    def __init__(self, prompt=4):
        super().__init__()
        self.lm = PlainLM()
        self.prompt = nn.Parameter(0.1 * torch.randn(prompt, 36))

    def forward(self, input_ids):
        x = self.lm.e(input_ids)
        x = torch.cat([self.prompt.expand(x.shape[0], -1, -1), x], dim=1)
        for blk in self.lm.z:
            x = blk(x)
        return self.lm.o(self.lm.n(x))[:, self.prompt.shape[0]:]


def test_duo_on_a_model_that_adds_positions_says_so():
    torch.manual_seed(0)
    model = _PromptLM().eval()
    cal = [torch.randint(0, 89, (2, 8), generator=torch.Generator().manual_seed(i)) for i in range(2)]
    with pytest.raises(routefx.UnsupportedModelError, match=r"block 0's FFN sees 24 positions for a batch of 16 "
                                                            r"input tokens \[2, 8\].*adds positions of its own"):
        routefx.compile(model, Duo(budget=0.5, small="nested"), calibration=cal)


def test_moe_experts_left_captured_lower_to_onnx():
    """MoE blocks as captured (no pass run) keep transformers' grouped GEMMs; the onnx backend lowers them (one
    row slice and MatMul per expert) and equals the Hugging Face model on padded batches of two shapes."""
    from routefx.backends import get_backend
    from routefx.ir import capture
    from routefx.ir import graph_utils as gu
    from tests.compare import graph_kwargs, main_output
    entry = ZOO["mixtral"]
    args, kwargs = example_inputs(entry, batch=2, seq=8, left_pad=2)
    model = entry.build()
    gm = capture(model, args, kwargs)
    assert any(gu.is_grouped_mm(n) for n in gm.graph.nodes)
    run = get_backend("onnx").prepare(gm, graph_kwargs(gm, args, kwargs))
    other = example_inputs(entry, batch=3, seq=11, left_pad=3, seed=5)
    for a, k in ((args, kwargs), other):
        with torch.no_grad():
            ref = main_output(model(*a, **k))
        assert_close_nonpad(main_output(run(**graph_kwargs(gm, a, k))), ref, k["attention_mask"], ONNX_VS_EAGER)


def test_a_moe_block_left_as_captured_compiles_on_onnx(monkeypatch):
    """A MoE block RaiseMoE leaves as captured (here every block: its matcher made to miss) keeps transformers'
    grouped GEMMs; Dense on onnx equals the Hugging Face model through their lowering. GPT-OSS's experts: clamped
    unit, per-expert biases, interleaved gate/up columns."""
    from routefx.passes import raise_moe

    def miss(gm, block):
        raise raise_moe._Miss("left as captured by the test")
    monkeypatch.setattr(raise_moe, "match_moe", miss)
    from transformers import GptOssConfig, GptOssForCausalLM
    cfg = GptOssConfig(vocab_size=112, hidden_size=64, intermediate_size=64, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, head_dim=16, num_local_experts=4,
                       num_experts_per_tok=2, max_position_embeddings=64, sliding_window=8, pad_token_id=0)
    torch.manual_seed(0)
    model = GptOssForCausalLM(cfg).eval()
    ids = torch.randint(3, 112, (2, 12), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[0, :3] = 0
    cm = routefx.compile(model, Dense(), backend="onnx", example_inputs=(ids,),
                         example_kwargs={"attention_mask": mask})
    from routefx.ir import graph_utils as gu
    assert sum(gu.is_grouped_mm(n) for n in cm.graph_module.graph.nodes) == 4  # up and down, two layers
    assert [m["reason"] for m in cm.report.pass_report("raise_moe").misses] == [
        "MoE block left as captured: left as captured by the test"] * 2
    with torch.no_grad():
        ref = model(ids, attention_mask=mask).logits
    assert_close_nonpad(cm(ids, attention_mask=mask).logits, ref, mask, ONNX_VS_EAGER)


@pytest.mark.parametrize("backend", ["eager", "onnx"])
def test_dense_compiles_a_model_without_transformer_blocks_as_captured(backend):
    """RWKV has no attention op: Dense has nothing to rewrite and compiles the graph as captured (equal to the
    model, the report says why), where a policy that rewrites blocks refuses with NoBlocksError. With its default
    inference-time rescaling the forward divides its weights in place, which capture refuses by name."""
    from transformers import RwkvConfig, RwkvForCausalLM
    kw = dict(vocab_size=112, hidden_size=64, num_hidden_layers=2, attention_hidden_size=64,
              intermediate_size=128, context_length=64)
    ids = torch.randint(3, 112, (2, 9), generator=torch.Generator().manual_seed(0))
    if backend == "eager":
        with pytest.raises(routefx.CaptureError, match=r"writes its weights in place \(aten.div_.Tensor on "
                                                       r"rwkv.blocks.0.*call it once before compiling"):
            routefx.compile(RwkvForCausalLM(RwkvConfig(**kw)).eval(), Dense(), example_inputs=(ids,))
    cfg = RwkvConfig(rescale_every=0, **kw)
    torch.manual_seed(0)
    model = RwkvForCausalLM(cfg).eval()
    cm = routefx.compile(model, Dense(), backend=backend, example_inputs=(ids,))
    assert cm.ir.blocks == [] and cm.report.passes == []
    assert any(n.startswith("no transformer blocks found") and n.endswith("Dense compiles the graph as captured")
               for n in cm.report.notes), cm.report.notes
    other = torch.randint(3, 112, (3, 5), generator=torch.Generator().manual_seed(1))
    tol = ONNX_VS_EAGER if backend == "onnx" else EXACT_REWRITE
    for x in (ids, other):
        with torch.no_grad():
            ref = model(x, use_cache=False).logits
        torch.testing.assert_close(cm(x).logits, ref, atol=tol, rtol=tol)
    if backend == "eager":
        with pytest.raises(routefx.NoBlocksError, match="no transformer blocks found"):
            routefx.compile(model, PruneLayers(layers=[0]), example_inputs=(ids,))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_mamba_stack_reads_as_token_mixer_blocks_and_prunes(dtype):
    """Mamba's state-space scan (transformers' torch path) multiplies two activations (the state and C), so each
    layer reads as a block whose mixer is attention-like with no softmax ("custom") and no FFN: PruneLayers
    removes a layer exactly as deleting it does, and Duo says there is no FFN to route. In bf16 the residual stream
    is kept in float32 (`residual_in_fp32`): the first layer adds its mixer to `embeddings.float()`, a real cast,
    which is still the stream (it once hid the first layer: two blocks for three layers)."""
    from transformers import MambaConfig, MambaForCausalLM
    cfg = MambaConfig(vocab_size=112, hidden_size=32, num_hidden_layers=3, state_size=8, expand=2, conv_kernel=4)
    torch.manual_seed(0)
    model = MambaForCausalLM(cfg).eval().to(dtype)
    ids = torch.randint(3, 112, (2, 9), generator=torch.Generator().manual_seed(0))
    ir = routefx.inspect(model, (ids,))
    assert [(b.path, b.ffn) for b in ir.blocks] == [(f"backbone.layers.{i}", None) for i in range(3)]
    assert all(a.pattern == "custom" and "no softmax" in a.reason for b in ir.blocks for a in b.attention)
    tol = EXACT_REWRITE if dtype == torch.float32 else HALF_VS_HF
    for layer in ([1] if dtype == torch.float32 else [0, 1]):
        cm = routefx.compile(model, PruneLayers(layers=[layer]), example_inputs=(ids,))
        ref = copy.deepcopy(model)
        del ref.backbone.layers[layer]
        with torch.no_grad():
            torch.testing.assert_close(cm(ids).logits.float(), ref(ids, use_cache=False).logits.float(), atol=tol,
                                       rtol=tol)
    with pytest.raises(routefx.PolicyError, match=r"no dense FFN to route \(found FFN kinds: \[\]\)"):
        routefx.compile(model, Duo(budget=0.5), example_inputs=(ids,), calibration=[ids])


def test_dense_generates_with_a_cache_on_a_model_whose_blocks_are_not_recognised():
    """Doge's residual adds are scaled by learned vectors, so no transformer block is recognised; Dense still
    captures its prefill and decode steps with the KV cache (no pass to run) and generates what HF generates."""
    from transformers import DogeConfig, DogeForCausalLM
    from routefx.generate.loop import generate_with_stats
    cfg = DogeConfig(vocab_size=112, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                     num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, pad_token_id=0,
                     bos_token_id=1, eos_token_id=2)
    torch.manual_seed(0)
    model = DogeForCausalLM(cfg).eval()
    ids = torch.randint(3, 112, (2, 9), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[0, :3] = 0
    with torch.no_grad():
        ref = model.generate(ids, attention_mask=mask, max_new_tokens=4, do_sample=False)
    cm = routefx.compile(model, Dense(), backend="onnx")
    out, stats = generate_with_stats(cm, ids, mask, max_new_tokens=4, do_sample=False)
    assert stats.mode == "cached" and torch.equal(out, ref)


def test_xlnet_computes_one_minus_an_integer_mask_and_exports():
    """XLNet's `1.0 - attention_mask` (rsub of an integer tensor and a float) has no torch.onnx translation in
    that mixed form: capture casts the mask first, and Dense on onnx equals the model."""
    from transformers import XLNetConfig, XLNetLMHeadModel
    cfg = XLNetConfig(vocab_size=112, d_model=64, n_layer=2, n_head=4, d_inner=128, mem_len=None)
    torch.manual_seed(0)
    model = XLNetLMHeadModel(cfg).eval()
    ids = torch.randint(3, 112, (2, 9), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[0, :2] = 0
    cm = routefx.compile(model, Dense(), backend="onnx", example_inputs=(ids,), example_kwargs={"attention_mask": mask})
    assert not any(n.target is torch.ops.aten.rsub.Scalar and n.args[0].meta["val"].dtype == torch.int64
                   for n in cm.graph_module.graph.nodes if n.op == "call_function")
    with torch.no_grad():
        ref = model(ids, attention_mask=mask, use_cache=False).logits
    assert_close_nonpad(cm(ids, attention_mask=mask).logits, ref, mask, ONNX_VS_EAGER)


def test_a_guard_that_fails_at_one_token_compiles_again():
    """XLNet's relative positions leave the guard `(2S - 1) % S != 0`, which fails at S = 1 only: the graph
    captured at 9 positions asserted it on the eager backend (the guard was checked with a size of 1 read as 2);
    one token now compiles a graph for that length, and every length equals the model."""
    from transformers import XLNetConfig, XLNetLMHeadModel
    cfg = XLNetConfig(vocab_size=112, d_model=64, n_layer=2, n_head=4, d_inner=128, mem_len=None)
    torch.manual_seed(0)
    model = XLNetLMHeadModel(cfg).eval()
    cm = routefx.compile(model, Dense())
    for batch, seq in ((2, 9), (2, 1), (1, 1), (1, 5)):
        ids = torch.randint(3, 112, (batch, seq), generator=torch.Generator().manual_seed(seq))
        if seq == 1 and batch == 2:
            with pytest.warns(RuntimeWarning, match=r"holds for other sizes .*% .*compiled it again"):
                out = cm(ids).logits
        else:
            out = cm(ids).logits
        with torch.no_grad():
            assert_close_nonpad(out, model(ids, use_cache=False).logits, None, EXACT_REWRITE)
    assert len(cm._entries) == 1 and [len(v) for v in cm._guarded.values()] == [1]


@pytest.mark.parametrize("backend", ["eager", "onnx"])
def test_xlnet_einsum_attention_reads_as_blocks(backend):
    """XLNet writes its attention with einsum (relative positions, post-norm): its layers read as blocks with an
    attention and an MLP, so PruneLayers equals deleting a layer and Duo routes every FFN."""
    from transformers import XLNetConfig, XLNetLMHeadModel
    cfg = XLNetConfig(vocab_size=112, d_model=64, n_layer=3, n_head=4, d_inner=128, mem_len=None)
    torch.manual_seed(0)
    model = XLNetLMHeadModel(cfg).eval()
    ids = torch.randint(3, 112, (2, 9), generator=torch.Generator().manual_seed(0))
    ir = routefx.inspect(model, (ids,))
    assert [(b.form, b.ffn.kind, b.ffn.activation) for b in ir.blocks] == [("post_norm", "mlp", "gelu")] * 3
    tol = ONNX_VS_EAGER if backend == "onnx" else EXACT_REWRITE
    pruned = copy.deepcopy(model)
    del pruned.transformer.layer[1]
    cm = routefx.compile(model, PruneLayers(layers=[1]), backend=backend, example_inputs=(ids,))
    with torch.no_grad():
        torch.testing.assert_close(cm(ids).logits, pruned(ids, use_cache=False).logits, atol=tol, rtol=tol)
    cal = [torch.randint(3, 112, (2, 12), generator=torch.Generator().manual_seed(i)) for i in range(2)]
    duo = routefx.compile(model, Duo(budget=0.5, small="nested"), backend=backend, calibration=cal,
                          example_inputs=(ids,))
    assert duo.report.pass_report("insert_routers").rewrites == 3
    if backend == "onnx":
        eager = routefx.compile(model, duo.plan, example_inputs=(ids,))
        torch.testing.assert_close(duo(ids).logits, eager(ids).logits, atol=tol, rtol=tol)


def test_onnx_compiles_where_onnxscripts_constant_folder_fails(monkeypatch):
    """onnxscript's constant folder raises on some exported nodes (SplitToSequence in ProphetNet): the optimizer
    runs its other passes, the model equals Hugging Face's, and the report says what happened."""
    from onnxscript.optimizer import _constant_folding

    call = _constant_folding.FoldConstantsPass.call

    def broken(self, model):  # the optimizer's folder only (routefx's weight folding has no size limit)
        if self.input_size_limit == _constant_folding.DEFAULT_CONSTANT_FOLD_INPUT_SIZE_LIMIT:
            raise AttributeError("'NoneType' object has no attribute 'ndim'")
        return call(self, model)

    monkeypatch.setattr(_constant_folding.FoldConstantsPass, "call", broken)
    entry = ZOO["llama"]
    args, kwargs = example_inputs(entry, batch=2, seq=8, left_pad=2)
    model = entry.build()
    cm = routefx.compile(model, Dense(), backend="onnx", example_inputs=args, example_kwargs=kwargs)
    assert any("without onnxscript's constant folding (AttributeError: 'NoneType'" in n for n in cm.report.notes)
    with torch.no_grad():
        ref = model(*args, **kwargs).logits
    assert_close_nonpad(cm(*args, **kwargs).logits, ref, kwargs["attention_mask"], ONNX_VS_EAGER)


class _InversePermutationMlp(nn.Module):
    """Sorts its rows, runs them, and puts them back through an inverse permutation written in place into a fresh
    buffer (`inv = torch.empty_like(perm); inv[perm] = arange`), as transformers' MoE experts do."""

    def __init__(self, d, f):
        super().__init__()
        self.a, self.b = nn.Linear(d, f), nn.Linear(f, d)

    def forward(self, x):
        flat = x.reshape(-1, x.shape[-1])
        perm = torch.argsort(flat[:, 0])
        inv = torch.empty_like(perm)
        inv[perm] = torch.arange(perm.shape[0])
        return self.b(torch.relu(self.a(flat[perm])))[inv].reshape(x.shape)


@pytest.mark.parametrize("backend", ["eager", "onnx"])
def test_an_in_place_write_into_a_fresh_buffer_is_captured_functional(backend):
    torch.manual_seed(0)
    model = PlainLM(ffn=_InversePermutationMlp).eval()
    ids = torch.randint(0, 89, (2, 8), generator=torch.Generator().manual_seed(0))
    cm = routefx.compile(model, Dense(), backend=backend, example_inputs=(ids,))
    targets = [n.target for n in cm.graph_module.graph.nodes if n.op == "call_function"]
    assert torch.ops.aten.index_put.default in targets
    assert not any(isinstance(t, torch._ops.OpOverload) and t._schema.is_mutable for t in targets)
    other = torch.randint(0, 89, (3, 5), generator=torch.Generator().manual_seed(1))
    for x in (ids, other):
        with torch.no_grad():
            ref = model(x)
        tol = ONNX_VS_EAGER if backend == "onnx" else EXACT_REWRITE
        torch.testing.assert_close(cm(x), ref, atol=tol, rtol=tol)


class _LoopedLM(PlainLM):
    """Runs its layer list twice (a looped / recurrent-depth model, as Dory's and HRM's): blocks share weights.
    `skip` names runs to leave out (0-based over all runs): the reference for pruning them."""

    skip: frozenset = frozenset()

    def forward(self, input_ids):
        x = self.e(input_ids)
        runs = [blk for _ in range(2) for blk in self.z]
        for i, blk in enumerate(runs):
            if i not in self.skip:
                x = blk(x)
        return self.o(self.n(x))


@pytest.mark.parametrize("small", ["nested", "separate"])
def test_duo_routes_each_run_of_a_looped_model(small):
    """Duo on a model that runs its layers twice: each run is a routed layer of its own (`z.1.b@1` is the second
    run of z.1's FFN) with its own router (nested small branches: one permuted copy per module; separate: a copy
    per run, whose bytes the report states); budget 1
    equals the model, the budget is met, ONNX equals eager. MoEfy, which splits each block's weights into experts,
    still refuses shared weights, and Dense compiles the model."""
    torch.manual_seed(0)
    model = _LoopedLM().eval()
    ids = torch.randint(0, 89, (2, 8), generator=torch.Generator().manual_seed(0))
    x = torch.randint(0, 89, (3, 11), generator=torch.Generator().manual_seed(1))
    cal = [torch.randint(0, 89, (2, 12), generator=torch.Generator().manual_seed(s)) for s in range(3)]
    full = routefx.compile(model, Duo(budget=1.0, small=small), example_inputs=(ids,), calibration=cal)
    with torch.no_grad():
        torch.testing.assert_close(full(x), model(x), atol=EXACT_REWRITE, rtol=EXACT_REWRITE)
    half = routefx.compile(model, Duo(budget=0.5, small=small), example_inputs=(ids,), calibration=cal)
    assert sorted(half.plan.layers) == sorted(f"z.{i}.b{r}" for i in range(3) for r in ("", "@1"))
    assert abs(half.plan.budget.realised - 0.5) <= 0.02
    ups = {n.args[3].target for n in half.graph_module.graph.nodes if n.op == "call_function"
           and n.target is torch.ops.routefx.routed_ffn.default}
    notes = half.report.pass_report("permute_neurons").notes
    if small == "nested":   # the runs of a module share one permutation (importance summed), so one copy
        assert len(ups) == 3 and not any("permuted differently" in n for n in notes)
    else:                   # each run's own top neurons: a copy per run, whose bytes the report states
        assert len(ups) == 6 and any("permuted differently each get a copy" in n for n in notes)
    on_onnx = routefx.compile(model, half.plan, example_inputs=(ids,), backend="onnx")
    torch.testing.assert_close(on_onnx(x), half(x), atol=ONNX_VS_EAGER, rtol=ONNX_VS_EAGER)
    with pytest.raises(routefx.UnsupportedModelError,
                       match=r"MoEfy: blocks 0 and 3 run the same FFN weights \(z\.0\..*weights shared across "
                             r"depth, 6 blocks.*rewrites each block's own weights"):
        routefx.compile(model, MoEfy(experts=4, top_k=1), example_inputs=(ids,), calibration=cal)
    with torch.no_grad():
        assert (routefx.compile(model, routefx.policies.Dense())(ids) - model(ids)).abs().max() <= EXACT_REWRITE


@pytest.mark.parametrize("backend", ["eager", "onnx"])
def test_pruning_runs_of_a_looped_model(backend):
    """PruneLayers on a model that runs its layers twice: an index prunes one run of a layer (skipping that
    iteration), a module path every run of it, `keep` ranks the runs by influence; each equals the model with
    those runs left out."""
    torch.manual_seed(0)
    model = _LoopedLM().eval()
    ids = torch.randint(0, 89, (2, 8), generator=torch.Generator().manual_seed(0))
    x = torch.randint(0, 89, (3, 11), generator=torch.Generator().manual_seed(1))
    tol = ONNX_VS_EAGER if backend == "onnx" else EXACT_REWRITE
    cal = [torch.randint(0, 89, (2, 9), generator=torch.Generator().manual_seed(s)) for s in range(2)]
    for policy, runs in ((PruneLayers(layers=[4]), {4}), (PruneLayers(layers=["z.1"]), {1, 4}),
                         (PruneLayers(keep=0.5), None)):
        cm = routefx.compile(model, policy, example_inputs=(ids,), backend=backend, calibration=cal)
        if runs is None:        # by influence: 3 of the 6 runs, whichever they are
            assert len(cm.plan.pruned) == 3
        else:
            assert sorted(cm.plan.pruned) == sorted(runs)
        ref = copy.deepcopy(model)
        ref.skip = frozenset(cm.plan.pruned)
        with torch.no_grad():
            torch.testing.assert_close(cm(x), ref(x), atol=tol, rtol=tol)


def test_pruning_a_looped_model_that_also_aliases_a_module():
    """One module under two names (z.0 and z.2) in a looped model: each run is a block named by the name it was
    called through, and pruning a run by index, or every run called through one name, equals leaving those runs
    out."""
    torch.manual_seed(0)
    model = _LoopedLM().eval()
    model.z[2] = model.z[0]
    ids = torch.randint(0, 89, (2, 8), generator=torch.Generator().manual_seed(0))
    x = torch.randint(0, 89, (3, 11), generator=torch.Generator().manual_seed(1))
    assert [b.path for b in routefx.inspect(model, (ids,)).blocks] == ["z.0", "z.1", "z.2"] * 2
    for layers, runs in (([2], {2}), (["z.0"], {0, 3}), (["z.2"], {2, 5})):
        cm = routefx.compile(model, PruneLayers(layers=layers), example_inputs=(ids,))
        assert sorted(cm.plan.pruned) == sorted(runs)
        ref = copy.deepcopy(model)
        ref.skip = frozenset(runs)
        with torch.no_grad():
            torch.testing.assert_close(cm(x), ref(x), atol=EXACT_REWRITE, rtol=EXACT_REWRITE)


def test_two_blocks_whose_ffns_share_one_module_are_refused():
    """Gemma 4's layer adds a third branch (per-layer-input gating) and rescales the stream: routefx finds two blocks
    in one layer with their FFNs in the same module, which plans keyed by module path cannot tell apart."""
    import dataclasses

    from routefx.calibrate.stage import check_blocks_rewritable
    from routefx.ir import capture, recognize
    torch.manual_seed(0)
    gm = capture(PlainLM().eval(), (torch.randint(0, 89, (2, 8)),))
    ir = recognize(gm)
    check_blocks_rewritable(Duo(budget=0.5), gm, ir)          # three layers, three FFN modules: fine
    b0, b1 = ir.blocks[0], ir.blocks[1]
    ir.blocks[1] = dataclasses.replace(b1, ffn=dataclasses.replace(b1.ffn, path=b0.ffn.path))
    with pytest.raises(routefx.UnsupportedModelError,
                       match=r"Duo: blocks 0 and 1 were both recognised with their FFN in module z\.0\.b"):
        check_blocks_rewritable(Duo(budget=0.5), gm, ir)


class _RecurrentLayer(nn.Module):
    """Recurrent Gemma's recurrent layer: a temporal branch without attention (here a causal running mean of a
    projection) and an MLP branch, each added to the stream: two blocks in one layer."""

    def __init__(self, d, f):
        super().__init__()
        from tests.zoo import _RMS, _Gated
        self.n1, self.n2, self.mix, self.b = _RMS(d), _RMS(d), nn.Linear(d, d), _Gated(d, f)

    def forward(self, x):
        h = self.mix(self.n1(x))
        steps = torch.arange(1, x.shape[1] + 1, dtype=x.dtype, device=x.device)[:, None]
        x = x + h.cumsum(1) / steps
        return x + self.b(self.n2(x))


def test_pruning_every_block_of_a_two_block_layer_equals_deleting_the_layer():
    torch.manual_seed(0)
    model = PlainLM().eval()
    model.z[0], model.z[1] = _RecurrentLayer(36, 76), _RecurrentLayer(36, 76)
    ids = torch.randint(0, 89, (2, 9), generator=torch.Generator().manual_seed(0))
    paths = [b.path for b in routefx.inspect(model, (ids,)).blocks]
    assert paths == ["z.0", "z.0", "z.1", "z.1", "z.2"]       # blocks are not layers
    cm = routefx.compile(model, PruneLayers(layers=[2, 3]), example_inputs=(ids,))
    ref = copy.deepcopy(model)
    del ref.z[1]
    ids = torch.randint(0, 89, (3, 11), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert_close_nonpad(cm(ids), ref(ids), None, EXACT_REWRITE)


def _two_block_layers():
    torch.manual_seed(0)
    model = PlainLM().eval()
    model.z[0], model.z[1] = _RecurrentLayer(36, 76), _RecurrentLayer(36, 76)
    return model, torch.randint(0, 89, (2, 9), generator=torch.Generator().manual_seed(0))


def _pruning_z_equals_deleting(model, ids, k: int):
    """PruneLayers by the path `z.k` equals the model with z[k] deleted (on inputs of another shape); the
    compiled model."""
    cm = routefx.compile(model, PruneLayers(layers=[f"z.{k}"]), example_inputs=(ids,))
    ref = copy.deepcopy(model)
    del ref.z[k]
    x = torch.randint(0, 89, (3, 11), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert_close_nonpad(cm(x), ref(x), None, EXACT_REWRITE)
    return cm


def test_a_module_path_names_every_block_of_that_layer():
    """PruneLayers(layers=["z.1"]) removes both blocks layer z.1 reads as (the same as deleting the layer and as
    listing blocks 2 and 3); mixed with an index, and round-tripped through JSON."""
    model, ids = _two_block_layers()
    cm = _pruning_z_equals_deleting(model, ids, 1)
    assert cm.plan.pruned == [2, 3]
    policy = PruneLayers(layers=[0, "z.1"])
    assert routefx.policies.policy_from_json(policy.to_json()) == policy
    cm = routefx.compile(model, policy, example_inputs=(ids,))
    cm(ids)
    assert cm.plan.pruned == [0, 2, 3]


def test_duo_by_module_path_routes_the_layers_dense_ffns_only():
    """Layer z.1's first block is its recurrent branch (an FFN-shaped branch Duo cannot read as a dense FFN): a path
    takes the blocks of that module Duo can route; naming the unreadable block by index is refused."""
    model, ids = _two_block_layers()
    cal = [torch.randint(0, 89, (2, 9), generator=torch.Generator().manual_seed(s)) for s in range(2)]
    cm = routefx.compile(model, Duo(budget=0.5, router="static", layers=["z.1"]), calibration=cal)
    cm(ids)
    assert list(cm.plan.layers) == ["z.1.b"]
    cm = routefx.compile(model, Duo(budget=0.5, router="static", layers=["z.0.b", "z.2.b"]), calibration=cal)
    cm(ids)                                                # FFN modules by their own path
    assert sorted(cm.plan.layers) == ["z.0.b", "z.2.b"]
    with pytest.raises(routefx.PolicyError, match=r"Duo: block 2 has a"):
        routefx.compile(model, Duo(budget=0.5, router="static", layers=[2]), calibration=cal)(ids)


def test_module_paths_that_name_no_block_or_a_block_twice_are_refused():
    from routefx.calibrate.block_refs import resolve_blocks
    from routefx.ir import capture, recognize
    model, ids = _two_block_layers()
    ir = recognize(capture(model, (ids,)))
    assert resolve_blocks("PruneLayers", ["z"], ir) == [0, 1, 2, 3, 4]       # a container names all it holds
    with pytest.raises(routefx.PolicyError, match=r"no block lies in module 'z\.7'; the blocks' module paths are "
                                                  r"'z\.0', 'z\.1', 'z\.2'"):
        resolve_blocks("PruneLayers", ["z.7"], ir)
    with pytest.raises(routefx.PolicyError, match=r"module 'z\.1\.b' is part of block 3 \(path 'z\.1'\), not a "
                                                  r"whole block; PruneLayers takes whole blocks: name block 3"):
        resolve_blocks("PruneLayers", ["z.1.b"], ir)
    with pytest.raises(routefx.PolicyError, match=r"block 3 is named twice \(3 and 'z\.1'\)"):
        resolve_blocks("PruneLayers", [3, "z.1"], ir)
    with pytest.raises(routefx.PolicyError, match=r"block 5 does not exist; the model has 5 blocks"):
        resolve_blocks("PruneLayers", [5], ir)
    for bad in ([""], [1.5], [True], [-1], []):
        with pytest.raises(routefx.PolicyError, match=r"layers must be a non-empty list of block indices >= 0 "
                                                      r"\(routefx\.inspect's '#'\) or module paths"):
            PruneLayers(layers=bad)
    assert Duo(layers=[3, 1, 3]).layers == (1, 3)                           # indices: sorted, repeats dropped
    assert Duo(layers=["z.1", 0, "z.1"]).layers == ("z.1", 0)


class _SingleBranch(nn.Module):
    """NemotronH's layer: one mixer (here attention or a gated FFN) on one residual branch."""

    def __init__(self, d, f, kind):
        super().__init__()
        from tests.zoo import _RMS, _Attn, _Gated
        self.norm, self.mixer = _RMS(d), (_Attn(d, 3) if kind == "attention" else _Gated(d, f))

    def forward(self, x):
        return x + self.mixer(self.norm(x))


def test_an_attention_only_layer_and_the_ffn_only_layer_after_it_are_two_blocks():
    """Layers z.1 (attention only) and z.2 (FFN only) would pair as one (attention, FFN) block; the layer list
    (z) splits them, so indices and paths name layers, and pruning either equals deleting that layer."""
    torch.manual_seed(0)
    model = PlainLM(widths=(76, 76, 76, 76)).eval()
    model.z[1], model.z[2] = _SingleBranch(36, 76, "attention"), _SingleBranch(36, 76, "ffn")
    ids = torch.randint(0, 89, (2, 9), generator=torch.Generator().manual_seed(0))
    ir = routefx.inspect(model, (ids,))
    assert [b.path for b in ir.blocks] == ["z.0", "z.1", "z.2", "z.3"]
    assert [bool(b.attention) for b in ir.blocks] == [True, True, False, True]
    assert [b.ffn is not None for b in ir.blocks] == [True, False, True, True]
    for k in (1, 2):
        assert _pruning_z_equals_deleting(model, ids, k).plan.pruned == [k]
    cal = [torch.randint(0, 89, (2, 9), generator=torch.Generator().manual_seed(s)) for s in range(2)]
    cm = routefx.compile(model, Duo(budget=0.5, router="local"), calibration=cal, backend="onnx")
    cm(ids)
    assert sorted(cm.plan.layers) == ["z.0.b", "z.2.mixer", "z.3.b"]


def test_layers_of_one_branch_each_stay_layers_when_no_block_boundary_separates_them():
    """Two token-mixer-only layers and an FFN-only layer (what NemotronH's [Mamba, MoE, attention, MLP] leaves
    once its MoE layer is pruned) are all one group of sums, with no FFN between them to mark a boundary: the
    layer list read inside the group still makes each layer a block, and pruning the middle one equals deleting
    it."""
    torch.manual_seed(0)
    model = PlainLM(widths=(76, 76, 76)).eval()
    model.z[0], model.z[1] = _SingleBranch(36, 76, "attention"), _SingleBranch(36, 76, "attention")
    model.z[2] = _SingleBranch(36, 76, "ffn")
    ids = torch.randint(0, 89, (2, 9), generator=torch.Generator().manual_seed(0))
    ir = routefx.inspect(model, (ids,))
    assert [(b.path, bool(b.attention), b.ffn is not None) for b in ir.blocks] == \
        [("z.0", True, False), ("z.1", True, False), ("z.2", False, True)]
    _pruning_z_equals_deleting(model, ids, 1)


def test_pruning_keeps_a_block_that_holds_attention():
    """A hybrid whose only attention is in its last layer: an explicit PruneLayers list that removes that block
    is refused by name; PruneLayers(keep=...) passes over it even when it ranks lowest."""
    torch.manual_seed(0)
    model = PlainLM().eval()
    model.z[0], model.z[1] = _RecurrentLayer(36, 76), _RecurrentLayer(36, 76)
    ids = torch.randint(0, 89, (2, 9), generator=torch.Generator().manual_seed(0))
    with pytest.raises(routefx.PolicyError, match=r"would remove every block that holds attention \(\[4\] of 5"):
        routefx.compile(model, PruneLayers(layers=[4]), example_inputs=(ids,))
    cal = [torch.randint(0, 89, (2, 9), generator=torch.Generator().manual_seed(s)) for s in range(2)]
    cm = routefx.compile(model, PruneLayers(keep=0.2), calibration=cal)
    cm(ids)
    inf = cm.plan.block_influence
    assert max(range(5), key=lambda i: inf[i]) != 4   # by influence alone the attention block would go
    assert cm.plan.pruned == [0, 1, 2, 3]            # four of five go, never the attention block


class _LengthAsInt(nn.Module):
    """A block whose code turns the sequence length into a Python int (CPM-Ant does): export fixes it."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, x):
        n = int(x.shape[1])
        return self.inner(x) + torch.arange(n, dtype=x.dtype, device=x.device)[:, None] * 1e-3


@pytest.mark.parametrize("backend", ["eager", "onnx"])
def test_a_length_the_code_fixes_compiles_once_per_length(backend):
    """The captured graph serves its own length only (`CaptureInfo.fixed_dims`): a call at another length
    compiles again (with a RuntimeWarning) instead of failing export's guard, and each length equals the model."""
    torch.manual_seed(0)
    model = PlainLM().eval()
    model.z[1] = _LengthAsInt(model.z[1])
    cm = routefx.compile(model, routefx.policies.Dense(), backend=backend)
    for i, seq in enumerate((9, 11, 9)):
        ids = torch.randint(0, 89, (2, seq), generator=torch.Generator().manual_seed(seq))
        if i == 1:
            with pytest.warns(RuntimeWarning, match=r"fixes input sizes .*input_ids.*compiled it again"):
                out = cm(ids)
        else:
            out = cm(ids)
        with torch.no_grad():
            assert_close_nonpad(out, model(ids), None, ONNX_VS_EAGER if backend == "onnx" else EXACT_REWRITE)
    assert cm._last.gm.meta["routefx"].fixed_dims == {"input_ids": {1: 9}}
    assert len(cm._entries) == 2


@pytest.mark.parametrize("backend", ["eager", "onnx"])
def test_a_length_of_one_the_code_fixes_is_captured_as_given(backend):
    """A batch or length of 1 is exported at 2 (export would make a size-1 dim a constant); where the model's code
    fixes the length anyway (Jamba's scan), that graph holds for 2 only, and the call at 1 is captured again with
    its length as given (it failed with a CaptureError: the guard `size()[1] == 2`). Each equals the model."""
    torch.manual_seed(0)
    model = PlainLM().eval()
    model.z[1] = _LengthAsInt(model.z[1])
    cm = routefx.compile(model, routefx.policies.Dense(), backend=backend)
    for batch, seq in ((2, 9), (2, 1), (1, 1), (3, 1), (1, 9)):
        ids = torch.randint(0, 89, (batch, seq), generator=torch.Generator().manual_seed(seq + batch))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)     # "compiled it again for these sizes"
            out = cm(ids)
        with torch.no_grad():
            assert_close_nonpad(out, model(ids), None, ONNX_VS_EAGER if backend == "onnx" else EXACT_REWRITE)
    assert len(cm._entries) == 2 and not any(cm._guarded.values())    # one graph per length, any batch


class _LengthBranch(nn.Module):
    """A block whose code branches on the sequence length (a chunked scan padding to its chunk does): export keeps
    the length dynamic within a guard (S <= 10 from a capture at 9), which a lowered graph does not check."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, x):
        y = self.inner(x)
        return y * 1.5 if x.shape[1] > 10 else y


@pytest.mark.parametrize("backend", ["eager", "onnx"])
def test_a_length_outside_the_captures_guards_compiles_again(backend):
    """A call outside the guards of the graph captured first compiles a graph for its sizes (with a RuntimeWarning
    naming the guard) instead of running the first graph's branch (ONNX: silently other numbers) or failing the
    guard (eager: an AssertionError); lengths within a capture's guards reuse it, and each equals the model."""
    torch.manual_seed(0)
    model = PlainLM().eval()
    model.z[1] = _LengthBranch(model.z[1])
    cm = routefx.compile(model, routefx.policies.Dense(), backend=backend)
    for seq in (9, 12, 9, 10, 14, 1):
        ids = torch.randint(0, 89, (2, seq), generator=torch.Generator().manual_seed(seq))
        if seq == 12:
            with pytest.warns(RuntimeWarning, match=r"holds for other sizes .*input_ids.*compiled it again"):
                out = cm(ids)
        else:
            out = cm(ids)
        with torch.no_grad():
            assert_close_nonpad(out, model(ids), None, ONNX_VS_EAGER if backend == "onnx" else EXACT_REWRITE)
    assert len(cm._entries) == 1 and [len(v) for v in cm._guarded.values()] == [1]
