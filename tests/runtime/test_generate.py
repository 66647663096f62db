"""`routefx.export(cm, path, generate=True)` + `routefx.load(path).generate(...)`: generation from an artifact with
numpy and onnxruntime alone. Greedy output is token-identical to the compiled model's `generate` (and, Dense, to
Hugging Face `generate`) on left-padded batches, per-row end tokens included; sampling follows its settings;
what the artifact cannot apply is refused by name."""
from __future__ import annotations

import os

import numpy as np
import pytest
import torch

import routefx
from routefx.errors import ArtifactError, BackendError, InputError
from routefx.policies import Dense, Duo, PruneLayers
from tests.runtime.artifacts import batches
from tests.zoo import ZOO

CASES = {
    "llama-dense": ("llama", Dense()),
    "llama-duo-nested": ("llama", Duo(budget=0.5, router="local", small="nested")),
    "gpt2-prune": ("gpt2", PruneLayers(layers=[1])),
    "qwen2-duo-separate": ("qwen2", Duo(budget=0.5, router="random", small="separate")),
}
_ARTIFACTS: dict = {}


def _prompt(entry, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, entry.vocab, (3, 9), generator=g)
    mask = torch.ones_like(ids)
    mask[0, :4], mask[2, :1] = 0, 0
    return ids.masked_fill(mask == 0, 0), mask


def _exported(case: str, tmp_path_factory):
    if case not in _ARTIFACTS:
        family, policy = CASES[case]
        entry = ZOO[family]
        model = entry.build()
        cm = routefx.compile(model, policy, backend="onnx", calibration=batches(entry)
                             if not isinstance(policy, (Dense, PruneLayers)) else None)
        ids, mask = _prompt(entry)
        cm(ids, attention_mask=mask)
        path = routefx.export(cm, str(tmp_path_factory.mktemp(case) / "artifact"), generate=True)
        _ARTIFACTS[case] = (model, cm, path, entry)
    return _ARTIFACTS[case]


@pytest.mark.parametrize("case", list(CASES))
def test_greedy_equals_the_compiled_model(case, tmp_path_factory):
    model, cm, path, entry = _exported(case, tmp_path_factory)
    sess = routefx.load(path)
    for seed in range(2):
        ids, mask = _prompt(entry, seed)
        want = cm.generate(ids, attention_mask=mask, max_new_tokens=7)
        got = sess.generate(ids, attention_mask=mask, max_new_tokens=7)
        assert isinstance(got, torch.Tensor) and torch.equal(got, want)
        as_numpy = sess.generate(ids.numpy(), mask.numpy(), max_new_tokens=7)
        assert isinstance(as_numpy, np.ndarray) and np.array_equal(as_numpy, want.numpy())
        if case == "llama-dense":
            with torch.no_grad():
                hf = model.generate(ids, attention_mask=mask, max_new_tokens=7, do_sample=False)
            assert torch.equal(got, hf)


def test_weights_are_stored_once_and_files_checked(tmp_path_factory):
    """The prefill and decode graphs read the forward model's weight file; a modified graph is refused at load."""
    _, _, path, _ = _exported("llama-duo-nested", tmp_path_factory)
    files = os.listdir(path)
    assert {"prefill.onnx", "decode.onnx"} <= set(files)
    data = sum(os.path.getsize(os.path.join(path, f)) for f in files if f.endswith(".data"))
    assert data <= 1.05 * os.path.getsize(os.path.join(path, "model.onnx.data"))
    gen = routefx.load(path).manifest["generation"]
    assert gen["past"] == [f"past_{kv}_{i}" for i in range(3) for kv in ("key", "value")]
    assert gen["prefill"]["routed"] and gen["decode"]["routed"]


def test_a_modified_decode_graph_is_refused(tmp_path_factory, tmp_path):
    import shutil
    _, _, path, _ = _exported("llama-dense", tmp_path_factory)
    copy = str(tmp_path / "copy")
    shutil.copytree(path, copy)
    with open(os.path.join(copy, "decode.onnx"), "ab") as f:
        f.write(b"\0")
    with pytest.raises(ArtifactError, match=r"decode.onnx .* does not match its checksum"):
        routefx.load(copy)


