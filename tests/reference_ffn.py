"""FFN references built from the model's own modules with hooks, so expected numbers never come from routefx's
FFN code: an FFN restricted to a subset of its neurons, FFN inputs at real tokens, and a routed model."""
from __future__ import annotations

import contextlib

import torch


@contextlib.contextmanager
def neuron_subset(ffn: torch.nn.Module, down: str, neurons):
    """Within the block, `ffn` computes with `neurons` only: the input of its down projection (child `down`) is
    zeroed at every other neuron."""
    proj = ffn.get_submodule(down)
    mask = torch.zeros(proj.in_features)
    mask[neurons] = 1.0
    h = proj.register_forward_pre_hook(lambda mod, inp: (inp[0] * mask,))
    try:
        yield ffn
    finally:
        h.remove()


def ffn_inputs(model, paths, batches) -> dict:
    """{path: [N, d] inputs of the module at `path`, at real tokens}, from running the model on `batches`."""
    got = {p: [] for p in paths}
    keep = {}
    hooks = [model.get_submodule(p).register_forward_pre_hook(
        lambda mod, inp, p=p: got[p].append(inp[0].reshape(-1, inp[0].shape[-1])[keep["m"]])) for p in paths]
    try:
        with torch.no_grad():
            for b in batches:
                ids = b["input_ids"]
                keep["m"] = b.get("attention_mask", torch.ones_like(ids)).bool().reshape(-1)
                model(**b)
    finally:
        for h in hooks:
            h.remove()
    return {p: torch.cat(v) for p, v in got.items()}


@contextlib.contextmanager
def routed_reference(model, ffns: dict, down: str):
    """Route the model's FFN modules per token: `ffns[path] = (routes_fn, neurons)`, where routes_fn(x [B, S, d])
    -> [B, S] route ids (0 skip, 1 the neuron subset `neurons`, 2 all neurons) and `down` names each FFN's down
    projection child."""
    handles, busy = [], set()
    for path, (routes_fn, neurons) in ffns.items():
        ffn = model.get_submodule(path)

        def hook(mod, inp, out, path=path, routes_fn=routes_fn, neurons=neurons):
            if path in busy:
                return None
            busy.add(path)
            try:
                with neuron_subset(mod, down, neurons):
                    small = mod(*inp)
            finally:
                busy.discard(path)
            r = routes_fn(inp[0]).unsqueeze(-1)                                   # [B, S, 1]
            return torch.where(r == 2, out, torch.where(r == 1, small, torch.zeros_like(out)))

        handles.append(ffn.register_forward_hook(hook))
    try:
        yield model
    finally:
        for h in handles:
            h.remove()


def plan_router(lp, lam: float, record: list | None = None):
    """routes_fn of a planned per-token router: argmax(x·Wᵀ + b − λ·cost), written out here."""
    cost = torch.tensor(lp.costs, dtype=lp.weight.dtype)

    def routes(x):
        r = (x @ lp.weight.T + lp.bias - lam * cost).argmax(-1)
        if record is not None:
            record.append(r)
        return r
    return routes
