"""Routing metadata (counting sort by route) against torch's stable argsort and bincount: the torch-op path and
the one-program Triton kernel (under the interpreter), with route ids outside [0, R) sent to the drop bucket."""

import pytest
import torch

from routefx.backends.triton.routing import route_metadata


def _expected(routes, num_ranges):
    bucket = torch.where((routes >= 0) & (routes < num_ranges), routes, num_ranges)
    order = torch.argsort(bucket, stable=True).to(torch.int32)
    count = torch.bincount(bucket, minlength=num_ranges + 1).to(torch.int32)
    return order, count, (torch.cumsum(count, 0) - count).to(torch.int32)


@pytest.mark.parametrize("n", [1, 37, 300])
@pytest.mark.parametrize("path", ["torch", "kernel"])
def test_route_metadata_matches_stable_argsort(interpreter, n, path):
    ffn = interpreter
    g = torch.Generator().manual_seed(n)
    routes = torch.randint(-1, 6, (n,), generator=g)  # R = 5: ids -1 and 5 are out of range
    meta = route_metadata(routes, 5, launch=ffn._launch if path == "kernel" else None)
    order, count, offset = _expected(routes, 5)
    assert torch.equal(meta.count, count)
    assert torch.equal(meta.offset, offset)
    assert torch.equal(meta.order, order)
