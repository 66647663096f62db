"""Export -> load in a fresh process -> run equals the compiled model; artifact integrity (every file's checksum,
the format version); the runtime's input checks and output structure; one Session called from several threads."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
import threading

import numpy as np
import pytest
import torch

import routefx
from routefx.errors import ArtifactError, BackendError, InputError
from routefx.runtime.artifact import manifest_checksum
from tests.compare import assert_close_nonpad
from tests.runtime.artifacts import CASES, call_inputs, exported
from tests.tolerances import EXACT_REWRITE, ONNX_VS_EAGER

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# Run in a fresh interpreter in which `import torch` fails: routefx.runtime must load and run with numpy and
# onnxruntime alone, and must not import routefx's compiler or passes.
_NO_TORCH = textwrap.dedent("""
    import importlib.abc, json, sys
    class Block(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in ("torch", "transformers", "safetensors") :
                raise ImportError(f"blocked: {name}")
            return None
    sys.meta_path.insert(0, Block())
    import numpy as np
    import routefx.runtime
    job = json.loads(sys.argv[1])
    for case, path, inputs in job:
        sess = routefx.runtime.load(path)
        for i, feed in enumerate(inputs):
            out = sess(**{k: np.load(v) for k, v in feed.items()})
            np.save(f"{path}.out{i}.npy", out.logits if hasattr(out, "logits") else out)
    bad = sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "transformers")
                 or m.startswith(("routefx.compiler", "routefx.passes", "routefx.ir", "routefx.backends")))
    assert not bad, bad
    print("ok", sess.source)
