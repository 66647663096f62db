"""The decode graph cut into per-layer pieces, so that a decode step can skip whole layers at run time.

Decode-time skip policies (`routefx.generate.decode_policies`) choose per step and per row which layers run. One
graph per subset would make the number of compiled graphs grow as 2^L; a runtime skip input inside one graph either
runs every layer and masks the result (no saving) or needs one ONNX `If` per layer (a branch the graph cannot
batch over rows that differ). Instead the rewritten decode graph (the plan's passes applied: Duo routers, small
branches, pruned blocks) is cut along its residual stream into 2L + 2 graphs, a fixed number whatever the
policy:

    pre(input_ids, attention_mask, position_ids, ...)   -> the stream S_0 and the values every layer reads
                                                           (the attention mask, rotary cos/sin, ...)
    layer_l(S_l, shared..., past_key_l, past_value_l)   -> S_(l+1), key_l, value_l        (the whole block)
    kv_l(S_l, shared..., past_key_l, past_value_l)      -> key_l, value_l                 (only what K/V need)
    post(S_L)                                           -> logits (per position: norm, LM head)

A layer's cache is its K/V and, for sparse attention (DSA), its indexer keys (`past_index_l` in, `index_l` out,
computed by `kv_l` too: a later token's indexer scores every earlier position's keys).

A node's piece is found by structure, not by name: it belongs to layer l when S_l is the last stream node among
its ancestors (S_l = `BlockInfo.stream_in` of block l, S_L the last block's `stream_out`); nodes with no stream
ancestor form `pre`, and so do nodes computed from S_0 outside the first block (Gemma 4's per-layer inputs, which
every layer reads); nodes after S_L form `post`. `kv_l` is `layer_l` with every node that K/V do not depend on
removed (for a pre-norm Llama block: the input norm, K and V projections, rotary, the concatenation with the past).
A layer that reads values of another layer besides the stream (hoisted routers, shared K/V) is refused.

Each piece is lowered by the model's backend like any graph. Rows: every piece input with a batch dim (found from
two example runs at different batch sizes: symbolic shapes in the graph's metadata differ between torch releases)
can be given a subset of the batch's rows (see `Pieces.batched`).
"""
from __future__ import annotations

import copy
import dataclasses
import itertools

import torch
from torch import fx

from routefx.errors import UnsupportedModelError
from routefx.ir import graph_utils as gu
from routefx.ir.capture import CaptureInfo
from routefx.ir.model_ir import ModelIR

__all__ = ["Piece", "Pieces", "split_decode", "drop_empty_cats_"]


@dataclasses.dataclass
class Piece:
    gm: fx.GraphModule
    inputs: list[str]            # names of the values it reads (placeholders of the original graph or pieces)
    outputs: list[str]           # names of the values it returns, in order
    run: object = None           # the backend's callable (run(**kwargs) -> outputs), set by skipping.decode_pieces


@dataclasses.dataclass
class Pieces:
    pre: Piece
    layers: list[Piece]
    kv: list[Piece]
    post: Piece
    streams: list[str]           # S_0 .. S_L by name
    cache: list[tuple[str, ...]]  # per layer: the names of its new key, value (, indexer keys): graph outputs
    batched: frozenset           # names of values whose dim 0 is the batch (probed by skipping.decode_pieces)
    past: list[tuple[str, ...]]  # per layer: its past key/value (/indexer keys) placeholder names

    @property
    def count(self) -> int:
        return 2 + len(self.layers) + len(self.kv)


def _stage(gm: fx.GraphModule, streams: list[fx.Node]) -> dict[fx.Node, int]:
    """Per node, the index of the last stream node among its proper ancestors (-1: none)."""
    index = {s: k for k, s in enumerate(streams)}
    stage: dict[fx.Node, int] = {}
    for n in gm.graph.nodes:
        stage[n] = max([index[i] if i in index else stage[i] for i in n.all_input_nodes], default=-1)
    return stage


