"""Routing-aware fine-tune of separate small branches (SortedNet / LayerSkip-style), a step after compilation.

For a few hundred steps each token takes, at each routed layer, a route drawn at random (skip / small / big with
probabilities `route_probs`, uniform by default) or, with routes="router", the route its compiled router picks;
the separate small branches are trained on the language-model loss of the routed model. Everything else is
frozen: attention, embeddings, the big branches (so forcing every route to big still reproduces the dense model
exactly) and the routers. The small branches thus learn to stand in for the big one in the contexts routing
creates (earlier layers skipped or small), which the post-hoc least-squares fit (`duo.fit_separate_branch`, on
dense-trajectory activations) never sees. On the benchmark LM (bench/QUALITY.md) on-policy routes with a small
learning rate helped a little and uniformly random routes hurt.

Only `Duo(small="separate")` is supported: a nested small branch is the first k neurons of the big one, so
training it would change the dense model too.

The trained weights go into the graph's concatenated FFN tensors in place (rows / columns [F, F+k) of the
routed_ffn weights) and into the plan (`small_up`, `small_gate`, `small_down`, biases), so a model rebuilt from
the plan is the fine-tuned one. `finetune_compiled_` then refits the global price λ on the batches, since the
routers' inputs moved. Shapes: x [B, S, d], routes [B, S], small_up/gate [k, d], small_down [d, k].
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import fx
from torch.fx import _pytree as fx_pytree
from tqdm.auto import tqdm

from routefx.calibrate.loss_router import _ffn_range
from routefx.compiler.plan import Plan
from routefx.errors import PolicyError
from routefx.ir.activations import get_activation
from routefx.ir.model_ir import ModelIR

__all__ = ["FINETUNE_DEFAULTS", "finetune_small_branches_", "finetune_compiled_"]

FINETUNE_DEFAULTS = {"steps": 200, "lr": 3e-5, "seed": 0, "route_probs": None, "routes": "router"}  # bench/QUALITY.md
ROUTE_SOURCES = ("random", "router")   # routes drawn at random, or the compiled routers' own (on-policy)
_PARTS = {"up": (3, "small_up", 0), "gate": (4, "small_gate", 0), "down": (5, "small_down", 1),
          "b_up": (6, "small_b_up", 0), "b_gate": (7, "small_b_gate", 0)}   # routed_ffn arg, plan field, axis


def _small_slices(gm: fx.GraphModule, op: fx.Node, start: int, end: int) -> dict:
    """{part: (graph attribute name, axis)} of the small branch's slice [start, end) in `op`'s weights."""
    out = {}
    for part, (i, _, axis) in _PARTS.items():
        a = op.args[i]
        if a is None:
            continue
        if not (isinstance(a, fx.Node) and a.op == "get_attr"):
            raise PolicyError(f"fine-tune: {op.name}'s {part} weight is computed in the graph ({a}), not a graph "
                              "tensor; supported: routed FFNs whose weights are graph tensors")
        out[part] = (a.target, axis)
    return out


class _SampledRouting(fx.Interpreter):
    """Runs the graph with each routed FFN taking sampled routes; the small branch from trainable tensors."""

    def __init__(self, gm, layers: dict, params: dict, probs: torch.Tensor, gen: torch.Generator, source: str):
        super().__init__(gm)
        self.layers, self.params, self.probs, self.gen, self.source = layers, params, probs, gen, source

    def run_node(self, n):
        if n.name not in self.layers:
            return super().run_node(n)
        args, _ = self.fetch_args_kwargs_from_env(n)
        x, ranges, activation = args[0], args[9], args[10]
        B, S = x.shape[:2]
        if self.source == "router":                                     # the graph's router: [B, S, 1]
            routes = args[1].reshape(B, S)
        else:
            routes = torch.multinomial(self.probs, B * S, replacement=True, generator=self.gen).view(B, S)
        p = self.params[n.name]
        act = get_activation(activation)
        xf = x.float()
        up = F.linear(xf, p["up"], p.get("b_up"))
        h = act(up) if "gate" not in p else act.glu(F.linear(xf, p["gate"], p.get("b_gate")), up)
        b_down = args[8]
        small = F.linear(h, p["down"], None if b_down is None else b_down.float())
        s_big, e_big = ranges[4], ranges[5]
        with torch.no_grad():
            big = _ffn_range(x, args, s_big, e_big).float()
        y = torch.where((routes == 1).unsqueeze(-1), small, torch.zeros_like(small))
        y = torch.where((routes == 2).unsqueeze(-1), big, y)           # skip (route 0) adds nothing
        return y.to(x.dtype)


def finetune_small_branches_(gm: fx.GraphModule, ir: ModelIR, plan: Plan, batches: list[dict],
                             progress: bool = True, **options) -> dict:
    """Fine-tune the separate small branches of every routed layer of a compiled Duo graph in place (graph and
    plan). Options: steps, lr (Adam), seed, routes ("random": drawn with route_probs [p_skip, p_small, p_big],
    default uniform; "router": the compiled routers' own routes, on-policy). Returns the
    figures of the run: mean LM loss under sampled routes over the first and the last tenth of the steps."""
    from routefx.analysis.forced import _logits, routed_layers
    from routefx.analysis.oracle import IGNORE, shifted_labels

    opt = {**FINETUNE_DEFAULTS, **options}
    layers, params, slices = {}, {}, {}
    for key, op in routed_layers(gm, ir):
        lp = plan.layers.get(key)
        if lp is None:
            continue
        if lp.small != "separate":
            raise PolicyError(f"fine-tune: layer {key} has a {lp.small!r} small branch; only separate small "
                              "branches can be fine-tuned without changing the dense model (Duo(small='separate'))")
        ranges = list(op.args[9])
        if len(ranges) != 6 or ranges[4:6] != [0, lp.F] or ranges[2:4] != [lp.F, lp.F + lp.k]:
            raise PolicyError(f"fine-tune: layer {key} has ranges {ranges}; expected Duo's [skip, small "
                              f"[{lp.F}, {lp.F + lp.k}), big [0, {lp.F})]")
        sl = _small_slices(gm, op, lp.F, lp.F + lp.k)
        params[op.name] = {part: getattr(gm, name).detach().narrow(axis, lp.F, lp.k).float().clone()
                           .requires_grad_(True) for part, (name, axis) in sl.items() if part != "b_down"}
        layers[op.name], slices[op.name] = key, sl
    if not layers:
        raise PolicyError("fine-tune: the graph has no routed Duo layer with a separate small branch")
    if opt["routes"] not in ROUTE_SOURCES:
        raise PolicyError(f"fine-tune: routes={opt['routes']!r}; supported: {', '.join(ROUTE_SOURCES)}")
    probs = torch.tensor(opt["route_probs"] or [1 / 3] * 3, dtype=torch.float64)
    if probs.shape != (3,) or (probs < 0).any() or probs.sum() <= 0:
        raise PolicyError(f"fine-tune: route_probs must be 3 non-negative weights (skip, small, big), got "
                          f"{opt['route_probs']!r}")
    flat = [t for p in params.values() for t in p.values()]
    optim = torch.optim.Adam(flat, lr=opt["lr"])
    gen = torch.Generator().manual_seed(opt["seed"])
    hist = []
    for step in tqdm(range(opt["steps"]), desc="routefx: fine-tune small branches", leave=False,
                     disable=not progress):
        batch = batches[step % len(batches)]
        labels = shifted_labels(batch)
        interp = _SampledRouting(gm, layers, params, probs, gen, opt["routes"])
        with torch.enable_grad():
            logits = _logits(interp.run(*fx_pytree.tree_flatten_spec(([], batch), gm._in_spec)))
            loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), labels.reshape(-1),
                                   ignore_index=IGNORE)
            grads = torch.autograd.grad(loss, flat)
        for t, g in zip(flat, grads):
            t.grad = g
        optim.step()
        hist.append(float(loss.detach()))
    with torch.no_grad():
        for name, key in layers.items():
            lp = plan.layers[key]
            for part, (attr, axis) in slices[name].items():
                target = getattr(gm, attr)
                new = params[name][part].detach().to(target.dtype)
                target.narrow(axis, lp.F, lp.k).copy_(new)
                setattr(lp, _PARTS[part][1], new.cpu().clone())
    tenth = max(1, len(hist) // 10)
    return {"kind": "finetune_small", "steps": opt["steps"], "lr": opt["lr"], "routes": opt["routes"],
            "route_probs": probs.tolist(), "first_loss": sum(hist[:tenth]) / tenth,
            "last_loss": sum(hist[-tenth:]) / tenth, "layers": list(layers.values())}


def finetune_compiled_(cm, batches, progress: bool = True, budget_batches=None, **options) -> dict:
    """Fine-tune a compiled Duo model's separate small branches on `batches` (see the module docstring), then
    refit the global price λ on `budget_batches` (default: `batches`; same input form). Mutates `cm`'s graph
    for the batches' input form and its plan; input forms compiled later are rebuilt from the plan, so they get
    the fine-tuned weights too."""
    from routefx.calibrate.budget import FitBudget

    entry, batches = cm._batch_entry(batches)
    info = finetune_small_branches_(entry.gm, entry.ir, entry.plan, batches, progress=progress, **options)
    fit_on = batches if budget_batches is None else cm._batch_entry(budget_batches)[1]
    info["budget_note"] = FitBudget()(entry.gm, entry.ir, entry.plan, fit_on, entry.plan.budget.target)
    entry.plan.calibration["small_finetune"] = {k: v for k, v in info.items() if k != "budget_note"}
    # other input forms hold stale weights: drop them; the next call with such inputs rebuilds from the plan
    cm._entries = {k: v for k, v in cm._entries.items() if v is entry}
    return info