""")


def _save_inputs(path: str, feeds: list[dict]) -> list[dict]:
    out = []
    for i, feed in enumerate(feeds):
        files = {}
        for k, v in feed.items():
            files[k] = f"{path}.in{i}.{k}.npy"
            np.save(files[k], v.numpy())
        out.append(files)
    return out


def _logits(out):
    return out.logits if hasattr(out, "logits") else out


def test_fresh_process_without_torch_equals_compiled_model():
    """Every case, at three batch sizes and lengths unlike the example, in one subprocess where torch is absent."""
    job, refs = [], {}
    for case in CASES:
        cm, path, entry = exported(case)
        feeds = call_inputs(entry)
        job.append((case, path, _save_inputs(path, feeds)))
        refs[case] = (path, feeds, [cm(**f) for f in feeds])
    env = {**os.environ, "PYTHONPATH": ROOT}
    proc = subprocess.run([sys.executable, "-c", _NO_TORCH, json.dumps(job)], capture_output=True, text=True,
                          env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.startswith("ok model.opt.onnx"), proc.stdout   # the optimized model loaded, no fallback
    for case, (path, feeds, outs) in refs.items():
        for i, (feed, ref) in enumerate(zip(feeds, outs)):
            got = torch.from_numpy(np.load(f"{path}.out{i}.npy"))
            assert_close_nonpad(got, _logits(ref), feed.get("attention_mask"), EXACT_REWRITE)


def test_plain_onnxruntime_runs_the_onnx_file_without_routefx():
    cm, path, entry = exported("gpt2-duo-separate")
    feed = call_inputs(entry)[0]
    files = _save_inputs(path, [feed])[0]
    script = textwrap.dedent("""
        import importlib.abc, json, sys
        class Block(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] in ("routefx", "torch"):
                    raise ImportError(f"blocked: {name}")
        sys.meta_path.insert(0, Block())
        import numpy as np, onnxruntime as ort
        path, files = sys.argv[1], json.loads(sys.argv[2])
        for name in ("model.onnx", "model.opt.onnx"):
            sess = ort.InferenceSession(f"{path}/{name}", providers=["CPUExecutionProvider"])
            out = sess.run(None, {k: np.load(v) for k, v in files.items()})
            np.save(f"{path}.{name}.npy", out[0])
    """)
    proc = subprocess.run([sys.executable, "-c", script, path, json.dumps(files)], capture_output=True, text=True,
                          cwd="/", env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"}, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ref = cm(**feed).logits
    for name in ("model.onnx", "model.opt.onnx"):
        got = torch.from_numpy(np.load(f"{path}.{name}.npy"))
        assert_close_nonpad(got, ref, feed["attention_mask"], EXACT_REWRITE)


def test_output_structure_follows_the_inputs():
    cm, path, entry = exported("llama-duo-nested")
    sess = routefx.load(path)
    # its threads stop spin-waiting when a run returns (routefx.backends.onnx's docstring)
    assert sess.session.get_session_options().get_session_config_entry("session.force_spinning_stop") == "1"
    feed = call_inputs(entry)[0]
    ref = cm(**feed)
    out = sess(feed["input_ids"], attention_mask=feed["attention_mask"])        # torch in: the model's own class
    assert type(out) is type(ref) and list(out.keys()) == list(ref.keys())
    assert torch.equal(out.logits, out[0])
    out = sess(**{k: v.numpy() for k, v in feed.items()})                        # numpy in: numpy out
    assert isinstance(out, routefx.runtime.Output) and list(out.keys()) == list(ref.keys())
    assert isinstance(out.logits, np.ndarray) and out[0] is out["logits"]
    plain_cm, plain_path, plain_entry = exported("plain-duo-nested")         # a bare tensor out
    ids = call_inputs(plain_entry)[0]["input_ids"]
    got = routefx.runtime.Session(plain_path)(ids)
    assert isinstance(got, torch.Tensor) and got.shape == plain_cm(ids).shape


def test_manifest_describes_the_model():
    cm, path, entry = exported("gpt2-duo-separate")
    with open(os.path.join(path, "manifest.json")) as f:
        m = json.load(f)
    assert m["format"] == "routefx-artifact" and m["version"] == 1
    assert m["policy"] == cm.policy.to_dict()
    tensors = {t["name"]: t for t in m["inputs"]["tensors"]}
    assert tensors["input_ids"] == {"name": "input_ids", "dtype": "int64", "shape": ["B", "S"], "vocab": entry.vocab,
                                   "absent": None}
    assert tensors["attention_mask"]["vocab"] is None and tensors["attention_mask"]["absent"] == "ones" and m["inputs"]["constants"] == {"use_cache": False}
    assert m["realised_budget"] == cm.plan.budget.to_dict()
    assert m["flops_per_token"]["after"] == pytest.approx(cm.report.flops_per_token["after"])
    listed = set(m["files"])
    on_disk = {os.path.relpath(os.path.join(d, n), path) for d, _, ns in os.walk(path) for n in ns} - {"manifest.json"}
    assert listed == on_disk and {"model.onnx.data", "plan/tensors.safetensors"} <= listed
    # the plan in the artifact rebuilds the same compiled model
    again = routefx.compile(entry.build(), routefx.Plan.load(os.path.join(path, "plan")))
    feed = call_inputs(entry)[0]
    assert_close_nonpad(again(**feed), cm(**feed), feed["attention_mask"], EXACT_REWRITE)


def _stored_tensors(path: str) -> dict:
    """(data file, offset, length) -> sha256 of the bytes, for every external initializer of both ONNX models."""
    import hashlib

    import onnx
    out = {}
    for name in ("model.onnx", "model.opt.onnx"):
        m = onnx.load(os.path.join(path, name), load_external_data=False)
        for t in m.graph.initializer:
            info = {e.key: e.value for e in t.external_data}
            if not info:
                continue
            with open(os.path.join(path, info["location"]), "rb") as f:
                f.seek(int(info.get("offset", 0)))
                raw = f.read(int(info["length"]))
            assert len(raw) == int(info["length"]), (name, t.name)
            out[(info["location"], int(info.get("offset", 0)), len(raw))] = hashlib.sha256(raw).hexdigest()
    return out


@pytest.mark.parametrize("case", ["llama-dense", "gpt2-duo-separate"])
def test_weights_are_stored_once(case):
    """Both ONNX models read their weights from one copy: no two stored byte ranges hold the same tensor, and a
    Dense artifact's data files hold no more than the model's parameters (plus a few folded constants)."""
    cm, path, _ = exported(case)
    stored = _stored_tensors(path)
    digests = list(stored.values())
    assert len(digests) == len(set(digests)), "a tensor is stored twice"
    data = sum(os.path.getsize(os.path.join(path, f)) for f in ("model.onnx.data", "model.opt.onnx.data")
               if os.path.exists(os.path.join(path, f)))
    params = sum(p.numel() * p.element_size() for p in cm._model.parameters())
    if case == "llama-dense":
        assert data <= 1.1 * params, (data, params)


@pytest.mark.parametrize("damage", ["flip", "truncate", "delete"])
def test_damaged_file_is_refused_naming_it(tmp_path, damage):
    _, path, _ = exported("llama-dense")
    with open(os.path.join(path, "manifest.json")) as f:
        names = ["manifest.json", *json.load(f)["files"]]
    for name in names:
        copy = tmp_path / name.replace("/", "_")
        shutil.copytree(path, copy)
        target = copy / name
        data = target.read_bytes()
        if damage == "flip":
            i = len(data) // 2
            target.write_bytes(data[:i] + bytes([data[i] ^ 0x01]) + data[i + 1:])
        elif damage == "truncate":
            target.write_bytes(data[:len(data) - 1])
        else:
            target.unlink()
        with pytest.raises(ArtifactError, match=name.replace(".", r"\.")):
            routefx.load(str(copy))


def test_newer_format_is_refused(tmp_path):
    _, path, _ = exported("llama-dense")
    copy = tmp_path / "a"
    shutil.copytree(path, copy)
    m = json.loads((copy / "manifest.json").read_text())
    m["version"] = 2
    m["checksum"] = manifest_checksum(m)
    (copy / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(ArtifactError, match=r"manifest\.json has artifact format version 2; this routefx reads "
                                            r"versions up to 1"):
        routefx.load(str(copy))


def test_export_refuses_other_backends_and_existing_directories(tmp_path):
    cm, path, entry = exported("gpt2-prune")
    with pytest.raises(ArtifactError, match="exists and is not empty"):
        routefx.export(cm, path)
    eager = routefx.compile(entry.build(), routefx.policies.Dense())
    with pytest.raises(BackendError, match="backend='eager'"):
        routefx.export(eager, str(tmp_path / "x"))


# the same refusals as the compiled model (tests/compiler/test_inputs.py), in numpy
@pytest.mark.parametrize("change,message", [
    (lambda f: {**f, "input_ids": f["input_ids"] * 0 + 101}, r"'input_ids' holds token id 101 at position \[0, 0\]; "
                                                            r"the model's embedding takes ids in \[0, 101\)"),
    (lambda f: {**f, "input_ids": f["input_ids"] - 200}, r"'input_ids' holds token id -\d+ .* ids in \[0, 101\)"),
    (lambda f: {**f, "attention_mask": f["attention_mask"][:, :-1]}, r"'attention_mask' has shape \[3, 10\]: its "
                                                                     r"sequence length 10 disagrees with 'input_ids'"),
    (lambda f: {k: v[:, :0] for k, v in f.items()}, r"'input_ids' has shape \[3, 0\]: an empty sequence"),
    (lambda f: {**f, "input_ids": f["input_ids"].float()}, r"'input_ids' has dtype float32 and rank 2; the model "
                                                           r"takes dtype int64 and rank 2"),
    (lambda f: {**f, "attention_mask": f["attention_mask"] * 0.5}, r"'attention_mask' has dtype float32 and rank 2; "
                                                                   r"the model takes dtype int64"),
    (lambda f: {**f, "input_ids": f["input_ids"][0]}, r"'input_ids' has dtype int64 and rank 1"),
    (lambda f: {**f, "use_cache": True}, r"'use_cache' is True; the model was exported with use_cache=False"),
    (lambda f: {**f, "labels": f["input_ids"]}, r"unexpected input\(s\) \['labels'\]"),
    (lambda f: {"attention_mask": f["attention_mask"]}, r"missing input 'input_ids'"),
])
def test_inputs_are_checked_like_the_compiled_model(change, message):
    cm, path, entry = exported("llama-dense")
    sess = routefx.load(path)
    feed = change(call_inputs(entry)[0])
    with pytest.raises(InputError, match=message):
        sess(**feed)
    with pytest.raises(InputError, match=message):
        sess(**{k: v.numpy() if isinstance(v, torch.Tensor) else v for k, v in feed.items()})


def test_integer_inputs_of_another_dtype_are_taken_like_the_compiled_model():
    """int32 ids, a bool and a 0/1 float mask give the int64 call's output, as in the compiled model."""
    cm, path, entry = exported("llama-dense")
    sess = routefx.load(path)
    feed = call_inputs(entry)[0]
    ref = sess(**feed).logits
    ids, mask = feed["input_ids"], feed["attention_mask"]
    for other in ({"input_ids": ids.int(), "attention_mask": mask.bool()},
                  {"input_ids": ids.numpy().astype(np.int32), "attention_mask": mask.numpy().astype(np.float32)}):
        got = sess(**other).logits
        assert_close_nonpad(torch.as_tensor(got), ref, mask, 0.0)


