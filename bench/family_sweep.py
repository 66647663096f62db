"""A robustness sweep over the Hugging Face causal-LM families (transformers' MODEL_FOR_CAUSAL_LM_MAPPING_NAMES):
each family is built from its config class at tiny sizes with random weights (fp32, eval) and run through routefx.
A correctness sweep, not a benchmark; not part of the test suite.

Checks per family (batch 2 x 12 tokens, row 0 left-padded by 3; errors are max |diff| over non-padding positions):
  dense_eager / dense_onnx  compile(Dense) logits vs the HF model (tolerances from tests/tolerances.py)
  duo_eager                 Duo(budget=0.5, small="nested"): compiles, finite, layers routed, budget met
  duo_onnx                  the eager Duo plan on backend onnx: equals the eager Duo model
  prune_eager               PruneLayers(layers=[1]) vs the HF model with that layer deleted (from its layer list, and
                            from the lists of n modules beside it); where blocks are not layers (a recurrence branch
                            and an MLP branch per layer) or layers are of several kinds, every block of the last layer
                            (else of layer 1) vs that layer deleted; "runs" where no such reference exists
  generate_onnx             cm.generate, Dense, onnx, greedy, 6 new tokens: token-identical to HF generate ("runs"
                            where HF generate itself fails on the tiny config, or where it differs from HF's own
                            greedy loop over uncached forwards and routefx equals that loop: RWKV's recurrent path)
  generate_eager            the same on backend eager
  generate_routed           cm.generate with the Duo(0.5) plan (MoEBudget(0.75) where no Duo model compiles) on onnx,
                            greedy, 6 new tokens: token-identical to greedy over whole-sequence calls of that compiled
                            model (routes are per token, so the cache changes nothing they choose)
  moe_eager                 MoEBudget(1.0) vs the HF model (the MoE dispatch raised to routed_ffn), and
                            MoEBudget(0.75): MoE blocks adapted, budget met ("n/a" where no FFN reads as MoE or
                            unknown)
  moe_onnx                  the eager MoEBudget(0.75) plan on backend onnx: equals the eager model (export path)
  half                      the model in bf16 on eager and in fp16 on onnx, Dense, vs the HF model in that dtype
                            (within HALF_VS_HF / ONNX_FP16_VS_EAGER, or within HF's own half-vs-fp32 difference where
                            that is larger), with the same blocks, FFN kinds and raised MoE blocks as in fp32 (casts
                            to float32 in half-precision code: routers, residual streams kept in fp32)
  shapes                    compile(Dense) at batch 2 x 12 on eager and onnx, called at other sizes (1 x 1, 2 x 1,
                            1 x 5, 3 x 20 with padding): each equal to the HF model (a size of 1 is exported at 2,
                            and the model's code may fix or guard sizes: graphs compiled again are counted)

Tiny configs: every family at the sizes of `_TINY` (3 layers); a hybrid whose 3 layers would all be recurrent
(linear attention, Mamba) gets an attention layer as its last (`_with_an_attention_layer`), as its real configs
interleave them and Hugging Face's own `generate` needs one.

Each family runs in a forked child with a time limit; a check's result is written as soon as it is known, so a
family that runs out of time keeps the checks it finished. Results: a table on stdout and JSON (--out).

    nice -n 10 python bench/family_sweep.py [--only llama,qwen3] [--checks dense_eager,...] [--timeout 240]
"""
from __future__ import annotations

import argparse
import copy
import inspect
import json
import multiprocessing as mp
import os
import statistics
import sys
import tempfile
import time
import traceback
import warnings

import torch
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import routefx  # noqa: E402
from routefx.policies import Dense, Duo, MoEBudget, PruneLayers  # noqa: E402
import routefx.backends.onnx  # noqa: E402,F401  -- loaded once here, before the children fork
import routefx.compiler.compile  # noqa: E402,F401
import routefx.generate  # noqa: E402,F401
from routefx.generate.loop import generate_with_stats  # noqa: E402
from tests.compare import max_abs_nonpad, row_errors  # noqa: E402
from tests.tolerances import EXACT_REWRITE, HALF_VS_HF, ONNX_FP16_VS_EAGER, ONNX_VS_EAGER  # noqa: E402

CHECKS = ("dense_eager", "dense_onnx", "duo_eager", "duo_onnx", "prune_eager", "generate_onnx", "moe_eager",
          "moe_onnx", "shapes", "half", "generate_eager", "generate_routed")
VOCAB, HIDDEN, HEADS, KV_HEADS, INTER, LAYERS, HEAD_DIM = 112, 64, 4, 2, 128, 3, 16
B, S, PAD, NEW = 2, 12, 3, 6