def _into_pre(gm: fx.GraphModule, stage: dict, first) -> None:
    """Values computed from S_0 and the inputs alone, outside the first block (Gemma 4 projects the embedded
    tokens into per-layer inputs that every layer reads), are `pre`'s: stage 0 -> -1, in place."""
    inside = set(first.nodes)
    tainted: set = set()
    for n in gm.graph.nodes:
        if n in inside or any(i in tainted for i in n.all_input_nodes):
            tainted.add(n)
        elif stage[n] == 0 and n.op == "call_function":
            stage[n] = -1


def _constants_to_users(gm: fx.GraphModule, stage: dict) -> None:
    """Values computed from weights alone (Gemma 4's norms cast their weight, `weight.float()`) go to the piece
    that reads them, when one piece does, instead of `pre` (the LM head's piece may read nothing but S_L)."""
    const = gu.weight_only_nodes(gm.graph)
    for n in reversed(gm.graph.nodes):
        if n in const and n.op == "call_function" and len(at := {stage[u] for u in n.users}) == 1:
            stage[n] = at.pop()


def _is_scalar(n: fx.Node) -> bool:
    """A size computed from shapes (sym_size and the int arithmetic on it): copied into every piece using it."""
    return n.op == "call_function" and isinstance(n.meta.get("val"), (torch.SymInt, int)) \
        and not isinstance(n.meta.get("val"), bool)


class _Scalars:
    """Copies of size nodes, with `sym_size(x, d)` reading the same size from an input the piece has anyway (so a
    layer that needs the batch size reads it from input_ids, not from another layer's past K/V)."""

    _FIRST = ("input_ids", "position_ids", "attention_mask")

    def __init__(self, gm: fx.GraphModule):
        self.canon: dict = {}                     # size expression -> [(placeholder, dim)], graph inputs first
        places = [n for n in gm.graph.nodes if n.op == "placeholder" and isinstance(n.meta.get("val"), torch.Tensor)]
        places.sort(key=lambda n: n.target not in self._FIRST)
        for n in places:
            for d, size in enumerate(n.meta["val"].shape):
                if isinstance(size, torch.SymInt):
                    self.canon.setdefault(size.node.expr, []).append((n, d))

    def pick(self, n: fx.Node, prefer: set) -> tuple[fx.Node, int] | None:
        """For a sym_size node: the first input in `prefer` with the same size; None keeps the node's own."""
        if n.target is not torch.ops.aten.sym_size.int or not isinstance(v := n.meta["val"], torch.SymInt):
            return None
        return next(((p, d) for p, d in self.canon.get(v.node.expr, []) if p.target in prefer), None)

    def source(self, n: fx.Node, prefer: set) -> list:
        picked = self.pick(n, prefer)
        return [picked[0]] if picked else n.all_input_nodes

    def closure(self, ns: list[fx.Node], prefer: set) -> list[fx.Node]:
        """The scalar nodes `ns` use, directly or through other scalar nodes."""
        out, stack = [], [i for n in ns for i in n.all_input_nodes if _is_scalar(i)]
        while stack:
            n = stack.pop()
            if n not in out:
                out.append(n)
                stack.extend(i for i in self.source(n, prefer) if _is_scalar(i))
        return out


def _extract(gm: fx.GraphModule, nodes: list[fx.Node], inputs: list[fx.Node], outputs: list[fx.Node],
             scalars: _Scalars, prefer: set) -> fx.GraphModule:
    """A GraphModule of `nodes` (in graph order) reading `inputs` as placeholders and returning `outputs`."""
    g = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    for n in inputs:
        p = g.placeholder(n.name)
        p.meta = copy.copy(n.meta)
        env[n] = p

    def arg(x: fx.Node) -> fx.Node:
        if x not in env and x.op == "get_attr":               # weights and constants: copied into every user
            env[x] = g.get_attr(x.target)
            env[x].meta = copy.copy(x.meta)
        return env[x]

    for n in nodes:
        if _is_scalar(n) and (picked := scalars.pick(n, prefer)) is not None:
            src, d = picked
            env[n] = g.call_function(torch.ops.aten.sym_size.int, (env[src], d))
            env[n].meta = copy.copy(n.meta)
        else:
            env[n] = g.node_copy(n, arg)
    g.output(tuple(env[o] for o in outputs))
    sub = fx.GraphModule(gm, g)
    sub.graph.eliminate_dead_code()
    sub.recompile()
    sub.meta["routefx"] = CaptureInfo(arg_names=(), constant_kwargs={})
    return sub