def test_end_tokens_stop_each_row(tmp_path_factory):
    _, cm, path, entry = _exported("llama-dense", tmp_path_factory)
    sess = routefx.load(path)
    ids, mask = _prompt(entry, 3)
    free = sess.generate(ids, attention_mask=mask, max_new_tokens=6, eos_token_id=[])
    eos = int(free[1, ids.shape[1] + 1])                     # row 1's second new token ends it
    got = sess.generate(ids, attention_mask=mask, max_new_tokens=6, eos_token_id=eos, pad_token_id=1)
    want = cm.generate(ids, attention_mask=mask, max_new_tokens=6, eos_token_id=eos, pad_token_id=1)
    assert torch.equal(got, want)
    assert (got[1, ids.shape[1] + 2:] == 1).all()


def test_sampling_follows_its_settings(tmp_path_factory):
    _, _, path, entry = _exported("llama-dense", tmp_path_factory)
    sess = routefx.load(path)
    ids, mask = _prompt(entry, 4)
    greedy = sess.generate(ids, attention_mask=mask, max_new_tokens=5)
    assert torch.equal(sess.generate(ids, attention_mask=mask, max_new_tokens=5, do_sample=True, top_k=1), greedy)
    a = sess.generate(ids, attention_mask=mask, max_new_tokens=8, do_sample=True, temperature=1.5, seed=7)
    b = sess.generate(ids, attention_mask=mask, max_new_tokens=8, do_sample=True, temperature=1.5, seed=7)
    c = sess.generate(ids, attention_mask=mask, max_new_tokens=8, do_sample=True, temperature=1.5, seed=8)
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert int(a.min()) >= 0 and int(a.max()) < entry.vocab
    for bad, message in (({"temperature": 0.0}, "temperature must be"), ({"top_p": 1.5}, "top_p must be"),
                         ({"max_new_tokens": -1}, "max_new_tokens must be")):
        with pytest.raises(InputError, match=message):
            sess.generate(ids, attention_mask=mask, do_sample=True, **bad)
    with pytest.raises(InputError, match="left padding only"):
        sess.generate(ids, attention_mask=mask.flip(1), max_new_tokens=2)


def test_warpers_keep_the_tokens_transformers_keeps():
    """Temperature, top-k and top-p against transformers' own warpers on random logits: the same tokens kept, the
    same scores for them; draws land on kept tokens only."""
    from transformers.generation.logits_process import (LogitsProcessorList, TemperatureLogitsWarper,
                                                        TopKLogitsWarper, TopPLogitsWarper)

    from routefx.runtime.generate import _Sampler
    logits = torch.randn(4, 50, generator=torch.Generator().manual_seed(0)) * 3
    for t, k, p in ((1.0, None, 0.3), (0.7, None, 0.8), (1.0, 5, 1.0), (1.3, 12, 0.95), (0.5, 3, 0.5)):
        warpers = [TemperatureLogitsWarper(t)] if t != 1.0 else []
        warpers += ([TopKLogitsWarper(k)] if k else []) + ([TopPLogitsWarper(p)] if p < 1.0 else [])
        want = LogitsProcessorList(warpers)(None, logits.clone())
        sampler = _Sampler(True, t, k, p, seed=0)
        got = torch.from_numpy(sampler.warp(logits.numpy()))
        assert torch.equal(torch.isfinite(got), torch.isfinite(want)), (t, k, p)
        assert torch.allclose(got[torch.isfinite(got)], want[torch.isfinite(want)])
        draws = np.stack([sampler(logits.numpy()) for _ in range(50)], axis=1)      # [4, 50]
        assert torch.isfinite(want.gather(1, torch.from_numpy(draws))).all()


def test_refusals(tmp_path):
    entry = ZOO["llama"]
    model = entry.build()
    ids, mask = _prompt(entry)
    cm = routefx.compile(model, Dense(), backend="onnx")
    cm(ids, attention_mask=mask)
    plain = routefx.export(cm, str(tmp_path / "plain"))
    with pytest.raises(ArtifactError, match=r"exported without generation graphs: .*generate=True"):
        routefx.load(plain).generate(ids, attention_mask=mask)
    model.generation_config.repetition_penalty = 1.3
    penalised = routefx.export(routefx.compile(model, Dense(), backend="onnx", example_inputs=(ids,),
                                               example_kwargs={"attention_mask": mask}),
                               str(tmp_path / "penalised"), generate=True)
    with pytest.raises(InputError, match=r"applies \['RepetitionPenaltyLogitsProcessor'\]"):
        routefx.load(penalised).generate(ids, attention_mask=mask)
    eager = routefx.compile(model, Dense(), backend="eager")
    eager(ids, attention_mask=mask)
    with pytest.raises(BackendError, match=r"generate=True\) writes ONNX"):
        routefx.export(eager, str(tmp_path / "eager"), generate=True)
