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