def _closure(nodes: list[fx.Node], outputs: list[fx.Node]) -> list[fx.Node]:
    """The nodes of `nodes` that `outputs` depend on, in order."""
    members, need, stack = set(nodes), set(), list(outputs)
    while stack:
        n = stack.pop()
        if n in need or n not in members:
            continue
        need.add(n)
        stack.extend(n.all_input_nodes)
    return [n for n in nodes if n in need]


def _static_empty(n) -> bool:
    v = n.meta.get("val") if isinstance(n, fx.Node) else None
    return isinstance(v, torch.Tensor) and all(isinstance(d, int) for d in v.shape) and v.numel() == 0


def drop_empty_cats_(gm: fx.GraphModule) -> int:
    """Replace each `cat` whose other inputs are statically empty by its one non-empty input (a cache seeded with
    the past concatenates it to an empty tensor: a copy of the whole past per step). In place; returns the count."""
    count = 0
    for n in list(gm.graph.nodes):
        if n.op == "call_function" and n.target is torch.ops.aten.cat.default:
            rest = [a for a in n.args[0] if not _static_empty(a)]
            if len(rest) == 1 and len(n.args[0]) > 1 and rest[0].meta["val"].shape == n.meta["val"].shape:
                n.replace_all_uses_with(rest[0])
                gm.graph.erase_node(n)
                count += 1
    if count:
        gm.graph.eliminate_dead_code()    # the empty tensors the cats read
        gm.recompile()
    return count


