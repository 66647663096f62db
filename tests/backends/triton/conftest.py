"""Triton kernel tests: interpreter tests (CPU, fp32) and CUDA tests (`@pytest.mark.cuda`, skipped without a GPU).

TRITON_INTERPRET must be set before triton is first imported; tests/conftest.py sets it when there is no GPU
(this file repeats the default for runs that load it first). Under the interpreter every `@triton.jit` kernel
of the process is interpreted, so CUDA tests and interpreter tests never run in the same process.
"""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_configure(config):
    config.addinivalue_line("markers", "cuda: needs a CUDA GPU (skipped without one)")
    config.addinivalue_line("markers", "interpreter: runs Triton kernels on CPU under TRITON_INTERPRET=1")


@pytest.fixture
def interpreter():
    """Skip unless this process runs Triton under the interpreter (the default without a GPU)."""
    from routefx.backends.triton import ffn
    if not ffn.INTERPRET:
        pytest.skip("Triton is not in interpreter mode in this process (TRITON_INTERPRET unset at import)")
    return ffn
