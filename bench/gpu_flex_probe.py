"""Where the FlexAttention lowering fails on CUDA (issue 12; routefx/backends/triton/attention.py, experimental).

On an H200 (torch 2.11, triton 3.6) the triton backend's graph with `flex_attention=True` failed: Dynamo raised
"Attempt to trace generator", and a CUDA illegal memory access followed (bench/results/gpu_run_2243_h200_flex/).
This script runs each stage alone, each in its own process (an illegal memory access poisons the CUDA context),
with CUDA_LAUNCH_BLOCKING=1 so the failing kernel reports itself, and times the stages that run against SDPA with
the boolean mask (what the captured graph does) at the benchmark's attention shape:

  eager_blocks      routefx's block tensors computed eagerly on CUDA, against torch's create_block_mask
  compiled_blocks   the same under torch.compile (Inductor's sort / reductions), against eager
  torch_flex        torch.compile(flex_attention) with create_block_mask's causal BlockMask (the library's own path)
  flex_eager_blocks torch.compile(flex_sdpa) with block tensors computed eagerly (routefx's BlockMask and mask_mod)
  flex_whole        torch.compile of mask -> blocks -> flex_sdpa in one graph (what the backend compiles)
  llama             a tiny Llama through routefx.compile(..., backend="triton", flex_attention=True)

    PYTHONPATH=$PWD python3 bench/gpu_flex_probe.py --out $OUT        # ~60-120 s on a fresh machine
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
import traceback

DEV = os.environ.get("ROUTEFX_PROBE_DEVICE", "cuda")  # "cpu": a smoke test of the script (small shapes)
STAGES = ["eager_blocks", "compiled_blocks", "torch_flex", "flex_eager_blocks", "flex_whole", "llama"]


def _sync():
    import torch
    if DEV == "cuda":
        torch.cuda.synchronize()


def _inputs(b=4, h=16, s=2048, d=128, pad=37):
    import torch
    if DEV != "cuda":
        b, h, s, d = 2, 2, 300, 32
    g = torch.Generator(device=DEV).manual_seed(0)
    q, k, v = (torch.randn(b, h, s, d, device=DEV, dtype=torch.bfloat16, generator=g) for _ in range(3))
    keep = torch.ones(b, s, dtype=torch.bool, device=DEV)
    keep[-1, :pad] = False
    causal = torch.ones(s, s, dtype=torch.bool, device=DEV).tril()
    mask = causal[None, None] & keep[:, None, None, :]
    return q, k, v, mask


def _time(fn, reps=20) -> float:
    import torch
    for _ in range(3):
        fn()
    _sync()
    t = time.perf_counter()
    for _ in range(reps):
        fn()
    _sync()
    return (time.perf_counter() - t) / reps * 1e3


def _rows(mask, b, h, s):
    return mask.expand(b, h, s, s).any(-1)


def stage(name: str) -> dict:
    import torch
    import torch.nn.functional as F
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    from routefx.backends.triton import attention as fa
    q, k, v, mask = _inputs()
    b, h, s, _ = q.shape
    ref = F.scaled_dot_product_attention(q, k, v, mask)
    out: dict = {"sdpa_mask_ms": _time(lambda: F.scaled_dot_product_attention(q, k, v, mask)),
                 "sdpa_causal_ms": _time(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True))}
    rows = _rows(mask, b, h, s)

    def err(o):
        return float((o.float() - ref.float())[rows].abs().max())

    if name in ("eager_blocks", "compiled_blocks"):
        fn = fa.mask_blocks if name == "eager_blocks" else torch.compile(fa.mask_blocks, fullgraph=True)
        _, kv_num, kv_idx, full_num, full_idx = fn(mask, q, k)
        refbm = create_block_mask(lambda bi, hi, qi, ki: mask[bi, 0, qi, ki], b, 1, s, s, device=DEV)
        out["kv_num_equal"] = bool(torch.equal(kv_num, refbm.kv_num_blocks))
        out["full_num_equal"] = bool(torch.equal(full_num, refbm.full_kv_num_blocks))
        out["kv_idx_range"] = [int(kv_idx.min()), int(kv_idx.max())]
        out["full_idx_range"] = [int(full_idx.min()), int(full_idx.max())]
        out["kv_idx_dtype"] = str(kv_idx.dtype)
    elif name == "torch_flex":
        bm = create_block_mask(lambda bi, hi, qi, ki: mask[bi, 0, qi, ki], b, 1, s, s, device=DEV)
        cf = torch.compile(flex_attention)
        out["max_err"] = err(cf(q, k, v, block_mask=bm))
        out["ms"] = _time(lambda: cf(q, k, v, block_mask=bm))
    elif name == "flex_eager_blocks":
        blocks = fa.mask_blocks(mask, q, k)
        cf = torch.compile(fa.flex_sdpa, fullgraph=True)
        out["max_err"] = err(cf(q, k, v, mask, blocks))
        out["ms"] = _time(lambda: cf(q, k, v, mask, blocks))
    elif name == "flex_whole":
        cf = torch.compile(lambda q, k, v, m: fa.flex_sdpa(q, k, v, m, fa.mask_blocks(m, q, k)), fullgraph=True)
        out["max_err"] = err(cf(q, k, v, mask))
        out["ms"] = _time(lambda: cf(q, k, v, mask))
    elif name == "llama":
        import routefx
        from transformers import LlamaConfig, LlamaForCausalLM
        torch.manual_seed(0)
        cfg = LlamaConfig(hidden_size=512, intermediate_size=1024, num_hidden_layers=2, num_attention_heads=4,
                          num_key_value_heads=2, vocab_size=101)
        model = LlamaForCausalLM(cfg).to(DEV, torch.bfloat16 if DEV == "cuda" else torch.float32).eval()
        ids = torch.randint(1, 101, (2, 700), device=DEV)
        am = torch.ones(2, 700, dtype=torch.long, device=DEV)
        am[0, :37] = 0
        cm = routefx.compile(model, routefx.policies.Dense(), backend="triton",
                             backend_options={"flex_attention": True})
        lo = cm(input_ids=ids, attention_mask=am).logits
        with torch.no_grad():
            hf = model(input_ids=ids, attention_mask=am).logits
        out["max_err_vs_hf"] = float((lo.float() - hf.float())[am.bool()].abs().max())
        out["runner"] = repr(cm.runner)
    _sync()
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=None)
    p.add_argument("--stage", default=None, help="run one stage in this process (used by the parent)")
    p.add_argument("--timeout", type=float, default=100.0, help="seconds per stage")
    args = p.parse_args()
    if args.stage:
        try:
            res = {"ok": True, **stage(args.stage)}
        except Exception as e:  # noqa: BLE001 - report it to the parent
            res = {"ok": False, "error": f"{type(e).__name__}: {e}"[:2000], "traceback": traceback.format_exc()[-6000:]}
        print("RESULT " + json.dumps(res))
        return
    results = {}
    env = {**os.environ, "CUDA_LAUNCH_BLOCKING": "1", "TORCHDYNAMO_VERBOSE": "1"}
    for name in STAGES:
        t = time.perf_counter()
        try:
            r = subprocess.run([sys.executable, __file__, "--stage", name], env=env, capture_output=True, text=True,
                               timeout=args.timeout)
            line = next((ln for ln in r.stdout.splitlines() if ln.startswith("RESULT ")), None)
            res = json.loads(line[7:]) if line else {"ok": False, "error": f"no result (rc {r.returncode})",
                                                       "stderr": r.stderr[-4000:]}
        except subprocess.TimeoutExpired:
            res = {"ok": False, "error": f"timed out after {args.timeout} s"}
        res["seconds"] = round(time.perf_counter() - t, 1)
        results[name] = res
        print(name, json.dumps({k: v for k, v in res.items() if k not in ("traceback", "stderr")}), flush=True)
        if args.out:
            os.makedirs(args.out, exist_ok=True)
            with open(os.path.join(args.out, "gpu_flex_probe.json"), "w") as f:
                json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
