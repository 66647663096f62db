"""Routed FFNs on pre-packed oneDNN weights (`routefx.backends.packed_ffn`, what the inductor backend compiles on
the CPU): the hand-built routed stack (skip, K=2 with gates, overlapping ranges, biases, plain MLPs, a route no
token takes, a token taking one route twice) run with the packed op equals the plain op, eagerly, without
Inductor."""
from __future__ import annotations

import functools
import gc

import pytest
import torch

from routefx.backends import inductor, packed_ffn
from routefx.backends.static_routes import copy_module
from routefx.errors import RoutedFFNError
from routefx.ir import capture
from tests.backends.routed_models import ROUTED_FFN, RoutedStack, stack_input
from tests.tolerances import OP_VS_LOOP

pytestmark = pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="needs oneDNN (mkldnn)")

PACKED = torch.ops.routefx.routed_ffn_packed.default


def _targets(gm) -> list:
    return [n.target for n in gm.graph.nodes if n.op == "call_function"]


@functools.lru_cache(maxsize=None)
def _graphs(dtype: torch.dtype):
    gm = capture(RoutedStack().eval().to(dtype), (stack_input(2, 5).to(dtype),))
    plain = inductor.lower_static(gm)[0]   # the constant-route layer becomes a plain FFN
    packed, objs = packed_ffn.pack_routed_ffns(copy_module(plain))
    return plain, packed, objs


@pytest.mark.parametrize("batch,seq", [(3, 11), (1, 1), (4, 64)])
def test_packed_stack_equals_the_plain_op(batch, seq):
    plain, packed, objs = _graphs(torch.float32)
    n_dynamic = _targets(plain).count(ROUTED_FFN)
    assert n_dynamic == len(objs) > 0
    assert ROUTED_FFN not in _targets(packed) and _targets(packed).count(PACKED) == n_dynamic
    x = stack_input(batch, seq, seed=batch * 100 + seq)
    with torch.no_grad():
        ref, out = plain(x), packed(x)
    for r, r_ref in zip(out[2], ref[2]):
        assert torch.equal(r, r_ref)  # the same routes, so the comparison is of the FFNs
    for y, y_ref in zip(out[1], ref[1]):
        torch.testing.assert_close(y, y_ref, atol=OP_VS_LOOP, rtol=OP_VS_LOOP)


def test_other_dtypes_keep_the_plain_op():
    plain, packed, objs = _graphs(torch.float64)
    assert objs == [] and _targets(packed) == _targets(plain) and ROUTED_FFN in _targets(packed)


def test_a_released_packed_ffn_is_a_typed_error():
    gm = capture(RoutedStack().eval(), (stack_input(1, 4),))
    packed, own = packed_ffn.pack_routed_ffns(inductor.lower_static(gm)[0])
    handle = own[0].handle
    del own
    gc.collect()
    with pytest.raises(RoutedFFNError, match=f"no packed FFN {handle}"):
        packed(stack_input(1, 4))
