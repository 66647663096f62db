"""FFN activations by name.

`ACTIVATIONS` maps the names used in the IR (and in the `activation: str` argument of `routefx::routed_ffn`)
to elementwise torch functions. Each function keeps shape and dtype and is written with plain torch ops, so it
traces under fx / torch.export and runs on any device.

A name may carry parameters after the base name, `;`-separated (`ActivationSpec`), for the clamped gated units of
GPT-OSS, DeepSeek-V4, GLM-5, MiniMax-M3 and Step-3.7 (all per neuron, so routing by neuron ranges is unchanged):

    h = min(act(min(g, gate_max)), act_max) * (clamp(u, -up_limit, up_limit) + up_add)

with act one of `ACTIVATIONS` or `swish` (x·sigmoid(alpha·x), parameter `alpha`); e.g. GPT-OSS's experts are
`"quick_gelu;gate_max=7.0;up_limit=7.0;up_add=1.0"` (its alpha, 1.702, is quick_gelu's). A plain (non-gated) FFN takes the gate-side parameters
only. `get_activation(name)` returns the gate-side function; its `glu(g, u)` is the gated unit.

`xielu` (Apertus, arXiv 2411.13010) takes four parameters, learned per layer:

    xielu(x) = alpha_p·x² + beta·x                          for x > 0
               alpha_n·(expm1(min(x, eps)) - x) + beta·x    otherwise
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from routefx.errors import UnsupportedActivationError

__all__ = ["ACTIVATIONS", "ActivationSpec", "Activation", "get_activation", "parse_activation"]


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


def _xielu(x: Tensor, ap: float, an: float, beta: float, eps: float) -> Tensor:
    return torch.where(x > 0, ap * x * x + beta * x, (torch.expm1(torch.clamp(x, max=eps)) - x) * an + beta * x)


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


_PARAMS = ("alpha", "gate_max", "act_max", "up_limit", "up_add", "alpha_p", "alpha_n", "beta", "eps")
_XIELU = ("alpha_p", "alpha_n", "beta", "eps")


@dataclasses.dataclass(frozen=True)
class ActivationSpec:
    """A parsed activation name (see the module docstring): `base` is an `ACTIVATIONS` name or "swish"."""

    base: str
    alpha: Optional[float] = None       # swish only: x * sigmoid(alpha x)
    gate_max: Optional[float] = None    # min(g, gate_max) before the activation
    act_max: Optional[float] = None     # min(act(.), act_max) after it
    up_limit: Optional[float] = None    # clamp(u, -up_limit, up_limit) (gated only)
    up_add: float = 0.0                 # added to the clamped u (gated only)
    alpha_p: Optional[float] = None     # xielu only (all four)
    alpha_n: Optional[float] = None
    beta: Optional[float] = None
    eps: Optional[float] = None

    @property
    def name(self) -> str:
        parts = [self.base] + [f"{k}={float(v)!r}" for k in _PARAMS
                               if (v := getattr(self, k)) is not None and not (k == "up_add" and v == 0.0)]
        return ";".join(parts)

    @property
    def gate_only(self) -> bool:
        """No parameter on the up side: the unit is act(g) * u."""
        return self.up_limit is None and self.up_add == 0.0

    @property
    def plain(self) -> bool:
        """A registry activation with no parameter."""
        return self.base in ACTIVATIONS and self == ActivationSpec(self.base)


def _unsupported(name, why: str) -> UnsupportedActivationError:
    supported = ", ".join(sorted(ACTIVATIONS) + ["swish", "xielu"])
    return UnsupportedActivationError(
        f"unsupported activation {name!r}: {why}; supported: {supported}, optionally followed by ';k=v' "
        f"parameters ({', '.join(_PARAMS)})")


def parse_activation(name: str) -> ActivationSpec:
    """The `ActivationSpec` of `name`; raises `UnsupportedActivationError` for an unknown base, parameter or value.
    Parsed once per name (the op checks its activation on every call)."""
    if not isinstance(name, str):
        raise _unsupported(name, "not a string")
    return _parse(name)


@functools.lru_cache(maxsize=None)
def _parse(name: str) -> ActivationSpec:
    base, *params = name.split(";")
    if base not in ACTIVATIONS and base not in ("swish", "xielu"):
        raise _unsupported(name, f"unknown base {base!r}")
    kw: dict = {}
    for p in params:
        k, eq, v = p.partition("=")
        if not eq or k not in _PARAMS or k in kw:
            raise _unsupported(name, f"bad parameter {p!r}")
        try:
            kw[k] = float(v)
        except ValueError:
            raise _unsupported(name, f"parameter {k} is not a number: {v!r}") from None
        if not math.isfinite(kw[k]):
            raise _unsupported(name, f"parameter {k} is not finite: {v!r}")
    if (base == "swish") != ("alpha" in kw):
        raise _unsupported(name, "alpha is the parameter of swish, and swish needs it")
    if (base == "xielu") != any(k in kw for k in _XIELU) or (base == "xielu" and not all(k in kw for k in _XIELU)):
        raise _unsupported(name, f"{', '.join(_XIELU)} are the parameters of xielu, and xielu needs all four")
    if kw.get("up_limit", 0.0) < 0:
        raise _unsupported(name, "up_limit must be >= 0")
    return ActivationSpec(base, **kw)


class Activation:
    """An activation: called on one tensor, the gate side `min(act(min(g, gate_max)), act_max)`; `glu(g, u)` the
    gated unit (the gate side times the clamped, shifted up side)."""

    def __init__(self, spec: ActivationSpec):
        self.spec = spec
        alpha = spec.alpha
        if spec.base == "swish":
            self._base = lambda x: x * torch.sigmoid(alpha * x)
        elif spec.base == "xielu":
            self._base = functools.partial(_xielu, ap=spec.alpha_p, an=spec.alpha_n, beta=spec.beta, eps=spec.eps)
        else:
            self._base = ACTIVATIONS[spec.base]

    def __call__(self, x: Tensor) -> Tensor:
        s = self.spec
        if s.gate_max is not None:
            x = torch.clamp(x, max=s.gate_max)
        x = self._base(x)
        return x if s.act_max is None else torch.clamp(x, max=s.act_max)

    def up(self, u: Tensor) -> Tensor:
        s = self.spec
        if s.up_limit is not None:
            u = torch.clamp(u, -s.up_limit, s.up_limit)
        return u + s.up_add if s.up_add != 0.0 else u

    def glu(self, g: Tensor, u: Tensor) -> Tensor:
        return self(g) * self.up(u)


def get_activation(name: str) -> Activation:
    """The activation `name` names (a registry name, optionally with parameters: see the module docstring).

    Raises `UnsupportedActivationError` naming `name` and listing what is supported when it is not one.
    """
    return _activation(parse_activation(name))


@functools.lru_cache(maxsize=None)
def _activation(spec: ActivationSpec) -> Activation:
    return Activation(spec)
