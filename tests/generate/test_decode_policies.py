"""Decode-time skip policies against an independent reference: a hand-written greedy loop over the Hugging Face
Llama's own modules, one row at a time without padding, that runs the chosen layers and gives a skipped layer K/V
from its input norm, K/V projections and rotary applied to the stream that reaches it (the documented cache rule).
"""
import inspect

import pytest
import torch
from torch.profiler import ProfilerActivity, profile
from transformers import DynamicCache
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

import routefx
from routefx.errors import CalibrationError, PolicyError, UnsupportedModelError
from routefx.generate import (ActivationSkip, DepthDecay, LayerSubset, decode_policy_from_json, fit_threshold,
                              generate_with_stats)
from routefx.generate.skipping import SkipStepper, decode_pieces
from routefx.policies import Dense, Duo
from tests.zoo import ZOO

NEW = 8


@pytest.fixture(scope="module")
def llama():
    entry = ZOO["llama"]
    model = entry.build()
    g = torch.Generator().manual_seed(4)
    ids = torch.randint(3, entry.vocab, (2, 9), generator=g)
    mask = torch.ones_like(ids)
    mask[0, :3] = 0                                    # left padding
    return model, routefx.compile(model, Dense()), ids, mask


def _kv_only(layer, h, cos, sin):
    """A skipped layer's K/V for hidden states h [1, S, D]: input norm, K and V projections, rotary on K."""
    attn = layer.self_attn
    x = layer.input_layernorm(h)
    shape = (*h.shape[:2], -1, attn.head_dim)
    k = attn.k_proj(x).view(shape).transpose(1, 2)
    v = attn.v_proj(x).view(shape).transpose(1, 2)
    return apply_rotary_pos_emb(k, k, cos, sin)[1], v


def _reference_row(model, ids, n, run_of_step):
    """Greedy decoding of one unpadded row [1, S]. run_of_step(t, changes) -> bool [L] for decode step t >= 1;
    `changes` [L] are the prompt's mean relative stream changes per layer. Returns (new tokens [n], changes)."""
    m = model.model
    kw = "past_key_values" if "past_key_values" in inspect.signature(m.layers[0].forward).parameters else "cache"
    cache = DynamicCache()
    changes = torch.zeros(len(m.layers), dtype=torch.float64)

    def forward(tok, start, run):
        pos = torch.arange(start, start + tok.shape[1])[None]
        h = m.embed_tokens(tok)
        cos, sin = m.rotary_emb(h, pos)
        for l, layer in enumerate(m.layers):
            if run is None or run[l]:
                out = layer(h, attention_mask=None, position_ids=pos, use_cache=True, position_embeddings=(cos, sin),
                            **{kw: cache})
                out = out[0] if isinstance(out, tuple) else out
                if run is None:
                    changes[l] = ((out - h).norm(dim=-1) / h.norm(dim=-1)).double().mean()
                h = out
            else:
                cache.update(*_kv_only(layer, h, cos, sin), l)
        return model.lm_head(m.norm(h[:, -1]))

    with torch.no_grad():
        tok = forward(ids, 0, None).argmax(-1)
        out = [tok]
        for t in range(1, n):
            tok = forward(tok[:, None], ids.shape[1] + t - 1, run_of_step(t, changes)).argmax(-1)
            out.append(tok)
    return torch.cat(out), changes


def _reference(model, ids, mask, run_of_step):
    rows = [_reference_row(model, ids[b:b + 1, mask[b].bool()], NEW, lambda t, c, b=b: run_of_step(t, c, b))
            for b in range(ids.shape[0])]
    return torch.cat([ids, torch.stack([r[0] for r in rows])], dim=1), torch.stack([r[1] for r in rows])


def test_depth_decay_equals_reference(llama):
    model, cm, ids, mask = llama
    depth = {1: 2, 2: 1, 3: 1}                          # L = 3, alpha = 0.8: floor(2.4), floor(1.92), floor(1.536)
    ref, _ = _reference(model, ids, mask, lambda t, c, b: torch.arange(3) < depth.get(t, 1))
    out, st = generate_with_stats(cm, ids, mask, max_new_tokens=NEW, eos_token_id=[],
                                  decode_policy=DepthDecay(alpha=0.8, min_layers=1))
    assert torch.equal(out, ref)
    assert st.layer_fraction == pytest.approx((2 + 1 * 6) / (3 * 7))


