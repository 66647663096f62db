"""Loss-trained routers: linear routers trained end-to-end on the frozen compiled graph with the language-model
loss plus a compute price, through straight-through Gumbel-softmax gates.

The rewritten graph runs under an fx.Interpreter that replaces each routed FFN by a differentiable mixture
y = Σ_r g_r · FFN_r(x) (every range computed for every token; g one-hot forward, softmax gradient backward), with
router logits x·Wᵀ + b from trainable copies of the router weights. Only the routers learn; gradients flow through
the frozen model (attention, later FFNs). The price μ on expected compute is a dual variable: it rises while the
expected fraction exceeds the budget and falls below it, so training settles near the budget; the budget step
then fits λ exactly on argmax routes.

Shapes: x [B, S, d], logits/gates [B, S, R], cost [R].
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import fx
from torch.fx import _pytree as fx_pytree
from tqdm.auto import tqdm

from routefx.calibrate.data import token_mask
from routefx.ir.activations import get_activation

__all__ = ["train_loss_routers", "LOSS_ROUTER_DEFAULTS"]

LOSS_ROUTER_DEFAULTS = {"steps": 150, "lr": 0.02, "tau": 1.0, "price_lr": 2.0, "seed": 0}


def _ffn_range(x, args, start, end):
    """FFN restricted to neurons [start, end) (routed_ffn's semantics for one range), differentiable in x."""
    _, _, _, w_up, w_gate, w_down, b_up, b_gate, b_down, _, activation = args
    act = get_activation(activation)
    sl = lambda t: None if t is None else t[start:end]  # noqa: E731
    up = F.linear(x, w_up[start:end], sl(b_up))
    h = act(up) if w_gate is None else act.glu(F.linear(x, w_gate[start:end], sl(b_gate)), up)
    return F.linear(h, w_down[:, start:end], b_down)


class _SoftRouting(fx.Interpreter):
    def __init__(self, gm, routers: dict, costs: dict, tau: float, gen: torch.Generator):
        super().__init__(gm)
        self.routers, self.costs, self.tau, self.gen = routers, costs, tau, gen
        self.expected = []                                              # per routed layer: [B, S] E[cost]

    def run_node(self, n):
        if n.name in self.routers:
            args, _ = self.fetch_args_kwargs_from_env(n)
            return self._soft(n.name, args)
        return super().run_node(n)

    def _soft(self, name, args):
        x, ranges = args[0], args[9]
        w, b = self.routers[name]
        logits = F.linear(x.float(), w, b)                              # [B, S, R]
        u = torch.rand(logits.shape, generator=self.gen).clamp(1e-9, 1 - 1e-9)
        soft = F.softmax((logits - torch.log(-torch.log(u))) / self.tau, dim=-1)
        hard = F.one_hot(soft.argmax(-1), soft.shape[-1]).to(soft.dtype)
        gates = hard + soft - soft.detach()                             # straight-through
        self.expected.append((F.softmax(logits, -1) * self.costs[name]).sum(-1))
        y = torch.zeros_like(x, dtype=torch.float32)
        for r in range(len(ranges) // 2):
            s, e = ranges[2 * r], ranges[2 * r + 1]
            if e > s:
                y = y + gates[..., r:r + 1] * _ffn_range(x, args, s, e).float()
        return y.to(x.dtype)


def train_loss_routers(gm: fx.GraphModule, ir, batches: list[dict], target: float, start: dict,
                       progress: bool = True, **options) -> tuple[dict, dict]:
    """Train the routers of the layers in `start` ({key: (weight [R, d], bias [R])}); returns ({key: (w, b)},
    figures of the run)."""
    from routefx.analysis.forced import _logits, routed_layers
    from routefx.analysis.oracle import IGNORE, shifted_labels

    opt = {**LOSS_ROUTER_DEFAULTS, **options}
    ops = dict(routed_layers(gm, ir))
    names = {ops[k].name: k for k in start}
    params = {n: (start[k][0].detach().float().clone().requires_grad_(True),
                  start[k][1].detach().float().clone().requires_grad_(True)) for n, k in names.items()}
    costs = {}
    for n, k in names.items():
        r = ops[k].args[9]
        lens = torch.tensor([r[i + 1] - r[i] for i in range(0, len(r), 2)], dtype=torch.float32)
        costs[n] = lens / lens.max()
    flat = [p for pair in params.values() for p in pair]
    optim = torch.optim.Adam(flat, lr=opt["lr"])
    gen = torch.Generator().manual_seed(opt["seed"])
    mu, hist = 0.0, []
    for step in tqdm(range(opt["steps"]), desc="routefx: loss-trained routers", leave=False, disable=not progress):
        batch = batches[step % len(batches)]
        labels = shifted_labels(batch)
        interp = _SoftRouting(gm, params, costs, opt["tau"], gen)
        with torch.enable_grad():
            out = interp.run(*fx_pytree.tree_flatten_spec(([], batch), gm._in_spec))
            logits = _logits(out)
            ce = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), labels.reshape(-1),
                                 ignore_index=IGNORE)
            keep = token_mask(batch).to(logits.device)
            expected = torch.stack(interp.expected).mean(0)[keep].mean()
            loss = ce + mu * expected
            grads = torch.autograd.grad(loss, flat)
        for p, g in zip(flat, grads):
            p.grad = g
        optim.step()
        mu = max(0.0, mu + opt["price_lr"] * (float(expected) - target))
        hist.append((float(ce), float(expected)))
    out = {names[n]: (w.detach().clone(), b.detach().clone()) for n, (w, b) in params.items()}
    last = hist[-max(1, len(hist) // 10):]
    return out, {"kind": "loss", "steps": opt["steps"], "final_ce": sum(h[0] for h in last) / len(last),
                 "final_expected_fraction": sum(h[1] for h in last) / len(last), "price_mu": mu}