# canonical config field -> tiny value; set through the config's own name for it (attribute_map) where it has one
_TINY = {
    "vocab_size": VOCAB, "hidden_size": HIDDEN, "num_hidden_layers": LAYERS, "num_attention_heads": HEADS,
    "num_key_value_heads": KV_HEADS, "intermediate_size": INTER, "max_position_embeddings": 256, "head_dim": HEAD_DIM,
    "n_positions": 256, "n_ctx": 256, "ffn_dim": INTER, "n_inner": INTER, "d_ff": INTER, "d_kv": HEAD_DIM,
    "num_layers": LAYERS, "decoder_layers": LAYERS, "decoder_attention_heads": HEADS, "decoder_ffn_dim": INTER,
    "d_model": HIDDEN, "embed_dim": HIDDEN, "word_embed_proj_dim": HIDDEN, "embedding_size": HIDDEN,
    "pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2, "decoder_start_token_id": 1,
    # MoE and MLA knobs
    "num_experts": 4, "num_local_experts": 4, "n_routed_experts": 4, "moe_num_experts": 4,
    "num_experts_per_tok": 2, "moe_topk": 2, "top_k": 2, "moe_k": 2, "n_shared_experts": 1,
    "num_shared_experts": 1, "moe_intermediate_size": 32, "shared_expert_intermediate_size": 48,
    "expert_intermediate_size": 32, "n_group": 1, "topk_group": 1, "first_k_dense_replace": 1,
    "q_lora_rank": 16, "kv_lora_rank": 16, "qk_rope_head_dim": 8, "qk_nope_head_dim": 8, "v_head_dim": 16,
    "use_cache": True, "tie_word_embeddings": False,
    # CPM-Ant: its FFN width, and its init (std 1.0 gives logits ~30, where fp32 rounding alone is ~2e-3)
    "dim_ff": INTER, "init_std": 0.02,
}
_SKIP_CONFIG_WORDS = ("vision", "audio", "speech", "image", "video", "encoder_config", "text_config")


class Skip(Exception):
    """A family the sweep does not try, with the reason."""


def families() -> list[tuple[str, str]]:
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
    return [(t, c if isinstance(c, str) else c[0]) for t, c in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.items()]


def zoo_types() -> set[str]:
    """model_type of every Hugging Face family tests/zoo.py already builds (read from the built configs)."""
    from tests.zoo import ZOO
    out = set()
    for e in ZOO.values():
        if not e.name.startswith("plain"):
            out.add(e.build().config.model_type)
    return out


def tiny_config(model_type: str, attention_layer: bool = True):
    from transformers import CONFIG_MAPPING
    cls = CONFIG_MAPPING[model_type]
    subs = getattr(cls, "sub_configs", None) or {}
    if subs:
        raise Skip(f"composite config (sub-configs {sorted(subs)}): vision/audio/encoder towers")
    params = set(inspect.signature(cls.__init__).parameters)
    amap = dict(getattr(cls, "attribute_map", {}) or {})
    kw = {}
    for name, value in _TINY.items():
        target = amap.get(name, name)
        if target in params and target not in kw:
            kw[target] = value
    # any other *intermediate* width / expert count a config names its own way
    for p in params:
        if p in kw:
            continue
        if "intermediate" in p and p.endswith("size"):
            kw[p] = 32 if ("moe" in p or "expert" in p) else INTER
    if "qk_rope_head_dim" in kw and "head_dim" in kw:   # MLA: the rotary embedding's width is head_dim
        kw["head_dim"] = kw["qk_rope_head_dim"]
    if "kv_lora_rank" in kw and "num_key_value_heads" in kw:   # MLA: keys and values for every head
        kw["num_key_value_heads"] = HEADS
    if "is_decoder" in params:
        kw["is_decoder"] = True
    try:
        cfg = cls(**kw)
    except Exception as e:  # noqa: BLE001 -- a config that refuses the tiny sizes is recorded, not fatal
        raise Skip(f"config rejects tiny sizes: {type(e).__name__}: {str(e).splitlines()[0][:160]}") from None
    if getattr(cfg, "is_encoder_decoder", False):
        cfg.is_encoder_decoder = False
    return _with_an_attention_layer(cls, params, kw, cfg) if attention_layer else cfg


_RECURRENT_KINDS = ("linear", "mamba")


def _with_an_attention_layer(cls, params: set, kw: dict, cfg):
    """A hybrid whose tiny config (LAYERS layers) holds no attention layer gets one, as its last layer: its real
    configs interleave attention, and without one Hugging Face's own `generate` fails on its cache (no layer
    to read a length from), so the sweep would have no reference for cached generation. The attention label is
    the one the config class's defaults use (else "full_attention")."""
    types = getattr(cfg, "layer_types", None)
    if "attn_layer_indices" in params and not getattr(cfg, "attn_layer_indices", None):        # Bamba
        kw = {**kw, "attn_layer_indices": [LAYERS - 1]}
    elif {"attn_layer_period", "attn_layer_offset"} <= params and isinstance(types, list) \
            and all(any(r in t for r in _RECURRENT_KINDS) for t in types):                       # Jamba
        kw = {**kw, "attn_layer_period": LAYERS, "attn_layer_offset": LAYERS - 1}
    elif "layer_types" in params and isinstance(types, list) and len(types) == LAYERS \
            and all(any(r in t for r in _RECURRENT_KINDS) for t in types):
        try:
            defaults = list(getattr(cls(), "layer_types", None) or [])
        except Exception:  # noqa: BLE001 -- a class whose defaults do not build: the common label
            defaults = []
        label = next((t for t in defaults if not any(r in t for r in _RECURRENT_KINDS)), "full_attention")
        kw = {**kw, "layer_types": types[:-1] + [label]}
    else:
        return cfg
    out = cls(**kw)
    if getattr(out, "is_encoder_decoder", False):
        out.is_encoder_decoder = False
    return out


