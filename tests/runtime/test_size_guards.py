"""An artifact's graphs run only on input sizes they hold for (torch.export's guards, in the manifest).

Doge with a window of 6 keys (tests/generate/test_length_guards.py) attends to all keys up to 6 and to the top 6
past that: a graph exported from either side computes that side only. Without the manifest's guards the runtime
ran a short-side graph on long inputs (other logits than the model, no error).
"""
import numpy as np
import pytest
import torch

import routefx
from routefx.errors import InputError
from routefx.policies import Dense
from routefx.runtime.size_guards import SizeGuards, check_supported
from tests.generate.test_length_guards import WINDOW, _doge


def _ids(seq, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randperm(93, generator=g)[:seq] + 3)[None]


def test_forward_artifact_refuses_lengths_across_the_models_branch(tmp_path):
    model = _doge()
    example = _ids(4)   # the short side: every key attended
    cm = routefx.compile(model, Dense(), example_inputs=(example,),
                         example_kwargs={"attention_mask": torch.ones_like(example)}, backend="onnx")
    sess = routefx.load(routefx.export(cm, str(tmp_path / "a")))
    assert any(f"> {WINDOW}" in g or f"<= {WINDOW}" in g for g in sess.manifest["guards"])
    for seq in (2, WINDOW):
        ids = _ids(seq, seed=seq)
        with torch.no_grad():
            ref = model(ids, attention_mask=torch.ones_like(ids)).logits
        got = sess(ids, attention_mask=torch.ones_like(ids)).logits
        assert (got - ref).abs().max() < 1e-4
    with pytest.raises(InputError, match="holds for input sizes where"):
        sess(_ids(WINDOW + 5), attention_mask=torch.ones(1, WINDOW + 5, dtype=torch.long))


def test_generation_artifact_refuses_steps_outside_its_graphs(tmp_path):
    # window 6: the prefill graph is captured on 3 tokens (short side), the decode graph on 5 + 3 (long side); an
    # artifact whose steps stay within its guards generates as the compiled model (test_indexed_cache.py)
    cm = routefx.compile(_doge(), Dense(), backend="onnx")
    cm(_ids(5))
    sess = routefx.load(routefx.export(cm, str(tmp_path / "narrow"), generate=True))
    assert sess.manifest["generation"]["decode"]["guards"]
    with pytest.raises(InputError, match="prefill graph holds for input sizes where"):
        sess.generate(_ids(WINDOW + 3), max_new_tokens=2)
    with pytest.raises(InputError, match="decode graph holds for input sizes where"):
        sess.generate(_ids(3), max_new_tokens=2)


def test_the_guard_language():
    guards = ["L['x'].size()[1] <= 6", "min(2*L['x'].size()[1], 3*L['y'].size()[0]) == 2*L['x'].size()[1]",
              "L['flag'] == False", "L['x'].size()[1] % 4 != 1 and not L['y'].size()[0] > 9"]
    assert check_supported(guards, ["x", "y"], {"flag": False}) is None
    g = SizeGuards(guards)
    env = {"x": np.zeros((1, 4)), "y": np.zeros(3), "flag": False}
    assert g.failed(env) is None
    assert g.failed({**env, "x": np.zeros((1, 7))}) == guards[0]
    assert g.failed({**env, "y": np.zeros(2)}) == guards[1]
    assert g.failed({**env, "flag": True}) == guards[2]
    assert g.failed({**env, "x": np.zeros((1, 5)), "y": np.zeros(5)}) == guards[3]
    # anything else is refused at export, never skipped by the runtime
    assert "cannot evaluate" in check_supported(["__import__('os').getpid() > 0"], ["x"], {})
    assert "cannot evaluate" in check_supported(["L['x'].shape[0] > 0"], ["x"], {})
    assert "KeyError" in check_supported(["L['z'].size()[0] > 0"], ["x"], {})


class _Branchy(torch.nn.Module):
    """A tiny LM whose code branches on the length, as Doge's key window does: past `WINDOW` tokens the logits
    change sign (a graph captured on the short side computes the short side only)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.embed = torch.nn.Embedding(97, 16)
        self.head = torch.nn.Linear(16, 97)

    def forward(self, input_ids, attention_mask):
        h = self.embed(input_ids) * attention_mask[..., None]
        if input_ids.shape[1] > WINDOW:
            h = -h
        return self.head(h)


def test_aoti_package_refuses_lengths_across_the_models_branch(tmp_path):
    """backend="inductor": model.pt2 computes the manifest's guards from its inputs' sizes (AOTInductor keeps no
    guard of the graph it compiles: without them it ran the short side's graph on long inputs)."""
    import json
    model = _Branchy().eval()
    example = _ids(4)
    cm = routefx.compile(model, Dense(), example_inputs=(example,),
                         example_kwargs={"attention_mask": torch.ones_like(example)}, backend="inductor")
    path = routefx.export(cm, str(tmp_path / "a"))
    with open(f"{path}/manifest.json") as f:
        manifest = json.load(f)
    assert manifest["kind"] == "aoti" and any(f"<= {WINDOW}" in g for g in manifest["guards"])
    names = [t["name"] for t in manifest["inputs"]["tensors"]]
    pkg = torch._inductor.aoti_load_package(f"{path}/model.pt2")

    def run(ids):
        feed = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
        with torch.no_grad():
            return pkg(*[feed[n] for n in names])[0]
    for seq in (2, WINDOW):
        ids = _ids(seq, seed=seq)
        with torch.no_grad():
            ref = model(ids, torch.ones_like(ids))
        assert (run(ids) - ref).abs().max() < 1e-4
    with pytest.raises(RuntimeError, match=rf"holds for input sizes where .*<= {WINDOW}"):
        run(_ids(WINDOW + 5))


def test_package_guards_compute_as_the_runtimes():
    """The package's guards (int64 tensor ops on the sizes) decide as the runtime's Python ones on a grid of sizes,
    floor division and remainder included; a zero divisor fails the guard (Python raises there)."""
    import ast
    from routefx.compiler.export_aoti import _SizeTensors
    from routefx.runtime.size_guards import _eval
    guards = ["L['x'].size()[1] <= 6", "min(2*L['x'].size()[1], 3*L['y'].size()[0]) == 2*L['x'].size()[1]",
              "L['flag'] == False and L['x'].size()[0] >= 1", "not L['x'].size()[1] % 4 != 1 or L['y'].size()[0] > 9",
              "(L['x'].size()[1] + (64 - L['x'].size()[1] % 64) % 64) // 64 == 1",
              "-7 // L['y'].size()[0] == -(7 // L['y'].size()[0]) - 1", "abs(3 - L['x'].size()[1]) < 2",
              "max(1, L['y'].size()[0] // 3) > 1 < 2 <= L['x'].size()[1]", "5 % (L['x'].size()[1] - 3) == 1"]
    for g in guards:
        tree = ast.parse(g, mode="eval")
        for rows, seq, n in [(1, 1, 1), (2, 3, 2), (1, 4, 3), (3, 6, 9), (1, 7, 10), (2, 65, 4), (1, 5, 7)]:
            env = {"x": torch.zeros(rows, seq), "y": torch.zeros(n), "flag": False}
            try:
                want = bool(_eval(tree, env))
            except ZeroDivisionError:
                want = False
            assert bool(_SizeTensors.holds(tree, env)) == want, (g, rows, seq, n)
