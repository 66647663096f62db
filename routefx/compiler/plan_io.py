"""Plan files: a directory with `plan.json` (decisions, policy, model fingerprint) and `tensors.safetensors`
(neuron permutations, router weights, fitted small branches). No pickle.

plan.json
    format        "routefx-plan", version 1
    policy        the policy's JSON form
    fingerprint   {"params": {name: {"shape", "dtype", "sha256"}}}: the model the plan was calibrated on
    pruned, block_influence, block_paths, lam, calibration   (see `Plan`)
    budget        the budget step's record (`BudgetRecord.to_dict()`), or null
    layers        {key: {"F", "k", "router", "static_route", "small", "tensors": [names]}}; tensor
                  "<key>/<field>" lives in tensors.safetensors
    tensors_sha256   digest of tensors.safetensors
    checksum      sha256 of this JSON without the checksum field (canonical: sorted keys, no spaces)
Any edit, truncation or mismatch is refused with `PlanFormatError`; a plan applied to another model with
`PlanMismatchError` naming the first difference.
"""
from __future__ import annotations

import hashlib
import json
import os

import torch
from safetensors.torch import load, save
from torch import nn

from routefx.errors import PlanFormatError, PlanMismatchError

__all__ = ["fingerprint", "check_fingerprint", "save_plan", "load_plan", "TENSOR_FIELDS"]

FORMAT, VERSION = "routefx-plan", 1
TENSOR_FIELDS = ("perm", "weight", "bias", "small_up", "small_gate", "small_down", "small_b_up", "small_b_gate")


def _digest(t: torch.Tensor) -> str | None:
    """sha256 of the tensor's bytes (first 32 hex digits); None for a tensor without values (`meta` device)."""
    if t.device.type == "meta":
        return None
    t = t.detach().contiguous().cpu()
    return hashlib.sha256(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"").hexdigest()[:32]


def fingerprint(model: nn.Module) -> dict:
    """Parameter names, shapes, dtypes and a hash of each parameter's bytes (None on the `meta` device: a plan
    made there needs no calibration, so it depends on the shapes alone)."""
    return {"params": {name: {"shape": list(p.shape), "dtype": str(p.dtype).removeprefix("torch."),
                              "sha256": _digest(p)}
                       for name, p in model.named_parameters()}}


def check_fingerprint(expected: dict, model: nn.Module) -> None:
    """Raise `PlanMismatchError` at the first difference, in the model's parameter order."""
    have = fingerprint(model)["params"]
    want = expected["params"]
    for name, h in have.items():
        if name not in want:
            raise PlanMismatchError(f"this plan was made for another model: parameter {name!r} is not in the plan")
        spec = want[name]
        for field in ("shape", "dtype", "sha256"):
            if field == "sha256" and None in (h[field], spec[field]):
                continue  # no values on one side (a `meta` model): the plan cannot depend on them
            if h[field] != spec[field]:
                what = "weights differ" if field == "sha256" else f"{field} {h[field]} != plan's {spec[field]}"
                raise PlanMismatchError(f"this plan was made for another model: parameter {name!r}: {what}")
    missing = [n for n in want if n not in have]
    if missing:
        raise PlanMismatchError(f"this plan was made for another model: parameter {missing[0]!r} is missing "
                                f"(the model has {len(have)} parameters)")


def _checksum(doc: dict) -> str:
    body = {k: v for k, v in doc.items() if k != "checksum"}
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def save_plan(plan, directory: str) -> None:
    os.makedirs(directory, exist_ok=True)
    tensors, layers = {}, {}
    for key, lp in plan.layers.items():
        names = []
        for field in TENSOR_FIELDS:
            t = getattr(lp, field)
            if t is not None:
                tensors[f"{key}/{field}"] = t.detach().contiguous().cpu()
                names.append(field)
        layers[key] = {"F": lp.F, "k": lp.k, "router": lp.router, "static_route": lp.static_route,
                       "small": lp.small, "tensors": names}
    blob = save(tensors) if tensors else save({"_empty": torch.zeros(0)})
    with open(os.path.join(directory, "tensors.safetensors"), "wb") as f:
        f.write(blob)
    doc = {"format": FORMAT, "version": VERSION, "policy": plan.policy, "fingerprint": plan.fingerprint,
           "pruned": plan.pruned, "block_influence": plan.block_influence, "block_paths": plan.block_paths,
           "lam": plan.lam, "calibration": plan.calibration, "layers": layers,
           "budget": None if plan.budget is None else plan.budget.to_dict(),
           "tensors_sha256": hashlib.sha256(blob).hexdigest()}
    doc["checksum"] = _checksum(doc)
    with open(os.path.join(directory, "plan.json"), "w") as f:
        json.dump(doc, f, indent=1, sort_keys=True)


def load_plan(directory: str):
    from routefx.compiler.plan import BudgetRecord, LayerPlan, Plan
    jpath, tpath = os.path.join(directory, "plan.json"), os.path.join(directory, "tensors.safetensors")
    for p in (jpath, tpath):
        if not os.path.exists(p):
            raise PlanFormatError(f"not a routefx plan: {p} is missing (a plan directory holds plan.json and "
                                  "tensors.safetensors)")
    try:
        with open(jpath) as f:
            doc = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise PlanFormatError(f"{jpath} is not valid JSON ({e}); the file is truncated or edited") from None
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        raise PlanFormatError(f"{jpath} is not a routefx plan (format {doc.get('format')!r} if a dict)")
    if doc.get("version") != VERSION:
        raise PlanFormatError(f"plan version {doc.get('version')!r} is not supported (this routefx reads {VERSION})")
    if doc.get("checksum") != _checksum(doc):
        raise PlanFormatError(f"{jpath} was edited after it was written (checksum mismatch); recompile to make a "
                              "new plan")
    with open(tpath, "rb") as f:
        blob = f.read()
    if hashlib.sha256(blob).hexdigest() != doc["tensors_sha256"]:
        raise PlanFormatError(f"{tpath} does not match plan.json (truncated or edited: sha256 mismatch)")
    try:
        tensors = load(blob)
    except Exception as e:  # safetensors raises its own error types
        raise PlanFormatError(f"{tpath} cannot be read: {e}") from None
    layers = {}
    for key, spec in doc["layers"].items():
        fields = {f: tensors[f"{key}/{f}"] for f in spec["tensors"]}
        layers[key] = LayerPlan(F=spec["F"], k=spec["k"], router=spec["router"], static_route=spec["static_route"],
                                small=spec["small"], **fields)
    budget = doc.get("budget")
    return Plan(policy=doc["policy"], pruned=doc["pruned"], block_influence=doc["block_influence"],
                block_paths=doc["block_paths"], layers=layers, lam=doc["lam"], calibration=doc["calibration"],
                budget=None if budget is None else BudgetRecord.from_dict(budget), fingerprint=doc["fingerprint"])
