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


@functools.lru_cache(maxsize=None)
def _interpreter_defect() -> str | None:
    """Why Triton's CPU interpreter cannot run our kernels here, or None. Probed once with a minimal kernel that
    loops to a run-time bound (as every routed-FFN kernel does): triton 3.6's interpreter converts the bound
    with `int()` of a 1-element array, which numpy >= 2.5 refuses."""
    import triton
    import triton.language as tl

    @triton.jit
    def _loop_probe(x_ptr, n):
        acc = tl.load(x_ptr) * 0.0
        for i in range(0, n):
            acc += tl.load(x_ptr + i)
        tl.store(x_ptr, acc)

    x = torch.ones(3)
    try:
        _loop_probe[(1,)](x, 3)
    except Exception as e:  # noqa: BLE001 - any failure of the interpreter itself is the answer
        import numpy
        return (f"Triton's interpreter (triton {triton.__version__}, numpy {numpy.__version__}) cannot run a "
                f"kernel with a run-time loop bound: {type(e).__name__}: {str(e).splitlines()[0][:160]}")
    return None if float(x[0]) == 3.0 else f"Triton's interpreter computed a loop sum of {float(x[0])}, not 3.0"


def pytest_collection_modifyitems(config, items):
    """Under TRITON_INTERPRET=1, Triton kernel tests that are not CUDA tests are skipped, with the reason, where the
    interpreter itself cannot run kernels (the GPU machine's triton 3.6 + numpy 2.5; its CUDA tests cover them)."""
    if os.environ.get("TRITON_INTERPRET") != "1":
        return
    triton_items = [it for it in items if "triton" in it.nodeid and it.get_closest_marker("cuda") is None]
    if not triton_items:
        return
    reason = _interpreter_defect()
    if reason is not None:
        for it in triton_items:
            it.add_marker(pytest.mark.skip(reason=reason))
