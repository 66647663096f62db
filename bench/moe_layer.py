"""One MoE layer's experts, in one process, interleaved (`python bench/moe.py --layer [shape options]`):

    hf_experts     the Hugging Face Mixtral experts module as the model runs it (transformers 5: its configured
                   experts implementation, grouped_mm where torch has it)
    routed_ffn     torch.ops.routefx.routed_ffn on the same weights (RaiseMoE's layout: [E*F, d] gate and up,
                   [d, E*F] down), routes = top-k ids, gates = renormalised top-k softmax weights
    reference      routefx.ir.ops.routed_ffn_reference (per route: gather, FFN, gate, index_add)
    dense_equiv    the dense FFN of width top_k * F on all T rows: the FLOP-ideal for equal active FLOPs

for T in 1, 16 and --seq tokens. Reports medians (ms), speedup of routed_ffn over hf_experts and its fraction of
the dense-equivalent's speed; checks every candidate against hf_experts first (max abs difference).
"""
from __future__ import annotations

import json
import os

import torch
import torch.nn.functional as F

from routefx.ir.ops import routed_ffn, routed_ffn_reference
from routefx.timing import CPU_WARM_EACH, median_seconds


def _experts(a):
    """(HF experts module, its implementation name, (w_up, w_gate, w_down) in RaiseMoE's layout, ranges)."""
    import moe  # bench/moe.py: the same model builder
    b = dict(vars(a))
    b["layers"], b["vocab"] = 1, 64
    model = moe.build("moe", type("A", (), b))
    experts = model.model.layers[0].mlp.experts
    E, F2, d = experts.gate_up_proj.shape  # [E, 2F, d]: gate rows first, then up
    Fw = F2 // 2
    gu = experts.gate_up_proj.detach()
    w_gate = gu[:, :Fw].reshape(E * Fw, d).contiguous()
    w_up = gu[:, Fw:].reshape(E * Fw, d).contiguous()
    w_down = experts.down_proj.detach().permute(1, 0, 2).reshape(d, E * Fw).contiguous()  # [E, d, F] -> [d, E*F]
    ranges = [v for e in range(E) for v in (e * Fw, (e + 1) * Fw)]
    return experts, getattr(model.config, "_experts_implementation", None), (w_up, w_gate, w_down), ranges


def main(a) -> None:
    torch.set_num_threads(a.threads)
    experts, impl, (w_up, w_gate, w_down), ranges = _experts(a)
    d, E, K = a.hidden, a.experts, a.top_k
    g = torch.Generator().manual_seed(0)
    dense = [torch.randn(K * a.expert_width, d, generator=g) * 0.02 for _ in range(2)] + \
        [torch.randn(d, K * a.expert_width, generator=g) * 0.02]
    res = {"shape": {k: getattr(a, k) for k in ("hidden", "experts", "expert_width", "top_k", "threads")},
           "hf_experts_implementation": impl, "torch": torch.__version__, "tokens": {}}
    for T in sorted({1, 16, a.seq}):
        x = torch.randn(T, d, generator=g)
        gates, routes = torch.randn(T, E, generator=g).softmax(-1).topk(K, -1)
        gates = gates / gates.sum(-1, keepdim=True)
        args = (x, routes, gates, w_up, w_gate, w_down, None, None, None, ranges, "silu")
        fns = {"hf_experts": lambda: experts(x, routes, gates),
               "routed_ffn": lambda: routed_ffn(*args),
               "reference": lambda: routed_ffn_reference(*args),
               "dense_equiv": lambda: F.linear(F.silu(F.linear(x, dense[0])) * F.linear(x, dense[1]), dense[2])}
        with torch.no_grad():
            ref = experts(x, routes, gates)
            diff = {k: float((fns[k]() - ref).abs().max()) for k in ("routed_ffn", "reference")}
        reps = 15 if T >= 256 else 50
        lat = median_seconds(fns, warmup=3, reps=reps, shuffle_seed=T, warm_each=CPU_WARM_EACH)
        res["tokens"][T] = {"ms": {k: round(v * 1e3, 3) for k, v in lat.items()}, "max_abs_vs_hf": diff,
                            "routed_ffn_speedup_vs_hf": round(lat["hf_experts"] / lat["routed_ffn"], 3),
                            "reference_speedup_vs_hf": round(lat["hf_experts"] / lat["reference"], 3),
                            "routed_ffn_over_dense": round(lat["dense_equiv"] / lat["routed_ffn"], 3)}
        print(T, json.dumps(res["tokens"][T]), flush=True)
    out = os.path.join(os.path.dirname(a.out), "moe_layer.json") if not a.smoke else "/tmp/routefx_moe_layer.json"
    os.makedirs(os.path.dirname(out), exist_ok=True)
    with open(out, "w") as f:
        json.dump(res, f, indent=1)
    print(f"wrote {out}")