def build(model_type: str, class_name: str) -> nn.Module:
    import transformers
    cls = getattr(transformers, class_name, None)
    if cls is None:
        raise Skip(f"transformers has no attribute {class_name}")
    cfg = tiny_config(model_type)
    try:
        return _build(cls, cfg)
    except Exception:  # noqa: BLE001 -- a hybrid whose attention layer needs more config (Qwen4-Exp's indexed
        plain = tiny_config(model_type, attention_layer=False)   # attention): built as it was, all recurrent
        if plain.to_dict() == cfg.to_dict():
            raise
        return _build(cls, plain)


def _build(cls, cfg) -> nn.Module:
    torch.manual_seed(0)
    for impl in ("sdpa", "eager", None):
        cfg._attn_implementation = impl or "eager"
        try:
            return _untie(cls(cfg).eval().float())
        except ValueError:
            if impl is None:
                raise


def _untie(model: nn.Module) -> nn.Module:
    """Some families initialise their routers' weights to zero: every expert then scores the same, and top-k
    breaks the ties differently in torch and ONNX Runtime. Constant matrices get random values instead, and
    all-zero hash-routing tables random experts (`_draw_expert_tables`)."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2 and p.numel() > 1 and bool((p == p.flatten()[0]).all()):
                p.copy_(0.02 * torch.randn(p.shape, generator=g))
        _draw_expert_tables(model, g)
    return model


def _draw_expert_tables(model: nn.Module, g: torch.Generator) -> None:
    """Hash routing reads a token-id -> experts table that a checkpoint fills (DeepSeek-V4's `tid2eid`, zeros at
    init: every token would take expert 0 K times). An all-zero integer [vocab, K] buffer gets K distinct random
    experts per token, drawn from the expert count in the config."""
    cfg = model.config
    experts = next((getattr(cfg, k) for k in ("n_routed_experts", "num_local_experts", "num_experts")
                    if isinstance(getattr(cfg, k, None), int)), None)
    for b in model.buffers():
        if experts and b.dim() == 2 and b.shape[0] == cfg.vocab_size and 1 < b.shape[1] <= experts \
                and not b.is_floating_point() and not bool(b.any()):
            b.copy_(torch.stack([torch.randperm(experts, generator=g)[:b.shape[1]] for _ in range(b.shape[0])]))


def inputs(seed=1, batch=B, seq=S, pad=PAD):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (batch, seq), generator=g)
    mask = torch.ones(batch, seq, dtype=torch.long)
    mask[0, :pad] = 0
    return ids, mask


def hf_forward(model, ids, mask):
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask, use_cache=False)


def _layer_list(model, n: int) -> tuple[nn.Module, str] | None:
    """(owner, attribute) of the shallowest ModuleList of n entries: the decoder's layers."""
    best = None
    for name, mod in model.named_modules():
        if isinstance(mod, nn.ModuleList) and len(mod) == n:
            depth = name.count(".")
            if best is None or depth < best[0]:
                best = (depth, name)
    if best is None:
        return None
    owner, _, attr = best[1].rpartition(".")
    return model.get_submodule(owner) if owner else model, attr


def _uniform_layers(cfg) -> bool:
    types = getattr(cfg, "layer_types", None)
    return not types or len(set(types)) == 1


# ---- the checks: each returns (status, detail); status in pass | mismatch | runs; exceptions are failures -----

def check_dense(model, backend):
    ids, mask = inputs(seed=1)
    cm = routefx.compile(model, Dense(), example_inputs=(ids,), example_kwargs={"attention_mask": mask},
                         backend=backend)
    ids, mask = inputs(seed=5)
    err = max_abs_nonpad(cm(ids, attention_mask=mask), hf_forward(model, ids, mask), mask)
    tol = EXACT_REWRITE if backend == "eager" else ONNX_VS_EAGER
    return ("pass" if err <= tol else "mismatch"), f"max abs {err:.2e} (tol {tol:g})"


SHAPES = ((1, 1, 0), (2, 1, 0), (1, 5, 0), (3, 20, 4))   # batch, length, left padding of row 0


