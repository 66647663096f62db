"""Decode-loop values between torch and ONNX Runtime's numpy path (`OnnxRunner.run_arrays`), without copies."""
from __future__ import annotations

import numpy as np
import torch

__all__ = ["as_array", "as_torch"]


def as_array(t) -> np.ndarray:
    """A decode input as a numpy array (a torch tensor's own memory when it is contiguous)."""
    return t if isinstance(t, np.ndarray) else t.detach().contiguous().numpy()


def as_torch(t) -> torch.Tensor:
    """A cache entry or logits as torch (a view of a numpy array's or an OrtValue's memory)."""
    if isinstance(t, torch.Tensor):
        return t
    return torch.from_numpy(t if isinstance(t, np.ndarray) else t.numpy())
