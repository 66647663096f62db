"""Duo calibration (before the passes): per routed FFN, neuron importance and order, the small branch width,
route labels and routers. The global price λ is fitted afterwards on the compiled graph (`budget.py`, the
pipeline's budget step).

Importance of neuron i = mean over real tokens |h_i| · ‖W_down[:, i]‖ with h the FFN's hidden activation
(act(x·Wgᵀ)⊙(x·Wuᵀ) gated, act(x·Wuᵀ) plain). Route errors, per token, relative to the residual stream ‖s‖ the
FFN output is added to: skip ‖y_big‖/‖s‖, small ‖y_small − y_big‖/‖s‖, big 0.
"""
from __future__ import annotations

import dataclasses
import math

import torch
import torch.nn.functional as F
from torch import fx
from tqdm.auto import tqdm

from routefx.calibrate.block_refs import resolve_blocks
from routefx.calibrate.data import token_mask
from routefx.calibrate.record import run_recording
from routefx.calibrate.routers import ROUTER_TRAINERS
from routefx.calibrate.search import bisect_decreasing
from routefx.compiler.plan import LayerPlan, Plan
from routefx.compiler.policies import Duo
from routefx.errors import PolicyError, UnsupportedModelError
from routefx.ir.activations import get_activation
from routefx.ir.ffn import resolve_weight
from routefx.ir.model_ir import BlockInfo, ModelIR

__all__ = ["calibrate_duo", "LayerData", "routed_blocks", "shrunk_fit"]


@dataclasses.dataclass
class LayerData:
    """Calibration tensors of one FFN at real tokens. N tokens, d hidden."""

    x: torch.Tensor            # [N, d] FFN input
    stream_norm: torch.Tensor  # [N] ‖residual stream‖ the FFN output is added to
    y_big: torch.Tensor        # [N, d] FFN output (all neurons)
    y_small: torch.Tensor      # [N, d] FFN output of the first k neurons (after permutation)

    def errors(self) -> torch.Tensor:
        """[N, 3] relative error of skip / small / big."""
        s = self.stream_norm.clamp_min(1e-12)
        return torch.stack([self.y_big.norm(dim=-1) / s, (self.y_small - self.y_big).norm(dim=-1) / s,
                            torch.zeros_like(s)], dim=-1)


def routed_blocks(policy: Duo, ir: ModelIR) -> list[BlockInfo]:
    dense = {b.index: b for b in ir.dense_ffn_blocks}
    if policy.layers is None:
        if not dense:
            kinds = sorted({b.ffn.kind for b in ir.blocks if b.ffn})
            why = next((f"; block {b.index}'s FFN is not read: {b.ffn.reason}" for b in ir.blocks
                        if b.ffn and b.ffn.kind == "unknown" and b.ffn.reason), "")
            raise PolicyError(f"Duo: the model has no dense FFN to route (found FFN kinds: {kinds}{why}); Duo routes "
                              "dense FFNs (gated, mlp) with a recognised activation"
                              + ("; MoE blocks take the MoEBudget policy" if "moe" in kinds else ""))
        return list(dense.values())
    out = []
    for i in resolve_blocks("Duo", policy.layers, ir, keep=lambda b: b.index in dense, by_ffn=True):
        if i not in dense:
            kind = ir.blocks[i].ffn.kind if ir.blocks[i].ffn else "none"
            raise PolicyError(f"Duo: block {i} has a {kind} FFN; Duo routes dense FFNs (gated, mlp)")
        out.append(dense[i])
    return out


def _weights(gm, block: BlockInfo):
    m = block.ffn.match
    w = {k: (None if getattr(m, k) is None else resolve_weight(gm, getattr(m, k)).detach().float())  # fp32 math
         for k in ("up", "gate", "down", "b_up", "b_gate", "b_down")}
    return w


def _hidden(x, w, act):
    """[N, n_neurons] hidden activation of the FFN."""
    up = F.linear(x, w["up"], w["b_up"])
    if w["gate"] is None:
        return act(up)
    return act.glu(F.linear(x, w["gate"], w["b_gate"]), up)


def _collect(gm: fx.GraphModule, blocks: list[BlockInfo], batches: list[dict]):
    wanted = {n for b in blocks for n in (b.ffn.match.inp, b.ffn_stream)}
    xs = {b.index: [] for b in blocks}
    ss = {b.index: [] for b in blocks}
    for batch in batches:
        vals = run_recording(gm, batch, wanted)
        keep = token_mask(batch).reshape(-1)
        for b in blocks:
            x = vals[b.ffn.match.inp].float()       # statistics in fp32 on the model's device
            s = vals[b.ffn_stream].float()
            if x.numel() // x.shape[-1] != keep.numel():
                raise UnsupportedModelError(
                    f"Duo: block {b.index}'s FFN sees {x.numel() // x.shape[-1]} positions for a batch of "
                    f"{keep.numel()} input tokens {list(token_mask(batch).shape)}; calibration maps FFN positions "
                    "to input tokens one to one, so a model that adds positions of its own (prompt or modality "
                    "tokens) is not supported")
            xs[b.index].append(x.reshape(-1, x.shape[-1])[keep])
            # per token over all of its stream values (several parallel streams with hyper-connections)
            ss[b.index].append(s.reshape(keep.numel(), -1)[keep].norm(dim=-1))
    return {i: torch.cat(v) for i, v in xs.items()}, {i: torch.cat(v) for i, v in ss.items()}