def test_activation_skip_equals_reference_with_rows_that_differ(llama):
    model, cm, ids, mask = llama
    _, changes = _reference(model, ids, mask, lambda t, c, b: torch.ones(3, dtype=torch.bool))
    v = changes.flatten().sort().values
    tau = float(v[2] + v[3]) / 2                       # between two measured changes: 3 of 6 (row, layer) run
    chosen = changes >= tau
    assert not torch.equal(chosen[0], chosen[1]), "the test needs rows that skip different layers"
    ref, _ = _reference(model, ids, mask, lambda t, c, b: c >= tau)
    out, st = generate_with_stats(cm, ids, mask, max_new_tokens=NEW, eos_token_id=[],
                                  decode_policy=ActivationSkip(threshold=tau))
    assert torch.equal(out, ref)
    assert st.layer_fraction == pytest.approx(0.5)


def test_layer_subset_per_row_equals_reference(llama):
    model, cm, ids, mask = llama
    skip = ((1,), (0, 2))
    ref, _ = _reference(model, ids, mask, lambda t, c, b: torch.tensor([i not in skip[b] for i in range(3)]))
    out = cm.generate(ids, mask, max_new_tokens=NEW, eos_token_id=[], decode_policy=LayerSubset(skip=skip))
    assert torch.equal(out, ref)


@pytest.mark.parametrize("policy", [DepthDecay(alpha=1.0), ActivationSkip(threshold=0.0), LayerSubset(skip=())])
def test_no_skipping_reproduces_dense_greedy(llama, policy):
    _, cm, ids, mask = llama
    dense = cm.generate(ids, mask, max_new_tokens=NEW, eos_token_id=[])
    assert torch.equal(cm.generate(ids, mask, max_new_tokens=NEW, eos_token_id=[], decode_policy=policy), dense)


def _matmul_flops(fn) -> int:
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        fn()
    total = 0
    for e in prof.events():
        if e.name in ("aten::mm", "aten::addmm"):
            (m, k), (_, n) = e.input_shapes[:2] if e.name == "aten::mm" else e.input_shapes[1:3]
            total += 2 * m * k * n
    return total


def test_skipped_layers_run_no_attention_or_ffn_matmul(llama):
    """Matmul FLOPs of one decode step (profiled) against the count from the config: a row that skips a layer
    pays its K and V projections only."""
    _, cm, ids, mask = llama
    D, H, Hkv, hd, F, V = 48, 4, 2, 12, 104, 101       # tests/zoo.py's llama config
    full = 2 * (D * H * hd + 2 * D * Hkv * hd + H * hd * D + 3 * D * F)
    kv = 2 * 2 * D * Hkv * hd
    for skip, runs, kvs in [((), 6, 0), ((1,), 4, 2), (((1,), (0, 2)), 3, 3)]:
        st = SkipStepper(cm, mask, LayerSubset(skip=skip))
        with torch.no_grad():
            st.prefill(ids)
            flops = _matmul_flops(lambda: st.decode(torch.tensor([[5], [6]])))
        assert flops == runs * full + kvs * kv + 2 * 2 * D * V, skip


def test_budget_fit_meets_its_target(llama):
    """The threshold fitted for budget 0.5 runs 0.5 ± 0.02 of the (row, layer) pairs of the calibration data,
    counted with the reference's own changes."""
    model, _, _, _ = llama
    g = torch.Generator().manual_seed(9)
    cal = [{"input_ids": torch.randint(3, 101, (8, 10), generator=g)} for _ in range(2)]
    cm = routefx.compile(model, Dense(), calibration=cal)
    tau = fit_threshold(cm, ActivationSkip(budget=0.5))
    changes = torch.cat([_reference_row(model, b["input_ids"][i:i + 1], 1, None)[1][None]
                         for b in cal for i in range(8)])
    assert abs(float((changes >= tau).double().mean()) - 0.5) <= 0.02
    with pytest.raises(CalibrationError, match="calibration"):
        routefx.compile(model, Dense()).generate(cal[0]["input_ids"], decode_policy=ActivationSkip(budget=0.5))


