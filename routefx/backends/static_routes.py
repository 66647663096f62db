"""Recognising routed FFNs whose route ids are constants of the graph (Dense, a static router), shared by the
backends that lower them to a plain FFN on one neuron range."""
from __future__ import annotations

import torch
from torch import fx

__all__ = ["constant_route"]

aten = torch.ops.aten
_FILL_ARG = {aten.full_like.default: 1, aten.full.default: 1}  # op -> position of its fill value
_FILL_CONST = {aten.zeros_like.default: 0, aten.zeros.default: 0, aten.ones_like.default: 1, aten.ones.default: 1}


def constant_route(routes) -> int | None:
    """The route id every token takes when `routes` (routed_ffn's second argument) is a constant fill, else None."""
    if not isinstance(routes, fx.Node) or routes.op != "call_function":
        return None
    if routes.target in _FILL_CONST:
        return _FILL_CONST[routes.target]
    if routes.target not in _FILL_ARG:
        return None
    i = _FILL_ARG[routes.target]
    value = routes.args[i] if len(routes.args) > i else routes.kwargs.get("fill_value")
    return int(value) if isinstance(value, (int, bool)) else None
