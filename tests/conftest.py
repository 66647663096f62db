import functools
import os

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import pytest  # noqa: E402
import torch  # noqa: E402

# Triton reads TRITON_INTERPRET once, when triton is first imported (transformers and torch._dynamo import it),
# so the interpreter for the CPU Triton kernel tests (tests/backends/triton) must be chosen here, before that.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# Test models are tiny: one intra-op thread per test process. With pytest-xdist's processes on 2 cores, more
# threads oversubscribe the cores and OpenMP's spin-waits make small ops 10-50x slower.
torch.set_num_threads(1)

from tests.zoo import ZOO, example_inputs  # noqa: E402


@functools.lru_cache(maxsize=None)
def captured(name: str):
    """(model, graph) for a zoo entry, captured once per test process."""
    from routefx.ir import capture
    entry = ZOO[name]
    model = entry.build()
    args, kwargs = example_inputs(entry)
    return model, capture(model, args, kwargs)


@pytest.fixture
def zoo_capture():
    return captured