def _label_threshold(errors: list[torch.Tensor], costs: list[torch.Tensor], budget: float) -> float:
    """One global τ: each (token, layer) takes its cheapest route with error <= τ; τ meets the budget."""
    def fraction(tau):
        tot, n = 0.0, 0
        for e, c in zip(errors, costs):
            ok = e <= tau                                   # [N, 3]; big (error 0) is always ok
            first = ok.float().argmax(dim=-1)               # cheapest ok route (routes ordered by cost)
            tot += c[first].sum().item()
            n += e.shape[0]
        return tot / n
    return bisect_decreasing(fraction, budget, 0.0, max(float(e.max()) for e in errors) + 1e-9, iters=60).hi


def _static_choice(errors: list[torch.Tensor], costs: list[torch.Tensor], budget: float):
    """One route per layer, as near the budget as one-branch-per-layer allows, then with the least mean error.

    Exact dynamic programme over layers on the total cost (kept to 1e-6): states are reachable cost sums.
    """
    mean_err = [e.mean(0).tolist() for e in errors]                  # per layer: [skip, small, big]
    states: dict[float, tuple[float, list[int]]] = {0.0: (0.0, [])}  # total cost -> (least error, choice)
    for me, c in zip(mean_err, costs):
        nxt: dict[float, tuple[float, list[int]]] = {}
        for total, (err, choice) in states.items():
            for r in range(len(me)):
                key = round(total + float(c[r]), 6)
                cand = (err + me[r], choice + [r])
                if key not in nxt or cand[0] < nxt[key][0]:
                    nxt[key] = cand
        states = nxt
    L = len(costs)
    total = min(states, key=lambda t: (round(abs(t / L - budget), 9), states[t][0]))
    return states[total][1], total / L


# Shrinkage strengths tried for the separate branch's down projection, relative to the Gram matrix's mean diagonal;
# `inf` keeps the nested initialisation (the top-k neurons' own down columns).
SEPARATE_SHRINK = (1e-6, 1e-4, 1e-3, 1e-2, 1e-1, 1.0, 10.0, float("inf"))
SEPARATE_VAL_EVERY = 5  # every 5th calibration token is held out to choose the shrinkage


def fit_separate_branch(lp: LayerPlan, w: dict, h_top: torch.Tensor, y_big: torch.Tensor,
                        top: torch.Tensor, record: dict | None = None) -> torch.Tensor:
    """Separate small branch: up/gate rows of the top-k neurons, and a down projection W fitted by least squares
    so that h_top · Wᵀ + b_down ≈ y_big on the calibration tokens, shrunk towards the nested initialisation W0
    (the top-k neurons' own down columns): W = argmin ‖H W − T‖² + s ‖W − W0‖². The strength s is chosen on
    every 5th calibration token held out (from `SEPARATE_SHRINK`; s = inf is W0 itself), then W is refitted on all
    tokens. With few calibration tokens against k (an underdetermined fit) this stays near the nested branch
    instead of overfitting; with many it is the plain least-squares fit. Returns the fitted output [N, d]; the chosen
    strength goes to `record["shrink"]` ("nested" for W0 itself) when a dict is given.
    """
    pick = lambda t: None if t is None else t[top].clone()  # noqa: E731
    lp.small_up, lp.small_gate, lp.small_b_up, lp.small_b_gate = (pick(w["up"]), pick(w["gate"]), pick(w["b_up"]),
                                                                  pick(w["b_gate"]))
    H = h_top.double()                                                      # [N, k]
    target = y_big.double() - (0 if w["b_down"] is None else w["b_down"].double())  # [N, d]
    w0 = w["down"][:, top].double().T                                       # [k, d]
    val = torch.zeros(H.shape[0], dtype=torch.bool, device=H.device)
    val[SEPARATE_VAL_EVERY - 1::SEPARATE_VAL_EVERY] = True
    best = min(SEPARATE_SHRINK, key=lambda s: _val_error(shrunk_fit(H[~val], target[~val], w0, s),
                                                         H[val], target[val]) if val.any() else 0.0)
    sol = shrunk_fit(H, target, w0, best)                                  # [k, d]
    if record is not None:
        record["shrink"] = best if best != float("inf") else "nested"   # JSON has no inf
    small_down = sol.T.to(w["down"].dtype).contiguous()                     # [d, k]
    lp.small_down = small_down.cpu()                                        # plans hold CPU tensors
    return F.linear(h_top, small_down, w["b_down"])