def split_decode(gm: fx.GraphModule, ir: ModelIR, kept: list[int],
                 entries: list[tuple[str, ...]] | None = None) -> Pieces:
    """Cut the (rewritten) decode graph `gm` of layers `kept` into pieces (see the module docstring). `entries`:
    per kept layer, the names of its cache entries in the graph's order (default: key_i, value_i; the graph returns
    logits, then every layer's entries). Removes empty concatenations from `gm` first (`drop_empty_cats_`: the
    same function)."""
    drop_empty_cats_(gm)
    blocks = ir.blocks
    if not blocks or any(b.stream_in is None or b.stream_out is None for b in blocks):
        raise UnsupportedModelError("decode-time layer skipping needs the residual stream of every block; "
                                    "recognition found none for some blocks of this model")
    if len(blocks) != len(kept):
        raise UnsupportedModelError(f"{len(blocks)} blocks but {len(kept)} cached layers: routefx cannot tell "
                                    "which cache entry each block owns")
    for a, b in zip(blocks, blocks[1:]):
        if a.stream_out is not b.stream_in:
            raise UnsupportedModelError(f"block {a.index}'s output stream ({a.stream_out.name}) is not block "
                                        f"{b.index}'s input ({b.stream_in.name}); routefx skips whole layers only "
                                        "in a plain sequence of residual blocks")
    streams = [blocks[0].stream_in] + [b.stream_out for b in blocks]
    L = len(blocks)
    stage = _stage(gm, streams)
    _into_pre(gm, stage, blocks[0])
    _constants_to_users(gm, stage)
    out_node = next(n for n in gm.graph.nodes if n.op == "output")
    outs = list(out_node.args[0])                          # (logits, key_i, value_i, ...) in `kept` order
    entries = entries or [(f"key_{i}", f"value_{i}") for i in kept]
    if len(entries) != L or 1 + sum(map(len, entries)) != len(outs):
        raise UnsupportedModelError(f"the decode graph returns {len(outs)} values, not the logits and the cache "
                                    f"entries {entries} of its {L} blocks; routefx cannot tell which block owns which")
    at = list(itertools.accumulate(map(len, entries), initial=1))
    cache = [tuple(outs[at[j]:at[j + 1]]) for j in range(L)]
    past = [tuple(f"past_{name}" for name in names) for names in entries]
    for j, values in enumerate(cache):
        if any(stage[c] != j for c in values):
            raise UnsupportedModelError(f"layer {kept[j]}'s cache entries {list(entries[j])} are computed outside "
                                        f"its block (stages {[stage[c] for c in values]}); routefx cannot skip "
                                        "such a layer")

    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    scalars = _Scalars(gm)
    computed = [n for n in gm.graph.nodes if n.op not in ("placeholder", "output", "get_attr") and not _is_scalar(n)]
    by_stage: dict[int, list[fx.Node]] = {}
    for n in computed:
        by_stage.setdefault(stage[n], []).append(n)
    groups = [by_stage.get(-1, [])] + [by_stage.get(j, []) for j in range(L)] + [by_stage.get(L, [])]
    places = [n.target for n in gm.graph.nodes if n.op == "placeholder"]
    inputs = set(_Scalars._FIRST)
    prefer = [set(places)] + [inputs | set(past[j]) for j in range(L)] + [inputs]     # where sizes are read from
    groups = [sorted(ns + scalars.closure(ns, prefer[gi]), key=order.get) for gi, ns in enumerate(groups)]
    member = {n: gi for gi, ns in enumerate(groups) for n in ns if not _is_scalar(n)}  # 0 pre, 1+j layer j, L+1 post

    def external(ns: list[fx.Node], gi: int) -> list[fx.Node]:
        seen, ext = set(ns), []
        for n in ns:
            for i in (scalars.source(n, prefer[gi]) if _is_scalar(n) else n.all_input_nodes):
                if i not in seen and i.op != "get_attr" and i not in ext:
                    ext.append(i)
        allowed = {streams[gi - 1]} if gi > 0 else set()     # layer j = piece j + 1 reads S_j; post reads S_L
        bad = [i for i in ext if i.op != "placeholder" and i not in allowed and (gi == 0 or member.get(i) != 0)]
        if bad:
            raise UnsupportedModelError(f"piece {gi} reads {[i.name for i in bad]} from another layer besides the "
                                        "residual stream (hoisted routers or shared state); routefx cannot skip "
                                        "layers of this graph")
        return ext

    def piece(ns, outs, gi):
        ins = external(ns, gi)
        return Piece(_extract(gm, ns, ins, outs, scalars, prefer[gi]), [n.name for n in ins],
                     [n.name for n in outs])

    layer_ins = [external(groups[1 + j], 1 + j) for j in range(L)]
    post_ins = external(groups[L + 1], L + 1)
    if post_ins != [streams[L]]:
        raise UnsupportedModelError(f"the LM head reads {[i.name for i in post_ins]}; routefx skips layers of "
                                    "models whose head reads only the last block's stream")
    shared = [i for ins in layer_ins + [post_ins] for i in ins if member.get(i) == 0]
    pre = piece(groups[0], list(dict.fromkeys([streams[0]] + shared)), 0)
    layers, kvs = [], []
    for j in range(L):
        layers.append(piece(groups[1 + j], [streams[j + 1], *cache[j]], 1 + j))
        kv_nodes = [n for n in _closure(groups[1 + j], list(cache[j])) if not _is_scalar(n)]
        kv_nodes = sorted(set(kv_nodes + scalars.closure(kv_nodes, prefer[1 + j])), key=order.get)
        kvs.append(piece(kv_nodes, list(cache[j]), 1 + j))
    post = piece(groups[L + 1], [outs[0]], L + 1)
    return Pieces(pre, layers, kvs, post, [s.name for s in streams], [tuple(c.name for c in cs) for cs in cache],
                  frozenset(), past)
