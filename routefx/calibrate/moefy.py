"""MoEfy calibration (before the passes): per dense FFN, experts by neuron co-activation, and a router.

Per FFN (N real calibration tokens, F neurons, E experts of W = F / E neurons, d hidden):
    h [N, F]        hidden activation: act(x·Wgᵀ)⊙(x·Wuᵀ) gated, act(x·Wuᵀ) plain
    c = |h|·‖W_down[:, i]‖   [N, F]   each neuron's contribution magnitude per token
    experts         balanced spherical k-means on the neurons' patterns c[:, i] (`moefy_cluster.py`); `perm`
                    lists expert 0's neurons first, then expert 1's, ... so expert e is the range [e·W, (e+1)·W)
    mass [N, E]     c summed over each expert's neurons; the router's label: the top-k experts by mass
    router          linear, E logits, trained by cross-entropy on those labels
The decisions go to `plan.layers[key]` (F, k = W, perm, router weight and bias) and `plan.calibration["moefy"]`
(experts, rule, top-k per layer, and per layer the router's accuracy and the share of activation mass its top-k
experts hold). With a rule, the price λ is fitted on the rewritten graph by `FitMoEfyBudget`.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import fx

from routefx.calibrate.block_refs import resolve_blocks
from routefx.calibrate.data import token_mask
from routefx.calibrate.moe_budget import fit_price_into_plan
from routefx.calibrate.moefy_cluster import balanced_kmeans, fit_expert_router, top_k_targets
from routefx.calibrate.record import run_recording
from routefx.compiler.plan import BudgetRecord, LayerBudget, LayerPlan, Plan
from routefx.compiler.policies import MoEfy
from routefx.errors import CalibrationError, PolicyError
from routefx.ir.activations import get_activation
from routefx.ir.ffn import resolve_weight
from routefx.ir.model_ir import BlockInfo, ModelIR
from routefx.ir.price import has_price

__all__ = ["calibrate_moefy", "moefy_blocks", "spread_top_k", "FitMoEfyBudget", "MAX_CLUSTER_TOKENS"]

MAX_CLUSTER_TOKENS = 4096   # tokens (sampled) that describe a neuron's activation pattern for the clustering


def moefy_blocks(policy: MoEfy, ir: ModelIR) -> list[BlockInfo]:
    """The blocks whose dense FFN the policy splits; a `PolicyError` when there is none or one does not fit."""
    dense = {b.index: b for b in ir.dense_ffn_blocks}
    kinds = sorted({b.ffn.kind for b in ir.blocks if b.ffn})
    if policy.layers is None:
        if not dense:
            raise PolicyError(f"MoEfy: the model has no dense FFN to split into experts (found FFN kinds: {kinds}); "
                              "MoEfy splits dense FFNs (gated, mlp)")
        blocks = list(dense.values())
    else:
        blocks = []
        for i in resolve_blocks("MoEfy", policy.layers, ir, keep=lambda b: b.index in dense, by_ffn=True):
            if i not in dense:
                kind = ir.blocks[i].ffn.kind if ir.blocks[i].ffn else "none"
                raise PolicyError(f"MoEfy: block {i} has a {kind} FFN; MoEfy splits dense FFNs (gated, mlp)")
            blocks.append(dense[i])
    for b in blocks:
        n = b.ffn.intermediate_size
        if n % policy.experts:
            divisors = [e for e in range(2, n + 1) if n % e == 0][:12]
            raise PolicyError(f"MoEfy: experts={policy.experts} does not divide the FFN width F={n} of block "
                              f"{b.index} ({b.ffn.path}); experts must divide F into equal ranges (divisors of "
                              f"{n}: {', '.join(map(str, divisors))}, ...)")
    return blocks


def _collect(gm: fx.GraphModule, blocks: list[BlockInfo], batches: list[dict]) -> dict[int, torch.Tensor]:
    """{block index: [N, d] FFN inputs at real tokens, fp32 on CPU}."""
    xs = {b.index: [] for b in blocks}
    for batch in batches:
        vals = run_recording(gm, batch, {b.ffn.match.inp for b in blocks})
        keep = token_mask(batch).reshape(-1)
        for b in blocks:
            x = vals[b.ffn.match.inp].float().cpu()
            xs[b.index].append(x.reshape(-1, x.shape[-1])[keep])
    return {i: torch.cat(v) for i, v in xs.items()}


def _contributions(gm: fx.GraphModule, b: BlockInfo, x: torch.Tensor) -> torch.Tensor:
    """[N, F] |h_i|·‖W_down[:, i]‖ (fp32, CPU)."""
    m = b.ffn.match
    w = {k: (None if getattr(m, k) is None else resolve_weight(gm, getattr(m, k)).detach().float().cpu())
         for k in ("up", "gate", "down", "b_up", "b_gate")}
    act = get_activation(b.ffn.activation)
    up = F.linear(x, w["up"], w["b_up"])
    h = act(up) if w["gate"] is None else act.glu(F.linear(x, w["gate"], w["b_gate"]), up)
    return h.abs() * w["down"].norm(dim=0)


def _captured(mass: torch.Tensor, order: torch.Tensor) -> list[float]:
    """[E] mean share of a token's activation mass held by its first k experts in `order` [N, E], k = 1..E."""
    share = mass / mass.sum(-1, keepdim=True).clamp_min(1e-30)
    return share.gather(-1, order).cumsum(-1).mean(0).tolist()


