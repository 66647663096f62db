"""FFN activations by name.

`ACTIVATIONS` maps the names used in the IR (and in the `activation: str` argument of `routefx::routed_ffn`)
to elementwise torch functions. Each function keeps shape and dtype and is written with plain torch ops, so it
traces under fx / torch.export and runs on any device.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from routefx.errors import UnsupportedActivationError

__all__ = ["ACTIVATIONS", "get_activation"]


def _silu(x: Tensor) -> Tensor:
    return F.silu(x)


def _gelu(x: Tensor) -> Tensor:
    return F.gelu(x)


def _gelu_tanh(x: Tensor) -> Tensor:
    return F.gelu(x, approximate="tanh")


def _relu(x: Tensor) -> Tensor:
    return F.relu(x)


def _relu2(x: Tensor) -> Tensor:
    return torch.square(F.relu(x))


def _sigmoid(x: Tensor) -> Tensor:
    return torch.sigmoid(x)


def _quick_gelu(x: Tensor) -> Tensor:
    return x * torch.sigmoid(1.702 * x)


def _identity(x: Tensor) -> Tensor:
    return x


ACTIVATIONS: dict[str, Callable[[Tensor], Tensor]] = {
    "silu": _silu,  # x * sigmoid(x)  (a.k.a. swish; SwiGLU when gated)
    "gelu": _gelu,  # exact: 0.5 * x * (1 + erf(x / sqrt(2)))
    "gelu_tanh": _gelu_tanh,  # 0.5 * x * (1 + tanh(sqrt(2/pi) * (x + 0.044715 x^3)))
    "relu": _relu,  # max(x, 0)
    "relu2": _relu2,  # max(x, 0)^2  (squared ReLU, Primer / Nemotron)
    "sigmoid": _sigmoid,  # 1 / (1 + exp(-x))
    "quick_gelu": _quick_gelu,  # x * sigmoid(1.702 x)  (CLIP)
    "identity": _identity,  # x  (bilinear GLU when gated)
}


def get_activation(name: str) -> Callable[[Tensor], Tensor]:
    """Return the activation registered as `name`.

    Raises `UnsupportedActivationError` naming `name` and listing the supported names when it is not registered.
    """
    try:
        return ACTIVATIONS[name]
    except (KeyError, TypeError):
        supported = ", ".join(sorted(ACTIVATIONS))
        raise UnsupportedActivationError(
            f"unsupported activation {name!r}; supported activations: {supported}"
        ) from None