def check_shapes(model, state):
    """Dense compiled at the sweep's shape, then called at `SHAPES`: every call equal to the HF model."""
    ids, mask = inputs(seed=1)
    worst, graphs = {}, {}
    for backend in ("eager", "onnx"):
        cm = routefx.compile(model, Dense(), example_inputs=(ids,), example_kwargs={"attention_mask": mask},
                             backend=backend)
        cm(ids, attention_mask=mask)
        errs = []
        for b, s, pad in SHAPES:
            i, m = inputs(seed=20 + b + s, batch=b, seq=s, pad=pad)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)     # "compiled it again for these sizes"
                errs.append(max_abs_nonpad(cm(i, attention_mask=m), hf_forward(model, i, m), m))
        worst[backend] = max(errs)
        graphs[backend] = len(cm._entries) + sum(len(v) for v in cm._guarded.values())
    ok = worst["eager"] <= EXACT_REWRITE and worst["onnx"] <= ONNX_VS_EAGER
    return ("pass" if ok else "mismatch"), (f"max abs eager {worst['eager']:.2e}, onnx {worst['onnx']:.2e} over "
                                            f"{len(SHAPES)} sizes; graphs compiled {graphs}")


def _structure(cm) -> list:
    return [(b.path, len(b.attention), b.ffn.kind if b.ffn else None) for b in cm.ir.blocks]


HALF_SEEDS = (5, 9, 13, 17)    # four batches of HALF_BATCH rows (row 0 left-padded)
HALF_BATCH = 6


def check_half(model, state):
    """Dense on the model in bf16 (eager) and fp16 (onnx) vs the HF model in that dtype, over the rows of
    `HALF_SEEDS` batches; the blocks, FFN kinds and raised MoE blocks as in fp32. Every row equal within the dtype's
    tolerance (or within HF's own half-vs-fp32 difference on that row) passes; so does being as close to the fp32
    model as HF's half forward is (median over rows, up to 1.5x): a rewrite that sums in another order (a raised
    MoE dispatch accumulates in fp32) flips near-tie expert choices on other rows than HF's half forward does, and
    as often."""
    ids, mask = inputs(seed=1)
    kw = dict(example_inputs=(ids,), example_kwargs={"attention_mask": mask})
    full = routefx.compile(model, Dense(), **kw)
    batches = [inputs(seed=s, batch=HALF_BATCH) for s in HALF_SEEDS]
    ref32 = [hf_forward(model, i, m) for i, m in batches]
    full(*batches[0][:1], attention_mask=batches[0][1])      # compiled on first use: its blocks and passes
    want = _structure(full), full.report.pass_report("raise_moe").rewrites if full.ir.blocks else 0
    rows = lambda xs, ys: [e for x, y, (_, m) in zip(xs, ys, batches) for e in row_errors(x, y, m)]  # noqa: E731
    details, ok = [], True
    for dtype, backend, tol in ((torch.bfloat16, "eager", HALF_VS_HF), (torch.float16, "onnx", ONNX_FP16_VS_EAGER)):
        half = copy.deepcopy(model).to(dtype)
        name = str(dtype).removeprefix("torch.")
        try:
            refs = [hf_forward(half, i, m) for i, m in batches]
        except Exception as e:  # noqa: BLE001 - HF's own half-precision forward fails at the tiny config
            details.append(f"{name}: no reference (HF fails: {type(e).__name__})")
            continue
        cm = routefx.compile(half, Dense(), backend=backend, **kw)
        outs = [cm(i, attention_mask=m) for i, m in batches]
        err, own, ours = rows(outs, refs), rows(refs, ref32), rows(outs, ref32)   # vs HF half; HF half, ours vs fp32
        unequal = sum(e > max(tol, o) for e, o in zip(err, own))
        as_close = statistics.median(ours) <= max(tol, 1.5 * statistics.median(own))
        got = _structure(cm), cm.report.pass_report("raise_moe").rewrites if cm.ir.blocks else 0
        same = got == want
        ok &= same and (unequal == 0 or as_close)
        details.append(f"{name} {backend}: max abs vs HF {name} {max(err):.2e} (tol {tol:g}, HF {name} vs fp32 "
                       f"{max(own):.2e})" + ("" if not unequal else f"; {unequal} of {len(err)} rows differ, vs fp32 "
                                             f"median {statistics.median(ours):.2e} (HF {name}'s "
                                             f"{statistics.median(own):.2e})")
                       + ("" if same else f"; blocks/FFNs/raised MoE {got} != fp32 {want}"))
    return ("pass" if ok else "mismatch"), "; ".join(details)


def _cal():
    return [dict(zip(("input_ids", "attention_mask"), inputs(seed=40 + i, batch=3, seq=S))) for i in range(2)]


def check_duo_eager(model, state):
    cal = _cal()
    cm = routefx.compile(model, Duo(budget=0.5, small="nested"), calibration=cal)
    ids, mask = inputs(seed=9)
    out = cm(ids, attention_mask=mask)
    state["duo"] = cm
    logits = out.logits if hasattr(out, "logits") else out[0]
    if not torch.isfinite(logits[mask.bool()]).all():
        return "mismatch", "non-finite logits"
    routed = len(cm.plan.layers)
    if routed == 0:
        return "mismatch", f"no layer routed (silently dense); notes {cm.report.notes}"
    realised = cm.plan.budget.realised
    budget = cm.route_stats(cal).budget
    ok = abs(realised - 0.5) <= 0.02 and abs(budget - realised) < 1e-9
    return ("pass" if ok else "mismatch"), f"{routed} layers routed, budget {realised:.3f} (graph {budget:.3f})"