def shrunk_fit(H: torch.Tensor, T: torch.Tensor, w0: torch.Tensor, rel: float) -> torch.Tensor:
    """argmin_W ‖H W − T‖² + s ‖W − W0‖², s = rel · mean diag(HᵀH) (rel = inf: W0)."""
    if rel == float("inf"):
        return w0
    gram = H.T @ H
    s = rel * gram.diagonal().mean().clamp_min(1e-12)
    eye = torch.eye(H.shape[1], dtype=H.dtype, device=H.device)
    return torch.linalg.solve(gram + s * eye, H.T @ T + s * w0)


def _val_error(W: torch.Tensor, H: torch.Tensor, T: torch.Tensor) -> float:
    return float(((H @ W - T) ** 2).sum())


def _pooled_scores(gm: fx.GraphModule, blocks: list, xs: dict) -> dict:
    """Neuron importance summed over the runs of an FFN module that a looped model runs in several routed blocks
    ({module path: [F]}): with nested small branches the runs then share one permutation, and so one permuted
    copy of the weights (PermuteNeurons reuses a copy that is equal), instead of one copy per run."""
    by_path: dict = {}
    for b in blocks:
        if b.ffn.path:
            by_path.setdefault(b.ffn.path, []).append(b)
    out = {}
    for path, runs in by_path.items():
        if len(runs) > 1:
            with torch.no_grad():
                w = _weights(gm, runs[0])
                act = get_activation(runs[0].ffn.activation)
                out[path] = sum(_hidden(xs[b.index], w, act).abs().mean(0) for b in runs) * w["down"].norm(dim=0)
    return out


def calibrate_duo(policy: Duo, gm: fx.GraphModule, ir: ModelIR, batches: list[dict], plan: Plan) -> None:
    blocks = routed_blocks(policy, ir)
    xs, norms = _collect(gm, blocks, batches)
    gen = torch.Generator().manual_seed(policy.seed)
    data: dict[str, LayerData] = {}
    pooled = _pooled_scores(gm, blocks, xs) if policy.small == "nested" else {}
    for b in blocks:
        w = _weights(gm, b)
        act = get_activation(b.ffn.activation)
        n_neurons = b.ffn.intermediate_size
        k = max(1, min(n_neurons - 1, math.floor(policy.small_fraction * n_neurons + 0.5)))
        x = xs[b.index]
        with torch.no_grad():
            h = _hidden(x, w, act)                                          # [N, n_neurons]
            score = pooled.get(b.ffn.path)
            score = h.abs().mean(0) * w["down"].norm(dim=0) if score is None else score   # [n_neurons]
            perm = torch.argsort(score, descending=True, stable=True)
            y_big = F.linear(h, w["down"], w["b_down"])
            top = perm[:k]
            y_small = F.linear(h[:, top], w["down"][:, top], w["b_down"])
        lp = LayerPlan(F=n_neurons, k=k, perm=perm.cpu(), router=policy.router, small=policy.small)
        if policy.small == "separate":
            rec: dict = {}
            y_small = fit_separate_branch(lp, w, h[:, top], y_big, top, rec)
            plan.calibration.setdefault("separate_shrink", {})[b.key] = rec["shrink"]
        plan.layers[b.key] = lp
        data[b.key] = LayerData(x, norms[b.index], y_big, y_small)

    keys = list(data)
    errors = [data[k].errors() for k in keys]
    costs = [torch.tensor(plan.layers[k].costs, dtype=torch.float64) for k in keys]
    errors = [e.double().cpu() for e in errors]
    if policy.router == "static":
        choice, frac = _static_choice(errors, costs, policy.budget)
        for key, r in zip(keys, choice):
            plan.layers[key].static_route = r
        plan.calibration["static_fraction"] = frac
        return
    trainer = ROUTER_TRAINERS[policy.router]
    labels = None
    if trainer.needs_labels:
        tau = _label_threshold(errors, costs, policy.budget)
        labels = [(e <= tau).float().argmax(dim=-1) for e in errors]
        plan.calibration["label_threshold"] = tau
        plan.calibration["label_fraction"] = sum(c[l].sum().item() for c, l in zip(costs, labels)) / sum(
            len(l) for l in labels)
    for i, key in enumerate(tqdm(keys, desc=f"routefx: {policy.router} routers", leave=False,
                                 disable=len(keys) < 4)):
        # hoisted (policy.hoist): layer i's router reads layer i-1's FFN input, so it is fitted on that input
        x_fit = data[keys[i - 1]].x if policy.hoist and i > 0 else data[key].x
        wr, br = trainer.fit(x_fit.cpu(), None if labels is None else labels[i], gen)  # CPU, fp32
        plan.layers[key].weight, plan.layers[key].bias = wr.contiguous(), br.contiguous()
