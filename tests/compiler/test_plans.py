"""Plans: every calibrated decision saved (safetensors + JSON) and reloaded into the same compiled model."""
import json
import os
import subprocess
import sys
import copy
import textwrap

import pytest
import torch
from torch import nn

import routefx
from routefx.policies import Duo, PruneLayers
from tests.reference_ffn import ffn_inputs, neuron_subset
from tests.tiny_lm import batches as text_batches
from tests.tiny_lm import trained_llama
from tests.zoo import ZOO, PlainLM, example_inputs

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

_FRESH = textwrap.dedent("""
    import sys, torch
    torch.set_num_threads(1)          # as in the test process: same summation order, so bitwise comparable
    sys.path.insert(0, {root!r})
    import routefx
    from tests.zoo import ZOO
    batch = torch.load({batch!r})
    model = ZOO[{name!r}].build()     # built here, as in a new session: one model for every plan
    for plan, out in {jobs!r}:
        cm = routefx.compile(model, routefx.Plan.load(plan))
        torch.save(cm(**batch).logits, out)
""")


def _cal(entry, n=3, seed=10):
    out = []
    for i in range(n):
        args, kwargs = example_inputs(entry, batch=4, seq=14, left_pad=3, seed=seed + i)
        out.append({"input_ids": args[0], **kwargs})
    return out


_POLICIES = [
    PruneLayers(keep=0.67),
    Duo(budget=0.5, router="static", small="nested"),
    Duo(budget=0.5, router="random", small="nested"),
    Duo(budget=0.5, router="local", small="nested"),
    Duo(budget=0.4, router="local", small="separate"),
]


def test_plan_round_trip_is_bit_identical_in_a_fresh_process(tmp_path):
    """Every policy's plan, saved and reloaded in one fresh process (one start-up for all five), compiles to
    logits bit-identical to the calibrating process's."""
    name = "llama"
    entry = ZOO[name]
    batch = _cal(entry, 1, seed=77)[0]
    torch.save(batch, tmp_path / "batch.pt")
    jobs, expected = [], []
    model = entry.build()
    for i, policy in enumerate(_POLICIES):
        cm = routefx.compile(model, policy, calibration=_cal(entry))
        cm.plan.save(str(tmp_path / f"plan{i}"))
        expected.append(cm(**batch).logits)
        jobs.append((str(tmp_path / f"plan{i}"), str(tmp_path / f"out{i}.pt")))
        doc = json.loads((tmp_path / f"plan{i}" / "plan.json").read_text())
        assert doc["policy"] == policy.to_dict() and doc["format"] == "routefx-plan"
    script = _FRESH.format(root=ROOT, name=name, batch=str(tmp_path / "batch.pt"), jobs=jobs)
    subprocess.run([sys.executable, "-c", script], check=True, capture_output=True, timeout=600)
    for policy, (_, out), want in zip(_POLICIES, jobs, expected):
        assert torch.equal(torch.load(out), want), policy.to_json()


def test_plan_for_another_model_is_refused(tmp_path):
    entry = ZOO["plain"]
    cm = routefx.compile(entry.build(), Duo(budget=0.5, router="random", small="nested"), calibration=_cal(entry))
    cm.plan.save(str(tmp_path))
    other = entry.build()
    with torch.no_grad():
        other.z[1].b.a.weight.add_(1e-3)                   # same names and shapes, other weights
    with pytest.raises(routefx.PlanMismatchError, match=r"parameter 'z.1.b.a.weight': weights differ"):
        routefx.compile(other, routefx.Plan.load(str(tmp_path)))
    with pytest.raises(routefx.PlanMismatchError, match=r"parameter 'z.0.b.a.weight': shape \[100, 36\] != "
                                                        r"plan's \[152, 36\]"):
        torch.manual_seed(0)                                # same stream as the zoo: only the FFN width differs
        routefx.compile(PlainLM(widths=(50, 76, 76)).eval(), routefx.Plan.load(str(tmp_path)))


def test_truncated_or_edited_plan_is_refused(tmp_path):
    entry = ZOO["plain"]
    cm = routefx.compile(entry.build(), Duo(budget=0.5, router="local", small="nested"), calibration=_cal(entry))
    d = tmp_path / "p"
    cm.plan.save(str(d))
    js, ts = d / "plan.json", d / "tensors.safetensors"
    doc = json.loads(js.read_text())

    doc2 = dict(doc, lam=doc["lam"] + 1.0)                 # an edit keeps valid JSON
    js.write_text(json.dumps(doc2))
    with pytest.raises(routefx.PlanFormatError, match="was edited after it was written"):
        routefx.Plan.load(str(d))
    js.write_text(json.dumps(doc)[:-40])                    # truncated JSON
    with pytest.raises(routefx.PlanFormatError, match="is not valid JSON"):
        routefx.Plan.load(str(d))
    js.write_text(json.dumps(doc))
    blob = ts.read_bytes()
    ts.write_bytes(blob[: len(blob) // 2])                  # truncated tensors
    with pytest.raises(routefx.PlanFormatError, match="does not match plan.json"):
        routefx.Plan.load(str(d))
    ts.unlink()
    with pytest.raises(routefx.PlanFormatError, match="tensors.safetensors is missing"):
        routefx.Plan.load(str(d))


def test_separate_small_branch_beats_its_initialisation_on_held_out_data():
    """Trained tiny Llama (tests/tiny_lm.py): per layer, held-out relative error of the small branch against the
    big one; the fitted separate branch vs its initialisation (the nested top-k neurons)."""
    model = trained_llama()
    cal = text_batches(6, 8, 64, seed=100, pad=5)
    held = text_batches(3, 8, 64, seed=400, split="held", pad=5)
    cm = routefx.compile(model, Duo(budget=0.5, router="static", small="separate"), calibration=cal)
    assert "separate small branches add" in cm.report.pass_report("append_small_branch").notes[0]
    xs = ffn_inputs(model, list(cm.plan.layers), [b | {"use_cache": False} for b in held])
    better = 0
    for key, lp in cm.plan.layers.items():
        mlp, x = model.get_submodule(key), xs[key]
        small = copy.deepcopy(mlp)                           # the model's own module with the fitted weights
        for name, w in (("gate_proj", lp.small_gate), ("up_proj", lp.small_up), ("down_proj", lp.small_down)):
            getattr(small, name).weight = nn.Parameter(w)
        with torch.no_grad():
            y, fitted = mlp(x), small(x)
            with neuron_subset(mlp, "down_proj", lp.perm[: lp.k]):
                nested = mlp(x)
        err = lambda z: float((z - y).norm() / y.norm())  # noqa: E731
        better += err(fitted) < err(nested)
    assert better >= 3, better                               # at least most of the 4 layers