def _plan_on_onnx(model, ref, what: str, check: str, path: bool = False):
    """The eager model `ref`'s plan compiled on ONNX vs `ref` itself ("n/a" without `ref`: see `check`)."""
    if ref is None:
        return "n/a", f"no eager {what} model (see {check})"
    cm = routefx.compile(model, ref.plan, backend="onnx")
    ids, mask = inputs(seed=9)
    err = max_abs_nonpad(cm(ids, attention_mask=mask), ref(ids, attention_mask=mask), mask)
    return ("pass" if err <= ONNX_VS_EAGER else "mismatch"), \
        f"vs eager {what}: max abs {err:.2e}" + (f" ({cm.runner.export_path})" if path else "")


def check_duo_onnx(model, state):
    return _plan_on_onnx(model, state.get("duo"), "Duo", "duo_eager")


def check_moe_eager(model, state):
    """MoEBudget on the MoE blocks: at budget 1 the model itself (its dispatch raised to routed_ffn); at 0.75 the
    budget met and the MoE blocks adapted. "n/a" for a model without MoE blocks."""
    ids, mask = inputs(seed=1)
    try:
        kinds = [b.ffn.kind for b in routefx.inspect(model, (ids,), {"attention_mask": mask}).blocks if b.ffn]
    except routefx.NoBlocksError:
        return "n/a", "no transformer blocks"
    if not {"moe", "unknown"} & set(kinds):   # an unknown FFN may be an MoE routefx does not read: try it
        return "n/a", f"no MoE block (FFN kinds {sorted(set(kinds))})"
    cal = _cal()
    full = routefx.compile(model, MoEBudget(budget=1.0), calibration=cal)
    ids, mask = inputs(seed=9)
    err = max_abs_nonpad(full(ids, attention_mask=mask), hf_forward(model, ids, mask), mask)
    cm = routefx.compile(model, MoEBudget(budget=0.75), calibration=cal)
    state["moe"] = cm
    adapted = cm.report.pass_report("adapt_experts").rewrites
    realised = cm.plan.budget.realised
    ok = err <= EXACT_REWRITE and adapted > 0 and abs(realised - 0.75) <= 0.02
    return ("pass" if ok else "mismatch"), (f"budget 1 vs HF max abs {err:.2e}; {adapted} MoE blocks adapted, "
                                            f"budget {realised:.3f}")


def check_moe_onnx(model, state):
    return _plan_on_onnx(model, state.get("moe"), "MoEBudget", "moe_eager", path=True)


def check_prune(model, state):
    n = model.config.num_hidden_layers
    ids, mask = inputs(seed=1)
    cm = routefx.compile(model, PruneLayers(layers=[1]), example_inputs=(ids,),
                         example_kwargs={"attention_mask": mask})
    ids, mask = inputs(seed=5)
    out = cm(ids, attention_mask=mask)
    before = len(cm.plan.block_paths)                 # the blocks recognised before pruning
    if len(cm.ir.blocks) != before - 1:
        return "mismatch", f"{len(cm.ir.blocks)} blocks after pruning one of {before}"
    found = _layer_list(model, n)
    if found is None:
        return "runs", "no reference (layer list not found)"
    if before != n or not _uniform_layers(model.config):   # block 1 is not layer 1 (a recurrence branch and an
        return _prune_whole_layer(model, cm.plan.block_paths, n, before)   # MLP branch per layer), or layer
    # 1's deletion would move later layers of other kinds down one index
    try:
        expect = hf_forward(_without_layer(model, n, 1), ids, mask)
    except Exception as e:  # noqa: BLE001 -- other per-layer state indexed by layer number: the reference fails
        return "runs", f"no reference: the model without layer 1 fails ({type(e).__name__}: {e})"
    err = max_abs_nonpad(out, expect, mask)
    return ("pass" if err <= EXACT_REWRITE else "mismatch"), f"vs layer 1 deleted: max abs {err:.2e}"


def _prune_whole_layer(model, block_paths, n, before):
    """Where blocks are not layers, or layers are of several kinds: prune every block of one layer (the blocks whose
    path is that layer's) and compare with the layer deleted. The last layer first (no later layer changes index);
    where routefx refuses that (a hybrid whose only attention layer it is leaves no transformer block), layer 1,
    whose deletion moves later layers down one index (a model that reads per-layer settings by loop index would
    differ from it)."""
    owner, attr = _layer_list(model, n)
    paths = {id(m): name for name, m in model.named_modules()}
    refused = ""
    for j in dict.fromkeys((n - 1, 1)):
        path = paths[id(getattr(owner, attr)[j])]
        blocks = [i for i, p in enumerate(block_paths) if p == path]
        if not blocks or any(p is not None and p.startswith(path + ".") for p in block_paths):
            continue
        ids, mask = inputs(seed=1)
        try:
            cm = routefx.compile(model, PruneLayers(layers=blocks), example_inputs=(ids,),
                                 example_kwargs={"attention_mask": mask})
        except routefx.RoutefxError as e:
            refused = f"; blocks {blocks} (layer {j}) refused: {type(e).__name__}: {str(e)[:160]}"
            continue
        ids, mask = inputs(seed=5)
        try:
            expect = hf_forward(_without_layer(model, n, j), ids, mask)
        except Exception as e:  # noqa: BLE001 -- other per-layer state indexed by layer number: no reference
            return "runs", f"no reference: the model without layer {j} fails ({type(e).__name__}: {e}){refused}"
        err = max_abs_nonpad(cm(ids, attention_mask=mask), expect, mask)
        return (("pass" if err <= EXACT_REWRITE else "mismatch"),
                f"{before} blocks for {n} layers; blocks {blocks} ({path}) vs layer {j} deleted: max abs {err:.2e}"
                + refused)
    return "runs", f"{before} blocks for {n} layers: no layer-deletion reference{refused}"


