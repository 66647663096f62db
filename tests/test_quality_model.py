"""The benchmark LM's data and cache (bench/quality_model.py), without training a model: the split is by file
and disjoint, held-out batches come from held-out files only, a cache with a modified file is refused."""
from __future__ import annotations

import dataclasses
import json
import os

import pytest
import torch

from bench import quality_model as qm
from routefx.errors import ArtifactError


def test_split_is_by_file_disjoint_and_stable():
    train, held = qm.stdlib_files("train"), qm.stdlib_files("heldout")
    assert train and held and not set(train) & set(held)
    assert 0.03 < len(held) / (len(train) + len(held)) < 0.2             # about one file in ten
    assert all(not p.startswith(("test/", "idlelib/", "site-packages/")) for p in train + held)
    assert train == sorted(train) and qm.stdlib_files("heldout") == held


@pytest.fixture(scope="module")
def tokenizer():
    s = dataclasses.replace(qm.QUICK, vocab=300, max_train_bytes=100_000)
    return qm._wrap_tokenizer(qm._train_tokenizer(s))


def test_heldout_batches_are_held_out_text_and_deterministic(tokenizer):
    a = qm.heldout_batches(tokenizer, n=2, seq_len=32, batch=3)
    assert [b["input_ids"].shape for b in a] == [torch.Size([3, 32])] * 2
    assert all(torch.equal(x["input_ids"], y["input_ids"]) for x, y in zip(a, qm.heldout_batches(tokenizer, 2, 32, 3)))
    root = qm._stdlib_root()
    first = open(os.path.join(root, qm.stdlib_files("heldout")[0]), encoding="utf-8", errors="replace").read()
    assert first.startswith(tokenizer.decode(a[0]["input_ids"][0].tolist()))  # windows in file order
    calib = qm.calibration_batches(tokenizer, n=1, seq_len=32, batch=2)
    assert calib[0]["input_ids"].shape == (2, 32) and int(calib[0]["input_ids"].max()) < 300


def test_perplexity_of_a_uniform_model_is_the_vocabulary_size(tokenizer):
    batches = qm.heldout_batches(tokenizer, n=1, seq_len=16, batch=2)
    uniform = lambda input_ids, attention_mask: torch.zeros(*input_ids.shape, 300)  # noqa: E731
    assert qm.perplexity(uniform, batches) == pytest.approx(300, rel=1e-6)   # fp32 log-softmax


def test_cache_with_a_modified_file_is_refused(tmp_path, monkeypatch):
    monkeypatch.setenv("ROUTEFX_CACHE", str(tmp_path))
    with pytest.raises(ArtifactError, match="no manifest.json"):
        qm.load_quality_model(train_if_missing=False, quick=True)
    path = qm.cache_dir(quick=True)
    os.makedirs(path)
    for name in ("model.safetensors", "tokenizer.json", "config.json"):
        with open(os.path.join(path, name), "w") as f:
            f.write(name)
    manifest = {"format": qm.FORMAT, "settings": dataclasses.asdict(qm.QUICK), "sha256": qm._checksums(path)}
    with open(os.path.join(path, "manifest.json"), "w") as f:
        json.dump(manifest, f)
    assert qm._verify(path, qm.QUICK)["sha256"] == manifest["sha256"]
    with open(os.path.join(path, "model.safetensors"), "a") as f:
        f.write("!")
    with pytest.raises(ArtifactError, match="sha256 of model.safetensors differs"):
        qm.load_quality_model(train_if_missing=False, quick=True)
    with pytest.raises(ArtifactError, match="settings"):
        qm._verify(path, qm.FULL)
