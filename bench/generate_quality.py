"""Quality of the decode-time policies on the trained quality model (bench/quality_model.py), at equal compute.

Run through `bench/generate.py --quality` (or this file). The model comes from the cache
(`ROUTEFX_CACHE`, never retrained here: a missing cache is an error). Eager backend (the reference; the ONNX
pieces compute the same function, tests/generate/test_decode_policies.py).

Candidates, all at about the same weight bytes per decode token as Duo at FFN budget 0.5 (the layer fraction f
solving f·(attn + FFN) + (1 - f)·KV = attn + 0.5·FFN per layer, KV = the K/V projections a skipped layer still
runs; the LM head is the same for all and left out):
    dense            the model (routefx Dense)
    duo_0.5          Duo, local router, FFN budget 0.5, calibrated on the train split
    depth_decay      DepthDecay(min_layers=L/2, alpha fitted so that the decode steps run f of the layers)
    lac              ActivationSkip(budget=f): threshold fitted on 32 calibration prompts from the train split (the
                     fraction run on held-out prompts is measured, not forced: it shows in layers_run)
    static_subset    LayerSubset: the same layers skipped for every sequence, the round((1-f)·L) layers with the
                     smallest mean prompt change on the calibration prompts (a FiRST-style subset without a router)

Metrics, over held-out windows (prompt P tokens, then N tokens of the real continuation):
    agreement        teacher-forced on the real continuation: the fraction of the N positions where the
                     candidate's greedy token equals the dense model's (both fed the same real tokens)
    ppl_heldout      perplexity of the real continuation under the candidate (teacher-forced, its own logits)
    ppl_generated    each candidate generates N tokens greedily from the prompt; the perplexity of that
                     continuation under the dense model (Hugging Face forward on prompt + continuation)
    layers_run, bytes_vs_dense   the measured fraction of layers run in decode, and weight bytes per decode token
                                 relative to dense (attention + FFN + K/V-only, LM head excluded)

    ROUTEFX_CACHE=/work/quality_model_cache .venv/bin/python bench/generate.py --quality   # ~10 min on 2 cores
    ... --quality --quick     # 2 x 4 windows, 32 + 16 tokens: checks the script (~2 min)
    python bench/generate_quality.py --write-results   # only render the JSON into bench/QUALITY_DECODE.md
"""
from __future__ import annotations

import json
import math
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import routefx  # noqa: E402
from routefx.generate import ActivationSkip, DepthDecay, LayerSubset, fit_threshold  # noqa: E402
from routefx.generate.loop import Stepper  # noqa: E402
from routefx.generate.skipping import SkipStepper, prompt_changes  # noqa: E402
from routefx.policies import Dense, Duo  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
_BEGIN, _END = "<!-- bench/generate_quality.py: begin -->", "<!-- bench/generate_quality.py: end -->"


def equal_layer_fraction(cfg, ffn_budget: float = 0.5) -> tuple[float, tuple[int, int, int]]:
    """The layer fraction with the bytes of Duo at `ffn_budget`, and the (attention, FFN, K/V) weights per layer."""
    d, F = cfg.hidden_size, cfg.intermediate_size
    hd = getattr(cfg, "head_dim", None) or d // cfg.num_attention_heads
    attn = 2 * d * cfg.num_attention_heads * hd + 2 * d * cfg.num_key_value_heads * hd
    kv = 2 * d * cfg.num_key_value_heads * hd
    return (attn + ffn_budget * 3 * d * F - kv) / (attn + 3 * d * F - kv), (attn, 3 * d * F, kv)