def _without_layer(model, n: int, j: int) -> nn.Module:
    """A copy of `model` without layer j: deleted from the layer list and from every other list of n modules
    beside it (XLM keeps attentions, layer_norm1, ffns, layer_norm2 as four lists), the owner's layer count
    (XLM's n_layers) one less where it keeps one, and entry j gone from the config's layer_types."""
    ref = copy.deepcopy(model)
    owner, _ = _layer_list(ref, n)
    for name, mod in list(owner.named_children()):
        if isinstance(mod, nn.ModuleList) and len(mod) == n:
            setattr(owner, name, nn.ModuleList([m for i, m in enumerate(mod) if i != j]))
    for name, value in list(vars(owner).items()):
        if type(value) is int and value == n and "layer" in name:
            setattr(owner, name, n - 1)
    types = getattr(ref.config, "layer_types", None)   # read by loop index in some forwards (LFM3)
    if isinstance(types, list) and len(types) == n:
        try:
            ref.config.layer_types = [t for i, t in enumerate(types) if i != j]
        except AttributeError:   # a property derived from another field (Recurrent Gemma's block pattern)
            pass
    return ref


def check_generate(model, backend):
    ids, mask = inputs(seed=3)
    cm = routefx.compile(model, Dense(), backend=backend)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out, stats = generate_with_stats(cm, ids, mask, max_new_tokens=NEW, do_sample=False)   # processors on
    mode = stats.mode.split(" (")[0]
    try:
        with torch.no_grad():
            ref = model.generate(ids, attention_mask=mask, max_new_tokens=NEW, do_sample=False)
    except Exception as e:  # noqa: BLE001 - transformers' own generate fails on this tiny config
        return "runs", f"{mode}; no reference: Hugging Face generate fails ({type(e).__name__}: {str(e)[:200]})"
    if out.shape == ref.shape and torch.equal(out, ref):
        return "pass", f"{mode}, {NEW} tokens equal"
    same = (out[:, S:] == ref[:, S:]).float().mean().item() if out.shape == ref.shape else 0.0
    plain = _uncached_greedy(model, ids, mask)
    if not torch.equal(plain, ref) and out.shape == plain.shape and torch.equal(out, plain):
        return "runs", (f"{mode}, equal to HF's own greedy loop over full forwards ({NEW} tokens); HF generate "
                        f"differs from that loop ({same:.0%} of its tokens equal: its cached path computes other "
                        "numbers)")
    return "mismatch", f"tokens differ (shapes {tuple(out.shape)} / {tuple(ref.shape)}, {same:.0%} equal)"


def check_generate_routed(model, state):
    """Routed generation with the cache equals the same compiled model's greedy over whole sequences."""
    ids, mask = inputs(seed=3)
    plan, what = None, ""
    for check, key, name in ((check_duo_eager, "duo", "Duo"), (check_moe_eager, "moe", "MoEBudget")):
        if key not in state:
            try:
                check(model, state)
            except routefx.RoutefxError:
                pass
        if state.get(key) is not None:
            plan, what = state[key].plan, name
            break
    if plan is None:
        return "n/a", "no Duo or MoEBudget model compiles (see duo_eager, moe_eager)"
    cm = routefx.compile(model, plan, backend="onnx")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out, stats = generate_with_stats(cm, ids, mask, max_new_tokens=NEW, do_sample=False)
    seq = _routed_reference(cm, model, ids, mask)
    mode = stats.mode.split(" (")[0]
    if out.shape == seq.shape and torch.equal(out, seq):
        return "pass", f"{what}, {mode}, {NEW} tokens equal to its uncached greedy"
    same = (out[:, S:] == seq[:, S:]).float().mean().item() if out.shape == seq.shape else 0.0
    return "mismatch", f"{what}, {mode}: tokens differ from its uncached greedy ({same:.0%} equal)"