def spread_top_k(captured: dict[str, list[float]], experts: int, budget: float) -> dict[str, int]:
    """Static top-k per layer under a budget: round(budget·E·L) expert slots (one per layer at least), each added
    where the router's next expert holds the most activation mass."""
    keys = list(captured)
    total = min(max(round(budget * experts * len(keys)), len(keys)), experts * len(keys))
    k = {key: 1 for key in keys}
    for _ in range(total - len(keys)):
        best = max((key for key in keys if k[key] < experts),
                   key=lambda key: captured[key][k[key]] - captured[key][k[key] - 1])
        k[best] += 1
    return k


def calibrate_moefy(policy: MoEfy, gm: fx.GraphModule, ir: ModelIR, batches: list[dict], plan: Plan) -> None:
    blocks = moefy_blocks(policy, ir)
    E = policy.experts
    k_label = policy.top_k if policy.top_k is not None else min(E, max(1, round(policy.budget * E)))
    xs = _collect(gm, blocks, batches)
    gen = torch.Generator().manual_seed(policy.seed)
    stats, captured = {}, {}
    with torch.no_grad():
        for b in blocks:
            x = xs[b.index]                                                     # [N, d]
            contrib = _contributions(gm, b, x)                                  # [N, F]
            sample = torch.randperm(x.shape[0], generator=gen)[:MAX_CLUSTER_TOKENS]
            assign = balanced_kmeans(contrib[sample].T.contiguous(), E, gen)    # [F] expert per neuron
            perm = torch.argsort(assign, stable=True)                           # expert e = [e·W, (e+1)·W)
            mass = (contrib @ F.one_hot(assign, E).float()).double()            # [N, E]
            weight, bias = fit_expert_router(x, top_k_targets(mass, k_label), policy.steps)
            order = torch.argsort(x.double() @ weight.double().T + bias.double(), -1, descending=True)  # [N, E]
            n_neurons = b.ffn.intermediate_size
            plan.layers[b.key] = LayerPlan(F=n_neurons, k=n_neurons // E, perm=perm, router="moefy",
                                           weight=weight.contiguous(), bias=bias.contiguous())
            captured[b.key] = _captured(mass, order)
            stats[b.key] = {"router_top1_accuracy": float((order[:, 0] == mass.argmax(-1)).double().mean()),
                            "mass_captured_by_router": captured[b.key],
                            "mass_captured_best": _captured(mass, mass.argsort(-1, descending=True)),
                            "tokens": int(x.shape[0])}
    if policy.top_k is not None:
        top_k = {key: policy.top_k for key in plan.layers}
    elif policy.rule is None:
        top_k = spread_top_k(captured, E, policy.budget)
    else:
        top_k = {}
    plan.calibration["moefy"] = {"experts": E, "rule": policy.rule, "top_k": top_k, "label_k": k_label,
                                 "layers": stats}
    if top_k:
        realised = sum(top_k.values()) / (E * len(top_k))
        target = policy.budget if policy.budget is not None else policy.top_k / E
        plan.budget = BudgetRecord(target, realised, layers=[LayerBudget(key, [], k / E) for key, k in top_k.items()])


class FitMoEfyBudget:
    """The budget step of MoEfy with a rule: fit the price λ so that the mean share of experts run (over MoEfied
    layers and real calibration tokens) meets the budget; measured on the rewritten graph by `route_stats` (each
    op has E expert ranges of cost 1 and one empty range, and E route slots per token).

    Requires: the λ buffer in the graph. Ensures: `plan.lam` is the fitted λ and the graph's buffer holds it;
    `plan.budget` records the realised fraction and the one at λ = 0."""

    name = "fit_moefy_budget"

    def __call__(self, gm: fx.GraphModule, ir: ModelIR, plan: Plan, batches: list[dict], target: float) -> list[str]:
        if not has_price(gm):
            raise CalibrationError(f"calibration step '{self.name}': contract broken (requires): no λ buffer in "
                                   "the graph (the moefy pass adds it for a rule)")
        at0, st = fit_price_into_plan(self.name, gm, ir, plan, batches, target)
        return [f"MoEfy: λ={plan.lam:.4g} brings the share of experts run on calibration data from "
                f"{at0.budget:.3f} (λ=0) to {st.budget:.3f} (target {target})"]
