"""AOTInductor artifacts (`routefx.export` of backend="inductor" / "triton" models): model.pt2 loads with
`torch._inductor.aoti_load_package` in a fresh process where routefx cannot be imported, and runs at batch sizes
and lengths unlike the example, equal to the compiled model. One CPU export (inductor, Duo with data-dependent
routes, so routed_ffn's decomposition is in the package; AOTInductor's C++ build takes minutes on 2 cores) and a
CUDA one (triton: the Triton kernels in the package)."""
from __future__ import annotations

import functools
import json
import os
import subprocess
import sys
import tempfile
import textwrap

import pytest
import torch

import routefx
from routefx.errors import ArtifactError
from routefx.policies import Duo
from tests.compare import assert_close_nonpad
from tests.runtime.artifacts import batches
from tests.tolerances import INDUCTOR_VS_EAGER, TRITON_BF16_VS_EAGER
from tests.zoo import ZOO, example_inputs

# argv: package path, inputs file (torch.save of a list of input lists), outputs file
_LOAD_WITHOUT_ROUTEFX = textwrap.dedent("""
    import importlib.abc, sys
    class Block(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in ("routefx", "tests"):
                raise ImportError(f"blocked: {name}")
    sys.meta_path.insert(0, Block())
    import torch
    pkg = torch._inductor.aoti_load_package(sys.argv[1])
    calls = torch.load(sys.argv[2])
    with torch.no_grad():
        torch.save([pkg(*ins)[0] for ins in calls], sys.argv[3])
    assert not [m for m in sys.modules if m.startswith("routefx")]
    print("ok")
""")


@functools.lru_cache(maxsize=None)
def _exported(family: str, backend: str, device: str, dtype: torch.dtype):
    entry = ZOO[family]
    model = entry.build().to(device, dtype)
    cal = [{k: v.to(device) for k, v in b.items()} for b in batches(entry)]
    args, kwargs = example_inputs(entry)
    cm = routefx.compile(model, Duo(budget=0.5, router="random", small="nested"), calibration=cal, backend=backend,
                         example_inputs=tuple(a.to(device) for a in args),
                         example_kwargs={k: v.to(device) for k, v in kwargs.items()})
    path = routefx.export(cm, tempfile.mkdtemp(prefix="routefx_aoti_") + "/a")
    return cm, path, entry


def _calls(entry, device: str):
    out = []
    for i, (b, s, pad) in enumerate([(3, 11, 2), (1, 5, 0), (4, 3, 1)]):
        args, kwargs = example_inputs(entry, batch=b, seq=s, left_pad=pad, seed=200 + i)
        out.append({k: v.to(device) for k, v in {"input_ids": args[0], **kwargs}.items()})
    return out


def _check_package(cm, path, entry, device: str, tol: float) -> None:
    with open(os.path.join(path, "manifest.json")) as f:
        m = json.load(f)
    assert m["kind"] == "aoti" and "model.pt2" in m["files"] and m["aoti"]["device"] == device
    names = [t["name"] for t in m["inputs"]["tensors"]]
    feeds = _calls(entry, device)
    torch.save([[f[n] for n in names] for f in feeds], f"{path}.in.pt")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = subprocess.run([sys.executable, "-c", _LOAD_WITHOUT_ROUTEFX, os.path.join(path, "model.pt2"),
                           f"{path}.in.pt", f"{path}.out.pt"], capture_output=True, text=True, cwd="/", env=env,
                          timeout=600)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr[-3000:]
    outs = torch.load(f"{path}.out.pt")
    for feed, got in zip(feeds, outs):
        ref = cm(**feed)
        ref = ref.logits if hasattr(ref, "logits") else ref
        assert got.shape == ref.shape
        assert_close_nonpad(got.float(), ref.float(), feed.get("attention_mask"), tol)


def test_inductor_model_exports_a_package_that_runs_without_routefx(tmp_path):
    cm, path, entry = _exported("plain_parallel", "inductor", "cpu", torch.float32)
    with open(os.path.join(path, "manifest.json")) as f:
        assert json.load(f)["aoti"]["decomposed_routed_ffns"] == len(cm.ir.blocks)   # every FFN routed by data
    _check_package(cm, path, entry, "cpu", INDUCTOR_VS_EAGER)
    with pytest.raises(ArtifactError, match=r"holds an AOTInductor package \(model\.pt2\).*aoti_load_package"):
        routefx.load(path)
    import shutil
    copy = tmp_path / "a"
    shutil.copytree(path, copy)
    data = (copy / "model.pt2").read_bytes()
    (copy / "model.pt2").write_bytes(data[:-1])
    with pytest.raises(ArtifactError, match=r"model\.pt2"):
        routefx.load(str(copy))


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA absent: the triton AOTInductor package needs a GPU")
def test_triton_model_exports_a_package_that_runs_without_routefx():
    cm, path, entry = _exported("llama", "triton", "cuda", torch.bfloat16)
    _check_package(cm, path, entry, "cuda", TRITON_BF16_VS_EAGER)