@pytest.mark.parametrize("case", ["llama-dense", "gpt2-prune", "llama-duo-nested"])
def test_a_hugging_face_mask_may_be_left_out(case):
    """As in the model (and the compiled model), no attention mask means every token attended: the session feeds
    ones of the ids' shape, equal to passing them, and to the model called without a mask."""
    cm, path, entry = exported(case)
    sess = routefx.load(path)
    assert [t["absent"] for t in sess.manifest["inputs"]["tensors"]] == [None, "ones"]
    for feed in call_inputs(entry)[:3]:
        ids = feed["input_ids"]
        got = sess(input_ids=ids).logits
        assert torch.equal(got, sess(input_ids=ids, attention_mask=torch.ones_like(ids)).logits)
        with torch.no_grad():
            assert_close_nonpad(got, cm(ids, attention_mask=torch.ones_like(ids)).logits, None, ONNX_VS_EAGER)
            if case == "llama-dense":
                assert_close_nonpad(got, cm._model(ids).logits, None, ONNX_VS_EAGER)
        assert torch.equal(torch.as_tensor(sess(input_ids=ids.numpy()).logits), got)


def test_one_session_from_eight_threads_equals_sequential_calls():
    cm, path, entry = exported("llama-duo-nested")
    sess = routefx.load(path, threads=1)
    rng = np.random.default_rng(0)
    feeds = []
    for _ in range(8 * 50):
        b, s = int(rng.integers(1, 4)), int(rng.integers(1, 13))
        feeds.append({"input_ids": rng.integers(0, entry.vocab, (b, s)), "attention_mask": np.ones((b, s), np.int64)})
    sequential = [sess(**f).logits for f in feeds]
    results = [None] * len(feeds)

    def work(t):
        for i in range(t, len(feeds), 8):
            results[i] = sess(**feeds[i]).logits

    threads = [threading.Thread(target=work, args=(t,)) for t in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert all(np.array_equal(r, s) for r, s in zip(results, sequential))