def test_onnx_pieces_skip_layers_and_match_eager(llama):
    """ONNX: a bounded number of graphs (2L + 2, whatever the subsets); rows that skip different layers give the
    eager backend's tokens; a layer no row runs in decode is called for the prompt only."""
    model, cm, ids, mask = llama
    onnx = routefx.compile(model, Dense(), backend="onnx")
    pieces = decode_pieces(onnx)
    assert pieces.count == 8
    calls = [0] * 3
    for j, p in enumerate(pieces.layers):
        p.run = (lambda run, j: lambda **kw: calls.__setitem__(j, calls[j] + 1) or run(**kw))(p.run, j)
    changes = SkipStepper(cm, mask, ActivationSkip(threshold=0.0))
    changes.prefill(ids)
    v = changes.changes.flatten().sort().values
    policy = ActivationSkip(threshold=float(v[2] + v[3]) / 2)     # rows that skip different layers
    out, st = generate_with_stats(onnx, ids, mask, max_new_tokens=NEW, eos_token_id=[], decode_policy=policy)
    assert torch.equal(out, cm.generate(ids, mask, max_new_tokens=NEW, eos_token_id=[], decode_policy=policy))
    run = changes.changes >= policy.threshold                      # [B, L]
    assert calls == [1 + (NEW - 1) * int(run[:, j].any()) for j in range(3)]   # 1: the prompt
    g = onnx._generation_graphs
    assert g.decode._run is None and g.prefill._run is None       # the whole graphs were never lowered


def test_composes_with_duo(llama):
    """A Duo model keeps routing the FFNs of the layers that run: no skipping gives Duo's own greedy output."""
    model, cm, ids, mask = llama
    g = torch.Generator().manual_seed(2)
    cal = [{"input_ids": torch.randint(3, 101, (4, 12), generator=g)}]
    duo = routefx.compile(model, Duo(budget=0.5, router="local", small="nested"), calibration=cal)
    plain = duo.generate(ids, mask, max_new_tokens=NEW, eos_token_id=[])
    assert torch.equal(duo.generate(ids, mask, max_new_tokens=NEW, eos_token_id=[],
                                    decode_policy=DepthDecay(alpha=1.0)), plain)
    assert not torch.equal(plain, cm.generate(ids, mask, max_new_tokens=NEW, eos_token_id=[]))


@pytest.mark.parametrize("make,match", [
    (lambda: DepthDecay(alpha=0.0), "alpha"),
    (lambda: DepthDecay(alpha=1.5), "alpha"),
    (lambda: DepthDecay(min_layers=0), "min_layers"),
    (lambda: ActivationSkip(), "exactly one"),
    (lambda: ActivationSkip(budget=0.5, threshold=0.1), "exactly one"),
    (lambda: ActivationSkip(budget=1.5), "budget"),
    (lambda: ActivationSkip(threshold=-1.0), "threshold"),
    (lambda: LayerSubset(skip=(-1,)), "layer indices"),
    (lambda: decode_policy_from_json('{"decode_policy": "Nope"}'), "unknown decode policy"),
])
def test_bad_policies_are_refused(make, match):
    with pytest.raises(PolicyError, match=match):
        make()


@pytest.mark.parametrize("policy,match", [
    (DepthDecay(min_layers=4), "min_layers=4 but the compiled model has 3 layers"),
    (LayerSubset(skip=(3,)), r"skips layers \[3\]"),
    (LayerSubset(skip=((0,), (1,), (2,))), "3 rows of skipped layers for a batch of 2"),
])
def test_policies_that_do_not_fit_the_model_are_refused(llama, policy, match):
    _, cm, ids, mask = llama
    with pytest.raises(PolicyError, match=match):
        cm.generate(ids, mask, max_new_tokens=2, decode_policy=policy)


def test_json_round_trip_and_uncached_models():
    for p in (DepthDecay(alpha=0.7, min_layers=2), ActivationSkip(budget=0.4), LayerSubset(skip=((1,), (0, 2)))):
        assert decode_policy_from_json(p.to_json()) == p
    plain = routefx.compile(ZOO["plain"].build(), Dense())
    with pytest.raises(UnsupportedModelError, match="needs a KV cache"):
        plain.generate(torch.ones(1, 3, dtype=torch.long), max_new_tokens=2, decode_policy=DepthDecay())