def _routed_reference(cm, model, ids, mask):
    """Greedy over whole-sequence calls of `cm`, with the logits processors and EOS handling `generate` resolves
    from the model's generation_config (a forced EOS at the last step, a repetition penalty)."""
    from routefx.generate.loop import _Uncached
    from routefx.generate.settings import resolve
    settings = resolve(model, ids, mask, max_new_tokens=NEW, do_sample=False)
    step, seq = _Uncached(cm, mask.clone()), ids
    done = torch.zeros(ids.shape[0], dtype=torch.bool)
    logits = step.prefill(ids)
    for _ in range(NEW):
        nxt = settings.process(seq, logits.float()).argmax(-1)
        nxt = torch.where(done, torch.full_like(nxt, settings.pad), nxt)
        done |= torch.isin(nxt, torch.tensor(settings.eos, dtype=nxt.dtype)) if settings.eos else done
        seq = torch.cat([seq, nxt[:, None]], dim=1)
        if bool(done.all()):
            break
        logits = step.decode(nxt[:, None])
    return seq


def _uncached_greedy(model, ids, mask):
    """Greedy decoding by HF forwards over the whole sequence so far (no cache), positions from the mask."""
    seq = ids
    with torch.no_grad():
        for _ in range(NEW):
            m = torch.cat([mask, mask.new_ones(mask.shape[0], seq.shape[1] - mask.shape[1])], dim=1)
            kw = {"position_ids": (m.cumsum(-1) - 1).clamp(min=0)} \
                if "position_ids" in inspect.signature(model.forward).parameters else {}
            logits = model(input_ids=seq, attention_mask=m, use_cache=False, **kw).logits[:, -1]
            seq = torch.cat([seq, logits.argmax(-1, keepdim=True)], dim=1)
    return seq


def _where(tb) -> str:
    """'routefx' when the innermost routefx frame is the deepest project frame, else the last library named."""
    frames = traceback.extract_tb(tb)
    for f in reversed(frames):
        if "/routefx/" in f.filename:
            return f"routefx:{os.path.basename(f.filename)}:{f.lineno}"
        if "/transformers/" in f.filename:
            return f"transformers:{os.path.basename(f.filename)}:{f.lineno}"
    return os.path.basename(frames[-1].filename) if frames else "?"


def _failure(e: BaseException) -> dict:
    first = (str(e).strip().splitlines() or [""])[0][:300]
    return {"status": "fail", "detail": f"{type(e).__name__}: {first}", "where": _where(e.__traceback__)}


def run_family(model_type: str, class_name: str, checks, path: str) -> None:
    """In the child: build, reference forward, then each check; appends one JSON line per result to `path`."""
    torch.set_num_threads(1)

    def put(check, rec):
        with open(path, "a") as f:
            f.write(json.dumps({"check": check, **rec}) + "\n")

    t0 = time.perf_counter()
    try:
        model = build(model_type, class_name)
        ids, mask = inputs(seed=5)
        out = hf_forward(model, ids, mask)
        logits = out.logits if hasattr(out, "logits") else out[0]
        assert logits.shape[:2] == (B, S), logits.shape
    except Skip as e:
        put("build", {"status": "skip", "detail": str(e)})
        return
    except Exception as e:  # noqa: BLE001 -- the HF model itself failing is recorded (transformers-side)
        put("build", {**_failure(e), "status": "hf_fail"})
        return
    put("build", {"status": "pass", "detail": f"{sum(p.numel() for p in model.parameters())} params",
                  "seconds": round(time.perf_counter() - t0, 1)})
    state = {}
    table = {"dense_eager": lambda: check_dense(model, "eager"), "dense_onnx": lambda: check_dense(model, "onnx"),
             "duo_eager": lambda: check_duo_eager(model, state), "duo_onnx": lambda: check_duo_onnx(model, state),
             "prune_eager": lambda: check_prune(model, state), "generate_onnx": lambda: check_generate(model, "onnx"),
             "generate_eager": lambda: check_generate(model, "eager"),
             "generate_routed": lambda: check_generate_routed(model, state),
             "moe_eager": lambda: check_moe_eager(model, state), "moe_onnx": lambda: check_moe_onnx(model, state),
             "shapes": lambda: check_shapes(model, state), "half": lambda: check_half(model, state)}
    for c in checks:
        t = time.perf_counter()
        try:
            status, detail = table[c]()
            rec = {"status": status, "detail": detail}
        except Exception as e:  # noqa: BLE001 -- every failure is a result of the sweep
            rec = _failure(e)
            if isinstance(e, routefx.RoutefxError):
                rec["status"] = "refused"          # a typed routefx error: judged by its message
                rec["error_type"] = type(e).__name__
        rec["seconds"] = round(time.perf_counter() - t, 1)
        put(c, rec)


def sweep_one(model_type, class_name, checks, timeout) -> dict:
    with tempfile.NamedTemporaryFile("w", suffix=".jsonl", delete=False) as f:
        path = f.name
    ctx = mp.get_context("fork")
    p = ctx.Process(target=run_family, args=(model_type, class_name, checks, path))
    t0 = time.perf_counter()
    p.start()
    p.join(timeout)
    timed_out = p.is_alive()
    if timed_out:
        p.kill()
        p.join()
    res = {"class": class_name, "checks": {}, "seconds": round(time.perf_counter() - t0, 1)}
    with open(path) as f:
        for line in f:
            rec = json.loads(line)
            res["checks"][rec.pop("check")] = rec
    os.unlink(path)
    if timed_out:
        res["timed_out"] = timeout
    elif p.exitcode not in (0, None) and "build" not in res["checks"]:
        res["checks"]["build"] = {"status": "fail", "detail": f"child exited with code {p.exitcode}"}
    return res


