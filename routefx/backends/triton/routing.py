"""Routing metadata for the Triton routed FFN, computed on the device with no host synchronisation.

Every step is a fixed-shape tensor op (compare, cumsum, gather, scatter): no `.item()`, `.tolist()`, `nonzero`,
boolean indexing or `bincount` (whose output size depends on the data), so a decode step can be captured in a
CUDA graph and replayed with new route ids. The tile map (route, row block, column block) is not built here:
each kernel program derives it from `count` and the route widths (see `kernels._find_tile`), because the block
sizes are picked by the autotuner after this metadata exists.

Shapes: N = T*K assignments (token t, slot k) -> id t*K + k; R ranges; R' = R + 1 buckets, the last one a drop
bucket (width 0) for route ids outside [0, R) so that a bad id can neither index out of bounds on the device nor
force a host check; such an assignment contributes 0 (on CPU the wrapper raises instead, see `ffn.py`).
"""

from __future__ import annotations

from typing import Dict, List, NamedTuple, Tuple

import torch
from torch import Tensor

__all__ = ["RouteMeta", "route_metadata", "range_tables"]


class RouteMeta(NamedTuple):
    order: Tensor  # [N]  int32 assignment ids grouped by route (stable within a route)
    count: Tensor  # [R'] int32 assignments per route bucket
    offset: Tensor  # [R'] int32 exclusive prefix sum of count: route r owns order[offset[r] : offset[r] + count[r]]


SORT_KERNEL_MAX_N = 4096  # up to this many assignments, one Triton program does the sort (one launch)


def route_metadata(routes: Tensor, num_ranges: int, launch=None) -> RouteMeta:
    """Counting sort of the flat route ids `routes` [N] (int64) into `num_ranges` + 1 buckets, on routes' device.

    With `launch` (a callable taking (kernel, grid, *args, **constexprs); see ffn.py) and N <= SORT_KERNEL_MAX_N,
    one Triton program does it (`kernels.route_sort_kernel`: one launch). Otherwise torch ops: a stable argsort
    (radix sort on CUDA) and counts by scatter_add."""
    n = routes.shape[0]
    nb = num_ranges + 1
    dev = routes.device
    if launch is not None and 0 < n <= SORT_KERNEL_MAX_N:
        from routefx.backends.triton.kernels import route_sort_kernel
        order = torch.empty(n, dtype=torch.int32, device=dev)
        count = torch.empty(nb, dtype=torch.int32, device=dev)
        offset = torch.empty(nb, dtype=torch.int32, device=dev)
        block = max(16, 1 << (n - 1).bit_length())
        launch(route_sort_kernel, (1,), routes, order, count, offset, n, nb, BLOCK_N=block)
        return RouteMeta(order, count, offset)
    bucket = torch.where((routes >= 0) & (routes < num_ranges), routes, num_ranges)  # [N] int64
    # stable radix sort (no host sync); counts by scatter_add. (A one-hot [N, R'] cumsum along N was measured at
    # 0.75 ms for N=8192 on an H200: torch's outer-dim scan is slow.)
    # keys of the narrowest type holding every bucket: the radix sort makes one pass per key byte (H200, N=8192:
    # 0.053 ms on int64 keys, 0.009 ms on uint8 keys)
    key_dtype = torch.uint8 if nb <= 256 else torch.int16 if nb <= 2**15 else torch.int32
    order = torch.argsort(bucket.to(key_dtype), stable=True).to(torch.int32)  # [N]
    count = torch.zeros(nb, dtype=torch.int32, device=dev)
    count.scatter_add_(0, bucket, torch.ones(n, dtype=torch.int32, device=dev))  # [R']
    offset = torch.cumsum(count, 0, dtype=torch.int32) - count  # [R']
    return RouteMeta(order, count.contiguous(), offset.contiguous())


_TABLES: Dict[Tuple[Tuple[int, ...], str], Tuple[Tensor, Tensor]] = {}


def range_tables(ranges: List[int], device: torch.device, cache: bool = True) -> Tuple[Tensor, Tensor]:
    """(rstart, rwidth), int32 [R'] on `device`: each range's first neuron and width; the drop bucket has width 0.

    Built from host data (one host-to-device copy), so it is cached per (ranges, device) when `cache` is true:
    a CUDA graph capture must be preceded by one eager call with the same ranges (the usual warm-up). Pass
    `cache=False` while tracing (fake tensors must not be cached)."""
    key = (tuple(int(v) for v in ranges), str(device))
    hit = _TABLES.get(key) if cache else None
    if hit is not None:
        return hit
    starts = [int(ranges[2 * r]) for r in range(len(ranges) // 2)] + [0]
    widths = [int(ranges[2 * r + 1]) - int(ranges[2 * r]) for r in range(len(ranges) // 2)] + [0]
    tables = (
        torch.tensor(starts, dtype=torch.int32, device=device),
        torch.tensor(widths, dtype=torch.int32, device=device),
    )
    if cache:
        _TABLES[key] = tables
    return tables
