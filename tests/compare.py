"""The comparison rule: outputs at padding positions (query rows whose attention mask is 0) are undefined in the
models themselves and differ between backends, so every equality is checked on non-padding positions only."""
from __future__ import annotations

import contextlib

import torch


def graph_kwargs(gm, args, kwargs) -> dict:
    """The call as a compiled model's rewritten graph takes it: every input by name, in the graph's order, with
    the constants baked in at capture (use_cache=False) included."""
    names = [n.target for n in gm.graph.nodes if n.op == "placeholder"]
    kw = dict(zip(names, args), **kwargs)
    consts = gm.meta["routefx"].constant_kwargs
    return {n: kw.get(n, consts.get(n)) for n in names}


def main_output(out) -> torch.Tensor:
    """The first tensor of a model output (logits / last_hidden_state / a bare tensor)."""
    if isinstance(out, torch.Tensor):
        return out
    if hasattr(out, "to_tuple"):
        out = out.to_tuple()
    for o in out:
        if isinstance(o, torch.Tensor):
            return o
    raise TypeError(f"no tensor in output of type {type(out).__name__}")


def max_abs_nonpad(out, ref, attention_mask: torch.Tensor | None) -> float:
    """max |out - ref| over positions whose attention mask is 1 (all positions without a mask)."""
    a, b = _outputs(out, ref)
    if attention_mask is None:
        return (a - b).abs().max().item()
    keep = attention_mask.bool()
    return (a[keep] - b[keep]).abs().max().item()


def row_errors(out, ref, attention_mask: torch.Tensor) -> list[float]:
    """max |out - ref| per row (batch entry) over its non-padding positions."""
    a, b = _outputs(out, ref)
    d = (a - b).abs().amax(dim=-1).masked_fill(~attention_mask.bool(), 0)
    return d.amax(dim=-1).tolist()


def _outputs(out, ref) -> tuple[torch.Tensor, torch.Tensor]:
    """The two main outputs, of one shape; a difference of half-precision (or mixed) values taken in fp32."""
    a, b = main_output(out), main_output(ref)
    assert a.shape == b.shape, (a.shape, b.shape)
    if a.dtype != b.dtype or a.dtype in (torch.float16, torch.bfloat16):
        a, b = a.float(), b.float()
    return a, b


def assert_close_nonpad(out, ref, attention_mask, atol: float) -> float:
    err = max_abs_nonpad(out, ref, attention_mask)
    assert err <= atol, f"max abs error {err:.3g} over non-padding positions exceeds {atol:g}"
    return err


def assert_compiles_to_model(model, ids, mask, backends=("eager", "onnx"), policy=None) -> dict:
    """Compile `model` (Dense unless `policy`) on each backend with (ids, mask) as the example and check the logits
    against the model's on non-padding positions (EXACT_REWRITE on eager, ONNX_VS_EAGER elsewhere); returns
    {backend: compiled model}."""
    import routefx
    from routefx.policies import Dense
    from tests.tolerances import EXACT_REWRITE, ONNX_VS_EAGER
    with torch.no_grad():
        ref = model(ids, attention_mask=mask).logits
    out = {}
    for backend in backends:
        cm = routefx.compile(model, policy or Dense(), example_inputs=(ids,), example_kwargs={"attention_mask": mask},
                             backend=backend)
        assert_close_nonpad(cm(ids, attention_mask=mask).logits, ref, mask,
                            EXACT_REWRITE if backend == "eager" else ONNX_VS_EAGER)
        out[backend] = cm
    return out


def padded_ids(vocab: int, seed: int = 3, batch: int = 2, seq: int = 11, pad: int = 3, low: int = 3):
    """(ids [batch, seq] in [low, vocab), attention mask with row 0 left-padded by `pad`): a padded batch."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(low, vocab, (batch, seq), generator=g)
    mask = torch.ones_like(ids)
    mask[0, :pad] = 0
    return ids, mask


def assert_duo_routes_the_mlps(model, calibration, ids, mask, paths, backend="eager", down="down_proj"):
    """Compile `model` with Duo (random routers, the nested small branch) calibrated on `calibration`: the plan routes
    the FFN modules `paths`, its logits on (ids, mask) equal the model's own MLPs routed per token with the plan's
    routers and neuron orders (`tests.reference_ffn.routed_reference`), and every routed layer takes at least two
    routes on them. Returns the compiled model."""
    import routefx
    from routefx.policies import Duo
    from tests.reference_ffn import plan_router, routed_reference
    from tests.tolerances import EXACT_REWRITE, ONNX_VS_EAGER
    cm = routefx.compile(model, Duo(budget=0.5, router="random", small="nested"), calibration=calibration,
                         backend=backend)
    assert list(cm.plan.layers) == list(paths)
    ffns = {key: (plan_router(lp, cm.plan.lam), lp.perm[:lp.k]) for key, lp in cm.plan.layers.items()}
    with torch.no_grad(), routed_reference(model, ffns, down=down):
        ref = model(ids, attention_mask=mask).logits
    assert_close_nonpad(cm(input_ids=ids, attention_mask=mask).logits, ref, mask,
                        EXACT_REWRITE if backend == "eager" else ONNX_VS_EAGER)
    mix = cm.route_stats([{"input_ids": ids, "attention_mask": mask}]).layers
    assert all(sum(f > 0 for f in layer["mix"]) >= 2 for layer in mix)
    return cm


def assert_moe_budget_adapts(model, calibration, ids, mask, blocks: int, budget: float = 0.6):
    """MoEBudget(1.0) compiles to the model itself (EXACT_REWRITE on non-padding positions), MoEBudget(`budget`)
    adapts `blocks` MoE blocks and changes the output; returns the adapted model and its logits on (ids, mask)."""
    import routefx
    from routefx.policies import MoEBudget
    from tests.tolerances import EXACT_REWRITE
    with torch.no_grad():
        ref = model(ids, attention_mask=mask).logits
    # the calibration batches in the form of (ids, mask): one capture serves calibration and the calls
    calibration = [c if "attention_mask" in c else {**c, "attention_mask": torch.ones_like(c["input_ids"])}
                   for c in calibration]
    full = routefx.compile(model, MoEBudget(1.0), calibration=calibration)
    assert_close_nonpad(full(input_ids=ids, attention_mask=mask).logits, ref, mask, EXACT_REWRITE)
    part = routefx.compile(model, MoEBudget(budget), calibration=calibration)
    assert part.report.pass_report("adapt_experts").rewrites == blocks
    out = part(input_ids=ids, attention_mask=mask).logits
    assert (out - ref)[mask.bool()].abs().max().item() > 1e-3   # fewer experts: not the model
    return part, out


@contextlib.contextmanager
def skipped_in_decode(model, skip: dict):
    """skip[j] = bool [B]: in decode steps (one position), layer j of those rows returns its input; it still runs,
    so its cache entries (keys, values, indexer keys) come from the stream that reaches it (routefx's documented
    skip rule). A layer that returns a tuple keeps the rest of it."""
    layers = model.model.layers
    for j, rows in skip.items():
        orig = layers[j].forward

        def forward(hidden_states, *args, orig=orig, rows=rows, **kwargs):
            out = orig(hidden_states, *args, **kwargs)
            first = out[0] if isinstance(out, tuple) else out
            if hidden_states.shape[1] == 1:
                first = torch.where(rows[:, None, None], hidden_states, first)
            return (first, *out[1:]) if isinstance(out, tuple) else first
        layers[j].forward = forward
    try:
        yield model
    finally:
        for j in skip:
            del layers[j].forward