def _fit_alpha(L: int, f: float, steps: int) -> DepthDecay:
    lo, hi = 0.3, 1.0
    for _ in range(40):
        mid = (lo + hi) / 2
        lo, hi = (lo, mid) if DepthDecay(alpha=mid, min_layers=max(1, L // 2)).layer_fraction(L, steps) > f else \
            (mid, hi)
    return DepthDecay(alpha=lo, min_layers=max(1, L // 2))


def _stepper(cm, mask, policy):
    return Stepper(cm, mask) if policy is None else SkipStepper(cm, mask, policy)


@torch.no_grad()
def teacher_forced(cm, policy, ids, P: int):
    """Logits of positions P-1 .. S-2 (predicting tokens P .. S-1) with the real tokens fed: [B, N, V]."""
    st = _stepper(cm, torch.ones(ids.shape[0], P, dtype=torch.long), policy)
    out = [st.prefill(ids[:, :P])]
    for t in range(P, ids.shape[1] - 1):
        out.append(st.decode(ids[:, t:t + 1]))
    return torch.stack(out, dim=1).float(), st


def main(quick: bool = False, out: str | None = None) -> dict:
    from quality_model import calibration_batches, heldout_batches, load_quality_model
    model, tok, info = load_quality_model(train_if_missing=False)
    P, N, n_batches, rows = (32, 16, 2, 4) if quick else (64, 64, 4, 8)
    held = heldout_batches(tok, n=n_batches, seq_len=P + N, batch=rows)
    cal = calibration_batches(tok, n=2, seq_len=128, batch=8)
    lac_cal = calibration_batches(tok, n=4, seq_len=P, batch=8, seed=99)
    cfg = model.config
    L = cfg.num_hidden_layers
    f, (attn, ffn, kv) = equal_layer_fraction(cfg)
    t0 = time.perf_counter()
    dense = routefx.compile(model, Dense())
    lac_cm = routefx.compile(model, Dense(), calibration=lac_cal)
    duo = routefx.compile(model, Duo(budget=0.5, router="local", small="nested"), calibration=cal)
    mean_change = prompt_changes(lac_cm, lac_cal).mean(0)                       # [L]
    static_skip = tuple(sorted(mean_change.argsort()[:round((1 - f) * L)].tolist()))
    cands = {"dense": (dense, None), "duo_0.5": (duo, None), "depth_decay": (dense, _fit_alpha(L, f, N - 1)),
             "lac": (lac_cm, ActivationSkip(threshold=fit_threshold(lac_cm, ActivationSkip(budget=round(f, 3))))),
             "static_subset": (dense, LayerSubset(skip=static_skip))}
    print(f"{info['label']}\nequal-compute layer fraction {f:.3f}; compile {time.perf_counter() - t0:.0f} s", flush=True)

    ref_logits = [teacher_forced(dense, None, b["input_ids"], P)[0] for b in held]
    rows_out = []
    for name, (cm, pol) in cands.items():
        t = time.perf_counter()
        agree = nll = count = 0
        gen_nll = gen_count = 0
        frac = []
        for b, ref in zip(held, ref_logits):
            ids = b["input_ids"]
            logits, st = teacher_forced(cm, pol, ids, P)
            target = ids[:, P:]
            agree += int((logits.argmax(-1) == ref.argmax(-1)).sum())
            nll += float(torch.nn.functional.cross_entropy(logits.transpose(1, 2), target, reduction="sum"))
            count += target.numel()
            if pol is not None:
                frac.append(st.counts.fraction)
            seq = cm.generate(ids[:, :P], max_new_tokens=N, eos_token_id=[], decode_policy=pol)
            with torch.no_grad():
                lg = model(input_ids=seq).logits[:, P - 1:-1].float()
            gen_nll += float(torch.nn.functional.cross_entropy(lg.transpose(1, 2), seq[:, P:], reduction="sum"))
            gen_count += seq[:, P:].numel()
        lf = sum(frac) / len(frac) if frac else 1.0
        if name == "duo_0.5":
            per_layer = attn + 0.5 * ffn                                        # the Duo budget, calibrated
        else:
            per_layer = lf * (attn + ffn) + (1 - lf) * kv
        row = {"candidate": name, "policy": pol.to_json() if pol else cm.policy.to_json(),
               "agreement": agree / count, "ppl_heldout": math.exp(nll / count),
               "ppl_generated": math.exp(gen_nll / gen_count), "layers_run": lf,
               "bytes_vs_dense": per_layer / (attn + ffn), "seconds": round(time.perf_counter() - t, 1)}
        rows_out.append(row)
        print({k: (round(v, 4) if isinstance(v, float) else v) for k, v in row.items()}, flush=True)
    res = {"model": info["label"], "prompt": P, "new": N, "windows": n_batches * rows, "equal_layer_fraction": f,
           "quick": quick, "rows": rows_out}
    path = out or os.path.join("/tmp" if quick else os.path.join(HERE, "results"), "generate_quality.json")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as fh:
        json.dump(res, fh, indent=1)
    print(f"wrote {path}")
    if not quick:
        with open(os.path.join(HERE, "QUALITY_DECODE.md"), "w") as fh:
            fh.write(markdown(res))
    return res


def markdown(res: dict) -> str:
    L = [_BEGIN, "## Decode-time layer skipping: quality at equal compute (bench/generate_quality.py)", "",
         f"Model: {res['model']}. {res['windows']} held-out windows: prompt {res['prompt']} tokens, then "
         f"{res['new']} tokens. Every skip policy is set to the weight bytes per decode token of Duo at FFN budget "
         f"0.5 (layer fraction {res['equal_layer_fraction']:.3f}: a skipped layer still runs its K/V projections). "
         "Agreement and held-out perplexity are teacher-forced on the real continuation; the generated "
         "continuation (greedy, free-running) is scored by the dense model.", "",
         "| candidate | layers run | bytes vs dense | next-token agreement | held-out ppl | ppl of generated "
         "(dense scores) |", "|---|---:|---:|---:|---:|---:|"]
    for r in res["rows"]:
        L.append(f"| {r['candidate']} | {r['layers_run']:.3f} | {r['bytes_vs_dense']:.3f} | {r['agreement']:.3f} | "
                 f"{r['ppl_heldout']:.2f} | {r['ppl_generated']:.2f} |")
    L += ["", "Reading: the teacher-forced held-out perplexity is the quality measure; the perplexity of a greedy "
          "continuation under the dense model rewards predictable (often repetitive) text, so a value below dense's "
          "is not better quality. Duo's bytes are its calibrated FFN budget (the held-out routes are not counted "
          "here); LAC's threshold is fitted on train-split prompts, and its layers-run fraction on held-out prompts "
          "is measured, not forced; the static subset runs whole layers, so its fraction moves in steps of 1/L. "
          "Eager backend (the ONNX pieces compute the same function).",
          "", "Policies (JSON): " + "; ".join(f"{r['candidate']}: `{r['policy']}`" for r in res["rows"]), _END]
    return "\n".join(L) + "\n"


if __name__ == "__main__":
    if "--write-results" in sys.argv:       # only render bench/results/generate_quality.json
        with open(os.path.join(HERE, "QUALITY_DECODE.md"), "w") as fh:
            fh.write(markdown(json.load(open(os.path.join(HERE, "results", "generate_quality.json")))))
    else:
        main(quick="--quick" in sys.argv)
