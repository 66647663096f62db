"""Generation benchmark: tokens/s of Hugging Face eager `generate` against routefx `CompiledModel.generate` on ONNX
Runtime (Dense, and Duo at budget 0.5), in one process, interleaved.

Model: bench/cpu.py's CPU benchmark model (a Llama: 8 layers, hidden 1024, FFN 2816, 16 query / 4 key-value
heads, vocab 32000, random weights, fp32). Prompt 128 random tokens (no padding), 128 new tokens, greedy, no EOS
(every candidate generates all 128). Batch 1 and 8.

Per candidate and batch, the median wall time of `generate(max_new_tokens=128)` and of `generate(max_new_tokens=1)`
(the prefill and the first token), over interleaved rounds in a shuffled order:
  end-to-end tok/s   B * 128 / t(128)
  decode tok/s       B * 127 / (t(128) - t(1)): the decode steps alone
  decode speedup     decode tok/s over routefx ONNX dense's (and over HF eager's)
  bytes-ideal        weight bytes read per decode step, dense / candidate: every weight matrix a step multiplies
                     by (attention, FFN, LM head; one embedding row), with a routed FFN counting the fraction of
                     its rows the step's routes read. Per-token Duo routers at batch B read, per layer, the
                     widest route any row took; the fraction is measured over the generated tokens of the run
                     (`cm.route_stats` on the generated sequences: the routes the whole-sequence graph takes, the
                     same function the decode graph computes), the batch-union from the per-row routes.
                     The KV cache (grown by concatenation, read and re-written once per step) is reported beside it.
Decode-time layer skipping (routefx.generate.decode_policies; the decode graph cut into 2L + 2 per-layer ONNX
graphs): routefx_onnx_pieces_dense (the pieces, no layer skipped: the cost of the cut itself), depth decay
(min_layers L/2, alpha fitted so that the 127 decode steps run the same fraction of layers as LAC) and LAC
(ActivationSkip at budget 0.6 of the layers, threshold fitted on the calibration data). Their bytes-ideal counts,
per decode step, a layer's weights when some row ran it and its K/V projections' weights when some row skipped it
(both from the run's own counts).
routefx_artifact_dense: the dense model exported with `generate=True` and run by `routefx.load(...).generate`
(numpy + onnxruntime, no torch in its loop). Greedy outputs of routefx dense and HF are checked token-identical,
and the artifact's against routefx dense.

Roofline (bench/decode_roofline.py), per batch, measured in the same process right before the batch's rounds:
  weight stream      the median seconds of [B, d] x a weight buffer of the dense decode step's bytes, through torch
                     and through a one-MatMul ONNX Runtime session, the faster; bandwidth = bytes / that at B = 1
  roofline tok/s     B / (weight stream seconds + KV cache bytes / bandwidth), the KV cache read once at the mean
                     length of the decode steps (prompt + new / 2); "of roofline" is decode tok/s over it, "of own"
                     over the roofline of the candidate's own weight bytes (dense bytes / bytes-ideal)
  1.5x HF target     1.5 x HF eager decode tok/s over the roofline: above 1, no fp32 decode reaches it on this machine
  step ms            one ONNX dense decode step, median over 3 x 60 steps in lockstep, per `Stepper` path: the
                     runner's plain call, IO binding (the KV cache kept as OrtValues), numpy arrays (the default:
                     the cache kept as the arrays ONNX Runtime returns); the default's step ms minus the roofline's
                     per-step ms is the step's overhead (everything that is not streaming the bytes)

    .venv/bin/python bench/generate.py            # the real run (~12 min on the quiet 2-core Xeon; 35-40 min on
                                                  # loaded cores), bench/results/generate.json
    .venv/bin/python bench/generate.py --speculative   # self-speculative decoding on the trained tiny Llama:
                                                       # acceptance, tokens per round, speedup over ONNX dense
    .venv/bin/python bench/generate.py --quick    # a 2-layer hidden-256 model, 32 + 16 tokens: checks the script
    .venv/bin/python bench/generate.py --quality  # decode policies on the trained quality model at equal compute
                                                  # (bench/generate_quality.py; writes bench/QUALITY_DECODE.md)
    --threads N   torch's intra-op threads, and so ONNX Runtime's (on a machine loaded by other work, 1 avoids
                  OpenMP spin-waits that slow small eager ops 10x and more)
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import tempfile
import time
import warnings

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
warnings.filterwarnings("ignore")

import torch  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import routefx  # noqa: E402
from routefx.generate import ActivationSkip, DepthDecay, LayerSubset, generate_with_stats  # noqa: E402
from routefx.policies import Dense, Duo  # noqa: E402
from routefx.timing import CPU_WARM_EACH, median_seconds  # noqa: E402
from cpu import FULL, SMOKE, Shape, build_model, loadavg, machine  # noqa: E402
from decode_roofline import (roof_of, roofline, roofline_markdown, step_seconds,  # noqa: E402
                             weight_stream_seconds)

HERE = os.path.dirname(os.path.abspath(__file__))


@dataclasses.dataclass(frozen=True)
class Setup:
    shape: Shape
    prompt: int
    new: int
    batches: tuple[int, ...]
    warmup: int
    reps: int
    cal: tuple[int, int, int]          # calibration batches, batch size, length


REAL = Setup(FULL, 128, 128, (1, 8), 1, 3, (2, 2, 256))
QUICK = Setup(SMOKE, 32, 16, (1, 8), 1, 2, (2, 2, 64))


def weight_bytes(m: Shape) -> dict:
    """Weight bytes one decode step reads (fp32), by part; FFN bytes per layer separately."""
    hd = m.hidden // m.heads
    attn = m.hidden * (m.heads * hd) * 2 + m.hidden * (m.kv_heads * hd) * 2 + 2 * m.hidden   # q, o, k, v, norms
    ffn = 3 * m.hidden * m.ffn
    return {"attention": 4 * attn * m.layers, "ffn_per_layer": 4 * ffn, "ffn": 4 * ffn * m.layers,
            "lm_head": 4 * m.vocab * m.hidden + 4 * m.hidden, "embedding_row": 4 * m.hidden}


LAC_BUDGET = 0.6


def skip_bytes(m: Shape, counts, steps: int) -> float:
    """Mean weight bytes per decode step of a skipping run: per layer, its attention and FFN weights on steps
    where some row ran it, its K/V projections on steps where some row skipped it; LM head and embedding row."""
    wb = weight_bytes(m)
    hd = m.hidden // m.heads
    layer = (wb["attention"] + wb["ffn"]) / m.layers
    kv = 4 * 2 * m.hidden * m.kv_heads * hd
    per_layer = sum(layer * a + kv * b for a, b in zip(counts.layer_calls, counts.kv_calls)) / steps
    return per_layer + wb["lm_head"] + wb["embedding_row"]


def depth_decay_for(layers: int, fraction: float, steps: int) -> DepthDecay:
    """DepthDecay(min_layers=L/2) with alpha bisected so that decode steps 1..steps run `fraction` of the layers
    (as near as the floors allow)."""
    lo, hi = 0.5, 1.0
    for _ in range(40):
        mid = (lo + hi) / 2
        if DepthDecay(alpha=mid, min_layers=max(1, layers // 2)).layer_fraction(layers, steps) > fraction:
            hi = mid
        else:
            lo = mid
    return DepthDecay(alpha=lo, min_layers=max(1, layers // 2))


def kv_bytes(m: Shape, batch: int, length: int) -> int:
    """K/V bytes of all layers at `length` positions (fp32)."""
    return 4 * 2 * m.layers * batch * m.kv_heads * (m.hidden // m.heads) * length


def duo_fraction(cm, seqs: torch.Tensor, prompt: int, batch: int) -> dict:
    """FFN fraction read per decode step: per layer, the widest route any of the `batch` rows took, averaged
    over the generated positions (routes of the whole-sequence graph on the generated sequences)."""
    from routefx.calibrate.record import observe_routes
    from routefx.ir.flops import route_flops
    entry, batches = cm._batch_entry([{"input_ids": seqs, "attention_mask": torch.ones_like(seqs)}])
    g = entry.gm                                                           # the whole-sequence graph
    routed = [n for n in g.graph.nodes if n.op == "call_function" and n.target is torch.ops.routefx.routed_ffn.default]
    (_, routes), = observe_routes(g, routed, batches)
    per_tok, union = [], []
    for n, r in routes.items():
        per = torch.tensor(route_flops(n), dtype=torch.float64)
        per = per / per.max()                                              # fraction of the layer's FFN weights
        c = per[r.reshape(seqs.shape[0], seqs.shape[1], -1).long()].sum(-1)[:, prompt:]   # [B, new]
        per_tok.append(c.mean().item())
        union.append(c.reshape(-1, batch, c.shape[-1]).amax(1).mean().item())
    return {"per_token": sum(per_tok) / len(per_tok), "batch_union": sum(union) / len(union)}


SPEC_PROMPTS = 4


def _spec_model(n_prompts: int = SPEC_PROMPTS):
    """(model, calibration batches, `n_prompts` prompts [1, 64] from held-out text, description): the trained
    quality LM (bench/quality_model.py, 6 layers, d=256, vocab 4096 BPE) when its cache is there, else the tiny
    trained Llama of the tests (4 layers, d=64, byte vocabulary). Several prompts, because greedy decoding of a
    small LM falls into short loops (the first held-out window's continuation repeats two tokens), on which the
    acceptance of a draft depends on which positions a round happens to draft."""
    try:
        import quality_model as qm
        model, tok, info = qm.load_quality_model(train_if_missing=False)
        cal = qm.calibration_batches(tok, n=2, seq_len=128)
        prompts = [b["input_ids"] for b in qm.heldout_batches(tok, n=n_prompts, seq_len=64, batch=1)]
        return model, cal, prompts, f"the trained quality LM ({info['label']})"
    except Exception as e:  # noqa: BLE001 - no cache here (train it with bench/quality_model.py): the stand-in
        print(f"quality model not available ({type(e).__name__}: {e}); using tests/tiny_lm.py", flush=True)
        from tests.tiny_lm import batches, trained_llama
        return (trained_llama(), batches(2, 4, 64, seed=3),
                [b["input_ids"] for b in batches(n_prompts, 1, 64, seed=11, split="heldout")],
                "tests/tiny_lm.py trained_llama() (4 layers, d=64, F=172, vocab 256)")


def _agreement(draft, refs: list, prompt_len: int) -> float:
    """Teacher-forced agreement: on the full model's greedy continuations `refs`, the fraction of positions where
    the draft's next-token argmax equals the full model's token. The per-token acceptance a draft would have if
    every round drafted one token, independent of n and of where rounds start."""
    hits = total = 0
    for r in refs:
        out = draft(input_ids=r)
        logits = out.logits if hasattr(out, "logits") else out[0]
        pred = logits.argmax(-1)[0, prompt_len - 1:-1]
        hits += int((pred == r[0, prompt_len:]).sum())
        total += pred.numel()
    return hits / total


def _best_allowed(alpha: float, cd: float, cv: float) -> float:
    """The best speedup over dense decode a draft with acceptance α and these costs (in dense steps) allows."""
    from routefx.generate.speculative import tokens_per_time
    return max(tokens_per_time(alpha, n, cd, cv) for n in range(1, 9))


def speculative(args) -> dict:
    """Self-speculative decoding on a trained model (acceptance rates only mean something on one; `_spec_model`),
    over several held-out prompts (batch 1 each, one after another): ONNX dense greedy against drafts by
    PruneLayers (one layer; the middle half) and Duo at budget 0.25, n chosen automatically and fixed at 1 and 2.
    Per draft also its teacher-forced agreement with the full model (`_agreement`) and the best speedup its α and
    measured costs allow, max over n of E[tokens per round] / (n c_draft + c_verify) in dense decode steps
    (E = (1 - α^(n+1)) / (1 - α)), which says whether a faster implementation of the same draft could reach a
    target."""
    from routefx.generate.speculative import speculative_generate
    from routefx.policies import PruneLayers
    model, cal, prompts, desc = _spec_model()
    L = model.config.num_hidden_layers
    full = routefx.compile(model, Dense(), backend="onnx")
    drafts = {f"prune_1_of_{L}": routefx.compile(model, PruneLayers(layers=[L // 2]), backend="onnx"),
              f"prune_{L // 2}_of_{L}": routefx.compile(model, PruneLayers(layers=list(range(L // 4, L // 4 + L // 2))),
                                                       backend="onnx"),
              "duo_0.25": routefx.compile(model, Duo(budget=0.25, router="local"), calibration=cal, backend="onnx")}
    new = 64 if args.quick else 128
    kw = dict(max_new_tokens=new, eos_token_id=[])
    refs = [full.generate(p, **kw) for p in prompts]
    plen = int(prompts[0].shape[1])

    def spec_all(d, n):
        return [speculative_generate(full, d, p, n=n, **kw) for p in prompts]
    fns, rows = {"onnx_dense": lambda: [full.generate(p, **kw) for p in prompts]}, []
    for name, d in drafts.items():
        agree = _agreement(d, refs, plen)
        for n in (None, 1, 2):
            key = f"spec_{name}_n{n or 'auto'}"
            res = spec_all(d, n)
            sts = [st for _, st in res]
            drafted, accepted, rounds = (sum(getattr(st, k) for st in sts) for k in ("drafted", "accepted", "rounds"))
            same = all(torch.equal(o, r) for (o, _), r in zip(res, refs))
            rows.append({"candidate": key, "identical_to_greedy": same,
                         "acceptance": accepted / drafted if drafted else 0.0,
                         "tokens_per_round": (accepted + rounds) / rounds if rounds else 0.0,
                         "teacher_forced_agreement": agree, "n_chosen_last": [st.n_chosen[-1] for st in sts],
                         "draft_step_s": sum(st.draft_seconds for st in sts) / len(sts),
                         "verify_s": sum(st.verify_seconds for st in sts) / len(sts)})
            fns[key] = lambda d=d, n=n: spec_all(d, n)
    t = median_seconds(fns, warmup=1, reps=3 if args.quick else 5, shuffle_seed=0, warm_each=CPU_WARM_EACH)
    step = t["onnx_dense"] / (new * len(prompts))       # one dense decode step (prefill amortised in)
    for r in rows:
        r["speedup_vs_onnx_dense"] = t["onnx_dense"] / t[r["candidate"]]
        cd, cv = r["draft_step_s"] / step, r["verify_s"] / step
        r["draft_cost_in_steps"], r["verify_cost_in_steps"] = cd, cv
        r["best_speedup_allowed"] = _best_allowed(r["acceptance"], cd, cv)
        r["best_speedup_allowed_at_agreement"] = _best_allowed(r["teacher_forced_agreement"], cd, cv)
        print({a_: (round(b, 4) if isinstance(b, float) else b) for a_, b in r.items()}, flush=True)
    return {"model": desc, "prompt": plen, "prompts": len(prompts), "new": new, "t_onnx_dense": t["onnx_dense"],
            "rows": rows}


_BEGIN, _END = "<!-- bench/generate.py: begin -->", "<!-- bench/generate.py: end -->"


def markdown(res: dict | None, spec: dict | None) -> str:
    """The generation section of bench/RESULTS.md, every figure from the JSON of a run."""
    L = [_BEGIN, "## Generation (bench/generate.py)", ""]
    if res is not None:
        m, st = res["machine"], res["setup"]
        sh = st["shape"]
        L += [f"Machine: {m['cpu']}, {m['cpu_count']} cores; torch {m['versions']['torch']} ({m['torch_threads']} "
              f"threads), onnxruntime {m['versions']['onnxruntime']} ({m['ort_intra_op_threads']} intra-op threads). "
              f"Model: Llama {sh['layers']} layers, d={sh['hidden']}, F={sh['ffn']}, {sh['heads']}/{sh['kv_heads']} "
              f"heads, vocab {sh['vocab']}, fp32, random weights. Prompt {st['prompt']} tokens, {st['new']} new, "
              f"greedy; {st['warmup']} warm-up + {st['reps']} timed interleaved rounds. Dense weight bytes per "
              f"decode step: {res['dense_weight_bytes_per_step'] / 2**20:.0f} MiB. Growing KV cache (concatenated "
              "in the decode graph).", "",
              "| batch | candidate | end-to-end tok/s | decode tok/s | decode vs ONNX dense | decode vs HF eager | "
              "bytes-ideal vs ONNX dense | efficiency | FFN fraction read | layers run | of roofline | of own "
              "roofline |",
              "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for r in res["rows"]:
            L.append(f"| {r['batch']} | {r['candidate']} | {r['end_to_end_tok_s']:.1f} | {r['decode_tok_s']:.1f} | "
                     f"{r['decode_vs_onnx_dense']:.2f} | {r['decode_vs_hf_eager']:.2f} | "
                     f"{r['bytes_ideal_vs_onnx_dense']:.2f} | {r.get('efficiency', 1.0):.2f} | "
                     f"{r.get('ffn_fraction_read', 1.0):.3f} | {r.get('layer_fraction', 1.0):.3f} | "
                     f"{_frac(r, 'fraction_of_roofline')} | {_frac(r, 'fraction_of_own_roofline')} |")
        same = [r.get("identical_to_hf") for r in res["rows"] if "identical_to_hf" in r]
        L += ["", f"routefx ONNX dense greedy output identical to HF `generate`: {same}."]
        L += roofline_markdown(res.get("roofline"))
    if spec is not None:
        prompts = spec.get("prompts", 1)
        L += ["", f"Self-speculative decoding on {spec['model']}, {prompts} held-out prompt(s) of {spec['prompt']} "
              f"tokens one after another, {spec['new']} new tokens each, batch 1, ONNX backend for the full model and "
              "the drafts:", "",
              "| candidate | identical to greedy | acceptance | agreement (teacher-forced) | tokens/round | last n | "
              "draft step / verify (dense steps) | speedup vs ONNX dense | best its α and costs allow |",
              "|---|---|---:|---:|---:|---|---:|---:|---:|"]
        for r in spec["rows"]:
            costs = (f"{r['draft_cost_in_steps']:.2f} / {r['verify_cost_in_steps']:.2f}"
                     if "draft_cost_in_steps" in r else "–")
            best = f"{r['best_speedup_allowed']:.2f}" if "best_speedup_allowed" in r else "–"
            if "best_speedup_allowed_at_agreement" in r:
                best += f" ({r['best_speedup_allowed_at_agreement']:.2f} at the agreement)"
            agree = f"{r['teacher_forced_agreement']:.3f}" if "teacher_forced_agreement" in r else "–"
            L.append(f"| {r['candidate']} | {r['identical_to_greedy']} | {r['acceptance']:.3f} | {agree} | "
                     f"{r['tokens_per_round']:.2f} | {r['n_chosen_last']} | {costs} | "
                     f"{r['speedup_vs_onnx_dense']:.2f} | {best} |")
        L += ["", "The last column is max over n of E[tokens per round] / (n · draft + verify), E = (1 − α^(n+1)) / "
              "(1 − α), with α and the costs as measured: what the same draft could reach at best. The teacher-forced "
              "agreement is the fraction of the full model's greedy tokens the draft predicts from the same "
              "prefix: the per-token acceptance independent of n and of where rounds start."]
    L += [_END]
    return "\n".join(L) + "\n"


def _frac(r: dict, key: str) -> str:
    return f"{r[key]:.2f}" if key in r else "-"


def write_results_md(res, spec, path=os.path.join(HERE, "RESULTS.md")) -> None:
    """Replace (or append) the generation section of RESULTS.md; bench/report.py rewrites the rest."""
    text = open(path).read() if os.path.exists(path) else ""
    if _BEGIN in text and _END in text:
        text = text[:text.index(_BEGIN)] + text[text.index(_END) + len(_END) + 1:]
    with open(path, "w") as f:
        f.write(text.rstrip() + "\n\n" + markdown(res, spec))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--out", default=None)
    ap.add_argument("--batches", type=int, nargs="+", default=None, help="batch sizes (default 1 8)")
    ap.add_argument("--reps", type=int, default=None, help="timed rounds (default 3; quick 2)")
    ap.add_argument("--warmup", type=int, default=None, help="warm-up rounds (default 1)")
    ap.add_argument("--write-results", action="store_true",
                    help="only render bench/results/generate*.json into the generation section of RESULTS.md")
    ap.add_argument("--speculative", action="store_true",
                    help="only the self-speculative run (the trained quality LM if cached, else the tiny trained "
                         "Llama)")
    ap.add_argument("--quality", action="store_true",
                    help="only the quality of the decode policies on the trained quality model (generate_quality.py)")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch intra-op threads (ONNX Runtime sessions take the same number); default: torch's")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.quality:
        import generate_quality
        generate_quality.main(quick=args.quick, out=args.out)
        return
    if args.write_results:
        load = lambda n: json.load(open(p)) if os.path.exists(p := os.path.join(HERE, "results", n)) else None  # noqa
        spec = load("generate_speculative.json")
        write_results_md(load("generate.json"), spec and spec["speculative"])
        return
    if args.speculative:
        res = {"machine": machine(), "speculative": speculative(args)}
        path = args.out or os.path.join("/tmp" if args.quick else os.path.join(HERE, "results"),
                                        "generate_speculative.json")
        with open(path, "w") as f:
            json.dump(res, f, indent=1, default=str)
        print(f"wrote {path}")
        return
    st = QUICK if args.quick else REAL
    st = dataclasses.replace(st, batches=tuple(args.batches or st.batches), reps=args.reps or st.reps,
                             warmup=st.warmup if args.warmup is None else args.warmup)
    out_path = args.out or (os.path.join("/tmp", "routefx_generate_quick.json") if args.quick
                            else os.path.join(HERE, "results", "generate.json"))
    m = st.shape
    model = build_model(m)
    gen = torch.Generator().manual_seed(0)
    cal = [{"input_ids": torch.randint(3, m.vocab, st.cal[1:], generator=gen)} for _ in range(st.cal[0])]
    t0 = time.perf_counter()
    compiled = {"routefx_onnx_dense": routefx.compile(model, Dense(), backend="onnx"),
                "routefx_onnx_duo_0.5": routefx.compile(model, Duo(budget=0.5, router="local"), calibration=cal,
                                                         backend="onnx")}
    dense = compiled["routefx_onnx_dense"]
    # LAC's threshold: 32 calibration rows (x L layers: the fraction of layers run moves in steps of 1/(32 L))
    lac_cal = [{"input_ids": torch.randint(3, m.vocab, (8, 64), generator=gen)} for _ in range(4)]
    dd = depth_decay_for(m.layers, LAC_BUDGET, st.new - 1)
    skips = {"routefx_onnx_pieces_dense": (dense, LayerSubset(skip=())), "routefx_onnx_depth_decay": (dense, dd),
             "routefx_onnx_lac": (routefx.compile(model, Dense(), calibration=lac_cal, backend="onnx"),
                                  ActivationSkip(budget=LAC_BUDGET))}
    compile_s = {}
    for name, cm in compiled.items():
        t = time.perf_counter()
        cm.generate(torch.ones(1, 4, dtype=torch.long), max_new_tokens=2)   # builds the generation graphs
        compile_s[name] = round(time.perf_counter() - t, 1)
    for name, (cm, pol) in skips.items():
        t = time.perf_counter()
        cm.generate(torch.ones(1, 4, dtype=torch.long), max_new_tokens=2, decode_policy=pol)   # lowers the pieces
        compile_s[name] = round(time.perf_counter() - t, 1)
    t = time.perf_counter()
    art_dir = tempfile.TemporaryDirectory(prefix="routefx_generate_bench_")
    dense(torch.ones(1, 4, dtype=torch.long))                                    # export writes a forward graph
    artifact = routefx.load(routefx.export(dense, os.path.join(art_dir.name, "dense"), generate=True))
    artifact.generate(torch.ones(1, 4, dtype=torch.long), max_new_tokens=2)    # opens the sessions
    compile_s["routefx_artifact_dense"] = round(time.perf_counter() - t, 1)      # export + load
    print(f"compiled in {time.perf_counter() - t0:.0f} s: {compile_s}", flush=True)

    results = {"machine": machine(), "setup": dataclasses.asdict(st), "compile_seconds": compile_s,
               "weight_bytes": weight_bytes(m), "rows": []}
    wb = weight_bytes(m)
    dense_bytes = wb["attention"] + wb["ffn"] + wb["lm_head"] + wb["embedding_row"]
    for B in st.batches:
        prompt = torch.randint(3, m.vocab, (B, st.prompt), generator=gen)
        no_eos = dict(eos_token_id=[], pad_token_id=0)
        fns, outs = {}, {}

        def hf(n, prompt=prompt):
            return model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=n,
                                  min_new_tokens=n, do_sample=False, pad_token_id=0)
        fns["hf_eager_128"], fns["hf_eager_1"] = (lambda: outs.__setitem__("hf_eager", hf(st.new))), lambda: hf(1)
        for name, cm in compiled.items():
            fns[f"{name}_128"] = (lambda cm=cm, name=name: outs.__setitem__(
                name, generate_with_stats(cm, prompt, max_new_tokens=st.new, **no_eos)[0]))
            fns[f"{name}_1"] = lambda cm=cm: cm.generate(prompt, max_new_tokens=1, **no_eos)
        fns["routefx_artifact_dense_128"] = lambda: outs.__setitem__(
            "routefx_artifact_dense", artifact.generate(prompt, max_new_tokens=st.new, **no_eos))
        fns["routefx_artifact_dense_1"] = lambda: artifact.generate(prompt, max_new_tokens=1, **no_eos)
        for name, (cm, pol) in skips.items():
            fns[f"{name}_128"] = (lambda cm=cm, name=name, pol=pol: outs.__setitem__(
                name, generate_with_stats(cm, prompt, max_new_tokens=st.new, decode_policy=pol, **no_eos)[1]))
            fns[f"{name}_1"] = lambda cm=cm, pol=pol: cm.generate(prompt, max_new_tokens=1, decode_policy=pol,
                                                                  **no_eos)
        print(f"batch {B}: load {loadavg()}", flush=True)
        stream = weight_stream_seconds(dense_bytes, m.hidden, sorted({1, B}))
        steps = step_seconds(dense, prompt, steps=60, blocks=3, seed=B)
        t = median_seconds(fns, warmup=st.warmup, reps=st.reps, shuffle_seed=B, warm_each=CPU_WARM_EACH)
        same = torch.equal(outs["hf_eager"], outs["routefx_onnx_dense"])
        duo = duo_fraction(compiled["routefx_onnx_duo_0.5"], outs["routefx_onnx_duo_0.5"], st.prompt, B)
        fr = duo["per_token"] if B == 1 else duo["batch_union"]
        duo_bytes = wb["attention"] + wb["ffn"] * fr + wb["lm_head"] + wb["embedding_row"]
        ideal = {"hf_eager": 1.0, "routefx_onnx_dense": 1.0, "routefx_onnx_duo_0.5": dense_bytes / duo_bytes,
                 "routefx_artifact_dense": 1.0}
        for name in skips:                                 # outs[name]: the GenerationStats of the last timed run
            ideal[name] = dense_bytes / skip_bytes(m, outs[name].skip_counts, st.new - 1)
        dec = {k: B * (st.new - 1) / (t[f"{k}_128"] - t[f"{k}_1"]) for k in ideal}
        roof = roofline(stream, dense_bytes, kv_bytes(m, B, st.prompt + st.new // 2), B, dec, steps)
        results.setdefault("roofline", {})[str(B)] = roof
        print({a: (round(b, 4) if isinstance(b, float) else b) for a, b in roof.items()}, flush=True)
        for k in ideal:
            row = {"batch": B, "candidate": k, "t_new": t[f"{k}_128"], "t_first": t[f"{k}_1"],
                   "end_to_end_tok_s": B * st.new / t[f"{k}_128"], "decode_tok_s": dec[k],
                   "decode_vs_onnx_dense": dec[k] / dec["routefx_onnx_dense"],
                   "decode_vs_hf_eager": dec[k] / dec["hf_eager"], "bytes_ideal_vs_onnx_dense": ideal[k],
                   "fraction_of_roofline": dec[k] / roof["roofline_tok_s"],
                   "fraction_of_own_roofline": dec[k] / roof_of(roof, 1 / ideal[k])}
            if k == "routefx_onnx_duo_0.5":
                row |= {"ffn_fraction_read": fr, "ffn_fraction_per_token": duo["per_token"],
                        "efficiency": row["decode_vs_onnx_dense"] / ideal[k]}
            if k in skips:
                row |= {"layer_fraction": outs[k].layer_fraction, "policy": skips[k][1].to_json(),
                        "efficiency": row["decode_vs_onnx_dense"] / ideal[k]}
            if k == "routefx_onnx_dense":
                row["identical_to_hf"] = same
            if k == "routefx_artifact_dense":
                row["identical_to_onnx_dense"] = torch.equal(outs[k], outs["routefx_onnx_dense"])
            results["rows"].append(row)
            print({a: (round(b, 4) if isinstance(b, float) else b) for a, b in row.items()}, flush=True)
        results[f"kv_bytes_at_end_batch_{B}"] = kv_bytes(m, B, st.prompt + st.new)
        results["dense_weight_bytes_per_step"] = dense_bytes
        os.makedirs(os.path.dirname(out_path), exist_ok=True)
        with open(out_path, "w") as f:                     # after every batch size: a partial run keeps its rows
            json.dump(results, f, indent=1, default=str)
        print(f"wrote {out_path}", flush=True)


if __name__ == "__main__":
    main()
