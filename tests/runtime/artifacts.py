"""Exported artifacts shared by the runtime tests: one per (family, policy), compiled with the ONNX backend once
per test process (each export costs seconds)."""
from __future__ import annotations

import functools
import tempfile

import routefx
from routefx.policies import Dense, Duo, PruneLayers
from tests.zoo import ZOO, example_inputs

# (name, zoo family, policy, calibrated): every policy on a family, Duo on all three, Hugging Face models with
# an attention mask and a plain module without one
CASES = {
    "llama-dense": ("llama", Dense(), False),
    "llama-duo-nested": ("llama", Duo(budget=0.5, router="local", small="nested"), True),
    "gpt2-prune": ("gpt2", PruneLayers(layers=[1]), False),
    "gpt2-duo-separate": ("gpt2", Duo(budget=0.5, router="random", small="separate"), True),
    "plain-duo-nested": ("plain_parallel", Duo(budget=0.6, router="random", small="nested"), True),
    # head size 16: causal attention on GroupQueryAttention behind the run-time mask check (onnx_attention)
    "gemma-duo-nested": ("gemma", Duo(budget=0.5, router="local", small="nested"), True),
}


def batches(entry, n=2, seed=10, batch=4, seq=16, pad=3):
    out = []
    for i in range(n):
        args, kwargs = example_inputs(entry, batch=batch, seq=seq, left_pad=pad, seed=seed + i)
        out.append({"input_ids": args[0], **kwargs})
    return out


def call_inputs(entry) -> list[dict]:
    """Batch sizes and lengths unlike the export example (2 x 7) and the calibration data (4 x 16), with padding
    and without."""
    out = []
    for i, (b, s, pad) in enumerate([(3, 11, 2), (1, 1, 0), (5, 4, 1), (2, 9, 0)]):
        args, kwargs = example_inputs(entry, batch=b, seq=s, left_pad=pad, seed=100 + i)
        out.append({"input_ids": args[0], **kwargs})
    return out


_ROOT = tempfile.TemporaryDirectory(prefix="routefx_test_artifacts_")


@functools.lru_cache(maxsize=None)
def exported(case: str):
    """(compiled model, artifact path, zoo entry) for `case`."""
    family, policy, calibrated = CASES[case]
    entry = ZOO[family]
    model = entry.build()
    args, kwargs = example_inputs(entry)
    cm = routefx.compile(model, policy, example_inputs=args, example_kwargs=kwargs, backend="onnx",
                         calibration=batches(entry) if calibrated else None)
    path = routefx.export(cm, f"{_ROOT.name}/{case}")
    return cm, path, entry