_SHORT = {"pass": "ok", "mismatch": "DIFF", "fail": "FAIL", "refused": "refused", "runs": "runs", "skip": "skip",
          "hf_fail": "hf-fail",
          "gen_config": "gencfg", "n/a": "n/a"}


def table(results: dict, checks) -> str:
    lines = [f"{'family':28s} {'build':8s} " + " ".join(f"{c:14s}" for c in checks)]
    for t, r in results.items():
        b = r["checks"].get("build", {"status": "timeout" if r.get("timed_out") else "?"})
        cells = [_SHORT.get(r["checks"].get(c, {}).get("status"), "timeout" if r.get("timed_out") else "-")
                 for c in checks]
        lines.append(f"{t:28s} {_SHORT.get(b['status'], b['status']):8s} " + " ".join(f"{x:14s}" for x in cells))
    counts = {}
    for r in results.values():
        for c in checks:
            s = r["checks"].get(c, {}).get("status")
            if s:
                counts.setdefault(c, {}).setdefault(s, 0)
                counts[c][s] += 1
    lines.append("totals: " + json.dumps(counts))
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", default="", help="comma-separated model types")
    ap.add_argument("--checks", default=",".join(CHECKS))
    ap.add_argument("--timeout", type=float, default=240, help="seconds per family (all its checks)")
    ap.add_argument("--include-zoo", action="store_true", help="also the families tests/zoo.py builds")
    ap.add_argument("--out", default="bench/results/family_sweep.json")
    ap.add_argument("--merge", action="store_true", help="update the families run in an existing --out file (with "
                    "a subset of --checks: only those checks of each family)")
    ap.add_argument("--resume", action="store_true", help="keep the families already in --out, run the rest")
    ap.add_argument("--shard", default="0/1", help="k/n: every n-th family from the k-th (parallel sweeps)")
    ap.add_argument("--combine", nargs="*", help="merge these JSON results into --out, print the table, no run")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    checks = [c for c in args.checks.split(",") if c]
    unknown = set(checks) - set(CHECKS)
    if unknown:
        ap.error(f"unknown checks {sorted(unknown)}; known: {CHECKS}")
    if args.combine:
        results = {}
        for p in args.combine:
            with open(p) as f:
                results.update(json.load(f)["families"])
        results = dict(sorted(results.items()))
        with open(args.out, "w") as f:
            json.dump(_document(results, checks), f, indent=1)
        print(table(results, checks))
        return
    k, n = (int(x) for x in args.shard.split("/"))
    if not 0 <= k < n:
        ap.error(f"--shard {args.shard}: k/n takes k from 0 to n - 1 (every n-th family from the k-th)")
    fams = families()[k::n]
    only = {x for x in args.only.split(",") if x}
    if only:
        fams = [f for f in fams if f[0] in only]
    zoo = set() if args.include_zoo or only else zoo_types()
    results = {}
    if (args.merge or args.resume) and os.path.exists(args.out):
        with open(args.out) as f:
            results = json.load(f)["families"]
    for t, cls in fams:
        if args.resume and t in results:
            continue
        if t in zoo:
            results[t] = {"class": cls, "checks": {"build": {"status": "skip", "detail": "in tests/zoo.py"}}}
            continue
        r = sweep_one(t, cls, checks, args.timeout)
        if args.merge and t in results and set(checks) != set(CHECKS):   # some checks rerun: keep the others
            old = results[t]
            r = {**{k: v for k, v in old.items() if k != "timed_out"}, **r, "checks": {**old["checks"], **r["checks"]}}
        results[t] = r
        brief = {c: v["status"] for c, v in r["checks"].items()}
        print(f"{t:28s} {r['seconds']:6.1f}s {brief}" + (" TIMEOUT" if r.get("timed_out") else ""), flush=True)
        os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
        with open(args.out, "w") as f:   # after each family: a killed sweep keeps what it found
            json.dump(_document(results, _listed(results, checks)), f, indent=1)
    print(table(results, checks))


def _listed(results: dict, checks) -> list:
    """The checks named in the results file: every known check some family has a result for (a --merge of some
    checks keeps the others listed)."""
    have = {c for r in results.values() for c in r["checks"]}
    return [c for c in CHECKS if c in have or c in checks]


def _document(results, checks) -> dict:
    import onnxruntime
    import transformers
    return {"versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                         "onnxruntime": onnxruntime.__version__},
            "checks": checks, "tiny": {"vocab": VOCAB, "hidden": HIDDEN, "heads": HEADS, "kv_heads": KV_HEADS,
                                       "intermediate": INTER, "layers": LAYERS, "batch": B, "seq": S, "pad": PAD},
            "families": results}


if __name__ == "__main__":
    main()
