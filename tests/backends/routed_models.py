"""Hand-built graphs around `routefx::routed_ffn`, independent of the routing passes.

`RoutedStack` is a residual stack of routed FFN layers (RMS-normalised inputs), each with its own router
(`x @ Wr^T + br`, argmax for K = 1, softmax-normalised top-K gates for K > 1) and its own configuration. Its
forward returns the final output, every layer's output and every layer's route ids, so a backend's routes can
be compared with eager.
"""
from __future__ import annotations

import dataclasses

import torch
from torch import nn

import routefx.ir.ops  # noqa: F401  (registers torch.ops.routefx.routed_ffn)

ROUTED_FFN = torch.ops.routefx.routed_ffn.default
NEVER = -1e4  # router bias that keeps a route from ever being picked


@dataclasses.dataclass(frozen=True)
class Layer:
    ranges: tuple[int, ...]          # flat [start0, end0, ...]
    activation: str = "silu"
    gated: bool = True
    k: int = 1                       # routes per token
    gates: bool = False              # softmax gates over the top-K router scores
    bias: bool = False               # b_up, b_gate (when gated) and b_down
    never: tuple[int, ...] = ()      # routes the router never picks (zero tokens at run time)
    repeat: bool = False             # every slot takes the top route: each token picks its route K times


D, F = 24, 40  # hidden, neurons: odd sizes on purpose

# Skip / small / big; MoE-like equal ranges with a skip; overlapping ranges; a route with no tokens; the dense
# fast path (one full range); a token taking the same route twice. Together they use every activation.
LAYERS = (
    Layer((0, 0, 0, 9, 0, F), "silu"),
    Layer((0, 0, 0, 10, 10, 20, 20, 30, 30, F), "gelu", k=2, gates=True, bias=True),
    Layer((0, 0, 0, 16, 8, 32, 0, F), "gelu_tanh", gated=False, k=2, bias=True),
    Layer((0, 0, 0, 5, 0, F, 5, 25), "relu", k=2, gates=True, never=(3,)),
    Layer((0, 0, 0, 13, 0, F), "relu2", gated=False, bias=True),
    Layer((0, 0, 0, 20, 20, F), "sigmoid", k=2),
    Layer((0, 0, 0, 7, 0, F), "quick_gelu", bias=True),
    Layer((0, F), "identity"),
    Layer((0, 0, 0, 12, 0, F), "silu", k=2, gates=True, repeat=True),
)


class RoutedFFNLayer(nn.Module):
    def __init__(self, cfg: Layer, gen: torch.Generator):
        super().__init__()
        self.cfg = cfg
        n_routes = len(cfg.ranges) // 2

        def p(*shape, scale=0.2):
            return nn.Parameter(torch.randn(*shape, generator=gen) * scale)

        self.router = p(n_routes, D, scale=1.0)
        bias = torch.zeros(n_routes)
        bias[list(cfg.never)] = NEVER
        self.router_bias = nn.Parameter(bias)
        self.w_up, self.w_down = p(F, D), p(D, F)
        self.w_gate = p(F, D) if cfg.gated else None
        self.b_up = p(F) if cfg.bias else None
        self.b_gate = p(F) if cfg.bias and cfg.gated else None
        self.b_down = p(D) if cfg.bias else None

    def forward(self, x):
        scores = x @ self.router.T + self.router_bias  # [B, S, R]
        if self.cfg.k == 1:
            routes, gates = torch.argmax(scores, dim=-1, keepdim=True), None  # [B, S, 1]
        else:
            top, routes = torch.topk(scores, self.cfg.k, dim=-1)  # [B, S, K]
            if self.cfg.repeat:
                top, routes = top[..., :1].expand_as(top), routes[..., :1].expand_as(routes)
            gates = torch.softmax(top, dim=-1) if self.cfg.gates else None
        y = ROUTED_FFN(x, routes, gates, self.w_up, self.w_gate, self.w_down, self.b_up, self.b_gate, self.b_down,
                       list(self.cfg.ranges), self.cfg.activation)
        return y, routes


class RoutedStack(nn.Module):
    def __init__(self, layers=LAYERS, seed=0):
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        self.layers = nn.ModuleList([RoutedFFNLayer(cfg, gen) for cfg in layers])

    def forward(self, x):
        outs, routes = [], []
        for layer in self.layers:
            y, r = layer(x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6))  # RMS-normalised input
            x = x + y
            outs.append(y)
            routes.append(r)
        return x, tuple(outs), tuple(routes)


def stack_input(batch: int, seq: int, seed: int = 1) -> torch.Tensor:
    return torch.randn(batch, seq, D, generator=torch.Generator().manual_seed(seed))
