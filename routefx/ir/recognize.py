"""Structure recognition: follow the residual stream of a captured graph and cut it into blocks.

Rules (names never matter; module paths only name what was found):
1. A *residual sum* is an addition tree `x + y_1 + ... + y_n` (adds whose only user is the next add are one
   tree, also through casts read by nothing else; an in-place `add_` into a temporary nothing else reads counts
   as an add) in which one term `x` (the stream, possibly rescaled by input-independent factors: Doge's
   `input_residual * residual`) reaches every other term `y_i` (a branch) through a matrix product; or, where no
   term does, one term is a matrix product of a value X of the sum's shape with weights (a mix of parallel
   residual streams, manifold hyper-connections: comb·X + post⊗y) and X is the stream. Sums whose last dim is not
   a static size (attention scores plus an ALiBi bias, [B, H, S, S]) are not residual sums.
2. The hidden size is the last dimension shared by most residual sums; the *stream* is the longest chain of
   sums in which each sum's `x` is the previous sum's output, possibly through reshapes (OPT flattens it to
   [B*S, d] around the FFN), a norm (post-norm models), a rescaling by input-independent factors (Gemma 4's
   `layer_scalar`) or a slice over positions (Gemma 4's prefill runs its KV-sharing layers on the last
   positions only).
3. A branch holding an attention op (or a product of two activations, or reading a generation step's cache or
   scan state: a linear-attention step) is attention; one with a top-k router or
   grouped expert GEMMs is MoE (plain FFN branches added in the same sum are its shared experts); any other is
   an FFN. A block ends at the first sum holding an FFN branch; in a block with attention, sums right after it
   whose branches are per-token FFNs reading an input of their own besides the stream (Gemma 4's per-layer
   inputs) belong to it. A block's output includes a rescaling of the stream that follows it.
4. Form, per block: a norm between `x` and a branch's first product is a pre-norm, one between its last product
   and the add a branch-output norm, one between the add and the next stream value a post-norm.
5. The block count is cross-checked against the graph's attention ops, one attention and one FFN per block and
   the blocks' sizes; disagreements go to `ModelIR.notes`.
"""
from __future__ import annotations

import dataclasses
from collections import Counter

import torch
from torch import fx

from routefx.errors import NoBlocksError
from routefx.ir import graph_utils as gu
from routefx.ir.attention import attention_masks, attention_site
from routefx.ir.ffn import analyse_ffn
from routefx.ir.model_ir import AttentionInfo, BlockInfo, FFNInfo, ModelIR

__all__ = ["recognize"]


@dataclasses.dataclass(eq=False)
class _Branch:
    term: fx.Node           # the branch's value as added to the stream
    region: set             # nodes strictly between the stream value and `term`, plus `term`
    kind: str               # "attention" | "ffn" | "moe"


@dataclasses.dataclass(eq=False)
class _Sum:
    out: fx.Node            # the root add
    adds: list              # every add of the tree
    stream: fx.Node         # the stream term x (looked through identities)
    branches: list


_ADD_ = gu._targets(torch.ops.aten.add_)


def _is_add(n: fx.Node) -> bool:
    """An out-of-place add, or an in-place `add_` into a temporary that nothing else reads (Falcon's
    `mlp_output += attention_output`), which computes the same value."""
    if n.op != "call_function" or len(n.args) < 2:
        return False
    if n.target in gu.ADD:
        return True
    buf = n.args[0]
    return n.target in _ADD_ and isinstance(buf, fx.Node) and len(buf.users) == 1 and buf.op == "call_function"


def _terms(n: fx.Node, adds: list) -> list:
    """Leaves of the addition tree rooted at `n` (through adds whose only user is their parent)."""
    adds.append(n)
    out = []
    for a in n.args[:2]:
        if not isinstance(a, fx.Node):
            return []  # an add of a constant is not a residual sum
        r = gu.root_casts(a)    # a stream term cast to the sum's dtype (Mamba's residual_in_fp32) is the stream
        if _is_add(r) and _sole_users(a, r) and gu.val(r) is not None \
                and gu.val(n) is not None and gu.val(r).shape == gu.val(n).shape:
            sub = _terms(r, adds)
            if not sub:
                return []
            out.extend(sub)
        else:
            out.append(r)
    return out


def _sole_users(a: fx.Node, r: fx.Node) -> bool:
    """Is every node from `a` back to `r` (through identities: casts) read once only? A value also read elsewhere
    through a cast (a residual stream cast after each add, read by the next block and by the next add) is a stream
    value, not a partial sum of one tree."""
    while True:
        if len(a.users) != 1:
            return False
        if a is r:
            return True
        a = a.args[0]


def _branch_kind(region: set) -> str | None:
    """'attention', 'moe', 'ffn', or None when the region holds no matrix product."""
    mm = [n for n in region if gu.is_matmul(n)]
    if any(n.op == "call_function" and n.target in gu.ATTENTION for n in region):
        return "attention"
    # eager attention: a product of two values that both come from the stream (Q·Kᵀ, P·V)
    if any(gu.multiplies_activations(n, region) for n in mm):
        return "attention"
    if not mm:
        return None
    if any(gu.is_grouped_mm(n) or (n.op == "call_function" and n.target in gu.TOPK) for n in region):
        return "moe"
    return "ffn"


def _state_values(gm: fx.GraphModule, dyn: set) -> set:
    """The values computed from the inputs that carry what earlier tokens left (a generation step's K/V cache and
    scan states, `CaptureInfo.state_inputs`) and from nothing else the call gives: a branch reading one mixes
    the current token with earlier ones, as attention does (a linear-attention or state-space step multiplies
    the state elementwise, with no product of two activations)."""
    info = gm.meta.get("routefx")
    names = set(getattr(info, "state_inputs", ()) or ())
    if not names:
        return set()
    out: set = set()
    for n in gm.graph.nodes:
        if n.op == "placeholder":
            if n.target in names:
                out.add(n)
        elif n in dyn:
            ins = [a for a in n.all_input_nodes if a in dyn]
            if ins and all(a in out for a in ins):
                out.add(n)
    return out


def _reads_state(region: set, state: set) -> bool:
    return bool(state) and any(a in state and a not in region for n in region for a in n.all_input_nodes)


def _find_sums(graph: fx.Graph, dyn: set, state: set = frozenset()) -> list[_Sum]:
    sums = []
    for n in graph.nodes:
        if not _is_add(n) or n not in dyn:
            continue
        v = gu.val(n)
        if v is None or not v.is_floating_point() or v.dim() < 2 or not isinstance(v.shape[-1], int):
            continue  # a residual stream has a static hidden size; [B, H, S, S] score sums (ALiBi) do not
        # skip adds that belong to a larger tree (their only user is the parent add)
        if len(n.users) == 1:
            u = next(iter(n.users))
            if _is_add(u) and gu.val(u) is not None and gu.val(u).shape == v.shape:
                continue
        adds: list = []
        terms = [t for t in _terms(n, adds) if t in dyn]
        if len(terms) < 2:
            continue
        anc = {t: gu.ancestors([t]) for t in terms}
        # the stream term x, and the terms that are branches; or a mix of the streams before the sum (manifold
        # hyper-connections: comb·X + post⊗y, with no term an ancestor of the others), whose X is the stream
        split = [(x, [t for t in terms if t is not x]) for x in terms]
        # the stream term may be rescaled by input-independent factors (Doge adds its branch to w ⊙ residual):
        # looked at only where no term is the stream as it is
        streams = lambda cands: [c for c in cands if all(c[0] in anc[t] for t in c[1])][:1]  # noqa: E731
        for x, others in (streams(split) or streams((_stream_source(x, dyn), o) for x, o in split)
                          or _mixed_stream(terms, v)):
            if not all(x in anc[t] for t in others):
                continue
            desc_x = gu.descendants(x)
            branches = []
            for t in others:
                region = (desc_x & anc[t]) | {t}
                kind = _branch_kind(region)
                if kind == "ffn" and _reads_state(region, state):
                    kind = "attention"
                if kind is None:
                    branches = []
                    break
                branches.append(_Branch(t, region, kind))
            if branches:
                sums.append(_Sum(n, adds, x, _merge_shared_experts(branches)))
            break
    return sums


_MIX_VIEWS = gu.VIEWS | gu.targets(torch.ops.aten.expand, torch.ops.aten.clone, torch.ops.aten.contiguous)


def _mixed_stream(terms: list, v) -> list[tuple[fx.Node, list]]:
    """[(X, the other terms)] when one term is a matrix product of a value X of the sum's shape with weights (a
    mix of parallel residual streams: manifold hyper-connections, DeepSeek-V4), else []. X is then the stream."""
    for m in terms:
        p = gu.root_views(m)
        if p.op != "call_function" or p.target not in gu.MATMUL:
            continue
        for a in gu.product_operands(p):
            while isinstance(a, fx.Node) and a.op == "call_function" and (gu.is_identity(a) or a.target in _MIX_VIEWS):
                a = a.args[0]
            if isinstance(a, fx.Node) and gu.val(a) is not None and str(gu.val(a).shape) == str(v.shape):
                return [(a, [t for t in terms if t is not m])]
    return []


def _merge_shared_experts(branches: list[_Branch]) -> list[_Branch]:
    """A MoE branch and plain FFN branches added to the stream in one sum are one MoE FFN with shared experts
    (DeepSeek-V3 adds its ungated shared expert to the routed experts' output before the residual add)."""
    moe = [b for b in branches if b.kind == "moe"]
    shared = [b for b in branches if b.kind == "ffn"]
    if len(moe) != 1 or not shared:
        return branches
    merged = _Branch(moe[0].term, set().union(moe[0].region, *(b.region for b in shared)), "moe")
    return [b for b in branches if b.kind == "attention"] + [merged]


def _reaches_through_norm(src: fx.Node, dst: fx.Node, dyn: set) -> bool | None:
    """None if dst is src as a stream (`_stream_source`: up to identities, reshapes, input-independent rescaling
    and slices over positions), True if dst is a norm of src; False otherwise.

    Reshapes count as the same stream: OPT's layers flatten it to [B*S, d] around the FFN and back."""
    if _stream_source(dst, dyn) is src:
        return None
    mid = gu.between(src, dst) | {dst}
    if not mid or len(mid) > 40 or any(gu.is_matmul(n) for n in mid):
        return False
    return _has_norm(mid)


def _has_norm(nodes) -> bool:
    nodes = [n for n in nodes if n.op == "call_function"]
    if any(n.target in gu.NORMS for n in nodes):
        return True
    return any(n.target in gu.REDUCTIONS for n in nodes) and any(n.target in gu.RSQRT or
                                                                 n.target == torch.ops.aten.div.Tensor or
                                                                 _inverse_root(n) for n in nodes)


def _inverse_root(n: fx.Node) -> bool:
    """x ** -0.5 (Gemma 4's RMSNorm writes its rsqrt as `torch.pow(mean_squared, -0.5)`)."""
    return n.target in _POW and len(n.args) == 2 and isinstance(n.args[1], (int, float)) and n.args[1] < 0


_POW = gu.targets(torch.ops.aten.pow)
_SCALE = gu.targets(torch.ops.aten.mul, torch.ops.aten.mul_, torch.ops.aten.div, torch.ops.aten.div_)


def _stream_source(n: fx.Node, dyn: set) -> fx.Node:
    """The stream value `n` derives from per position: through identities, reshapes, rescalings by factors that do
    not depend on the input (Gemma 4 multiplies the stream by a per-layer `layer_scalar` buffer at the end of
    every layer) and slices over positions (Gemma 4's prefill runs its KV-sharing layers on the positions whose
    logits it returns only); `n` itself (up to identities and reshapes) when it is none of these."""
    r = gu.root_views(n)
    while r.op == "call_function" and isinstance(r.args[0], fx.Node):
        a = r.args[0]
        if r.target == torch.ops.aten.slice.Tensor and gu.val(a) is not None and a in dyn:
            dim = r.args[1] if len(r.args) > 1 else r.kwargs.get("dim", 0)
            if dim % gu.val(a).dim() == gu.val(a).dim() - 1:
                break                                  # a slice of the hidden features is no stream
            r = gu.root_views(a)
            continue
        if r.target not in _SCALE or len(r.args) != 2:
            break
        b = r.args[1]
        is_dyn = [isinstance(v, fx.Node) and v in dyn for v in (a, b)]
        if is_dyn == [True, False]:
            r = gu.root_views(a)
        elif is_dyn == [False, True] and r.target in _SCALE - gu.targets(torch.ops.aten.div, torch.ops.aten.div_):
            r = gu.root_views(b)
        else:
            break
    return r


def _scaled_output(n: fx.Node, dyn: set) -> fx.Node:
    """The stream value after `n` once a rescaling by input-independent factors that is its only reader (through
    identities) has applied (the last block of a model that rescales its stream at the end of each layer); else
    `n`."""
    out, m = n, n
    while len(m.users) == 1:
        u = next(iter(m.users))
        if not (u.op == "call_function" and (u.target in _SCALE or gu.is_identity(u))
                and _stream_source(u, dyn) is gu.root_views(n) and gu.val(u) is not None and gu.val(n) is not None
                and str(gu.val(u).shape) == str(gu.val(n).shape)):
            break
        m = u
        if u.target in _SCALE:
            out = u
    return out


_MIXES_POSITIONS = gu.targets(torch.ops.aten.convolution, torch.ops.aten._convolution, torch.ops.aten.conv1d,
                              torch.ops.aten.cumsum, torch.ops.aten.cumprod)


def _per_layer_input(branch: _Branch, stream: fx.Node, dyn: set) -> bool:
    """Is the branch a per-token function of the stream and of an input-dependent value that is neither the stream
    nor computed in the branch (a per-layer input: Gemma 4 gates one by the stream and adds its projection to the
    stream after the FFN)? A token mixer that reads the attention mask (LFM's short convolutions) is not."""
    if any(n.op == "call_function" and n.target in _MIXES_POSITIONS for n in branch.region):
        return False
    return any(isinstance(a, fx.Node) and a in dyn and a not in branch.region and a is not stream
               for m in branch.region for a in m.all_input_nodes)


def _chain(sums: list[_Sum], dyn: set) -> list[tuple[_Sum, bool]]:
    """Longest chain of sums linked through the stream (also through rescalings by input-independent factors and
    slices over positions between layers: `_stream_source`); each with whether a norm follows it (post-norm)."""
    best: dict[int, tuple[int, int | None, bool]] = {}  # i -> (length, prev index, post-norm link)
    for j, s in enumerate(sums):
        best[j] = (1, None, False)
        for i in reversed(range(j)):
            link = _reaches_through_norm(sums[i].out, s.stream, dyn)
            if link is not False:
                best[j] = (best[i][0] + 1, i, bool(link))
                break
    if not best:
        return []
    j = max(best, key=lambda k: (best[k][0], -k))
    chain = []
    post_next = False
    while j is not None:
        _, prev, post = best[j]
        chain.append((sums[j], post_next))
        post_next = post
        j = prev
    chain.reverse()
    if chain and not chain[-1][1]:
        chain[-1] = (chain[-1][0], _followed_by_norm(chain[-1][0].out))
    return chain


def _followed_by_norm(n: fx.Node, depth: int = 8) -> bool:
    """Does a norm read `n` within a few ops (the last block of a post-norm model)?"""
    seen, frontier = set(), [n]
    for _ in range(depth):
        frontier = [u for m in frontier for u in m.users if u not in seen and not gu.is_matmul(u)]
        seen.update(frontier)
    return _has_norm(seen)


def _norm_before(stream: fx.Node, branch: _Branch) -> bool:
    """Is there a norm between the stream value and the branch's first matrix product?"""
    mms = [n for n in branch.region if gu.is_matmul(n)]
    firsts = [m for m in mms if not any(a in branch.region and gu.is_matmul(a) for a in gu.ancestors([m]))]
    pre = set()
    for m in firsts:
        pre |= (gu.ancestors([m]) & branch.region)
    return _has_norm(pre)


def _norm_after(branch: _Branch) -> bool:
    """Is there a norm between the branch's last matrix product and its term?"""
    mms = [n for n in branch.region if gu.is_matmul(n)]
    finals = [m for m in mms if not any(gu.is_matmul(a) for a in gu.descendants(m) & branch.region)]
    tail = {branch.term}
    for m in finals:  # only what follows the last products: a MoE router's own ops are not a norm
        tail |= gu.descendants(m) & branch.region
    return _has_norm(tail)


def _form(sums: list[tuple[_Sum, bool]]) -> str:
    branches = [(s, b) for s, _ in sums for b in s.branches]
    kinds_per_sum = [{b.kind for b in s.branches} for s, _ in sums]
    if any("attention" in k and len(k) > 1 for k in kinds_per_sum) or any(len(s.branches) > 1 for s, _ in sums):
        return "parallel"
    pre = [_norm_before(s.stream, b) for s, b in branches]
    post_branch = [_norm_after(b) for _, b in branches]
    post_add = [p for _, p in sums]
    if all(pre) and all(post_branch):
        return "sandwich"
    if all(pre) and not any(post_branch):
        return "pre_norm"
    if all(post_add) and not any(pre) and not any(post_branch):
        return "post_norm"
    if all(post_branch) and not any(pre):
        return "branch_output_norm"
    if not any(pre) and not any(post_branch) and not any(post_add):
        return "no_norm"
    return "mixed_norm"


def recognize(gm: fx.GraphModule) -> ModelIR:
    """Recognise transformer blocks in `gm` (from `capture`). Raises `NoBlocksError` (an `UnsupportedModelError`) if there are none."""
    graph = gm.graph
    dyn = gu.dynamic_nodes(graph)
    sums = _find_sums(graph, dyn, _state_values(gm, dyn))
    if not sums:
        ops = Counter(str(n.target).split(".")[1] if str(n.target).startswith("aten.") else str(n.target)
                      for n in graph.nodes if n.op == "call_function" and n in dyn)
        top = ", ".join(f"{k}×{v}" for k, v in ops.most_common(6))
        raise NoBlocksError(
            "no transformer blocks found: the graph has no residual connection whose branch holds a matrix "
            f"product (found ops: {top}); routefx supports transformer models whose blocks add attention and "
            "feed-forward branches to a residual stream")
    # the hidden size: the most common last dim of the sums whose chain holds attention (a recurrent scan's
    # per-position adds, as in Mamba-1's sequential path, can outnumber the residual sums), else the most common
    widths = [w for w, _ in Counter(gu.val(s.out).shape[-1] for s in sums).most_common()]
    for d in widths:
        chain = _chain([s for s in sums if gu.val(s.out).shape[-1] == d], dyn)
        if _holds_attention(chain):
            break
    else:
        d = widths[0]
        chain = _chain([s for s in sums if gu.val(s.out).shape[-1] == d], dyn)
    if not _holds_attention(chain):
        kinds = Counter(b.kind for s, _ in chain for b in s.branches)
        raise NoBlocksError(
            f"no transformer blocks found: {len(chain)} residual branch(es) of width {d} "
            f"({', '.join(f'{v} {k}' for k, v in kinds.items())}) and none holds an attention op; routefx "
            "supports transformer models (attention and feed-forward branches on a residual stream)")

    groups: list[list[tuple[_Sum, bool]]] = [[]]
    side: set = set()        # sums of per-layer-input branches after a block's FFN: part of that block
    for s, post in chain:
        if not groups[-1] and len(groups) > 1 and any(b.kind == "attention" for t, _ in groups[-2]
                                                      for b in t.branches) \
                and all(b.kind == "ffn" and _per_layer_input(b, s.stream, dyn) for b in s.branches):
            groups[-2].append((s, post))
            side.add(s)
            continue
        groups[-1].append((s, post))
        if any(b.kind in ("ffn", "moe") for b in s.branches):
            groups.append([])
    groups = _split_across_layers([g for g in groups if g])

    masks = attention_masks(gm)
    blocks = []
    for i, g in enumerate(groups):
        region = set().union(*(b.region for s, _ in g for b in s.branches))
        attn = [_attention(b.region, masks) for s, _ in g for b in s.branches if b.kind == "attention"]
        ffn_branches = [(s, b) for s, _ in g for b in s.branches if b.kind in ("ffn", "moe")]
        ffn: FFNInfo | None = None
        if ffn_branches:
            s, b = ffn_branches[0]
            ffn = analyse_ffn(gm, s.stream, b.term, b.region, b.kind, dyn)
        anchors = [n for n in region if gu.is_matmul(n)] + [a for s, _ in g for a in s.adds]
        blocks.append(BlockInfo(index=i, path=gu.common_path(anchors),
                                form=_form([(s, p) for s, p in g if s not in side]), ffn=ffn, attention=attn,
                                stream_in=g[0][0].stream, stream_out=_scaled_output(g[-1][0].out, dyn),
                                nodes=frozenset(region | set(a for s, _ in g for a in s.adds)),
                                ffn_nodes=frozenset(ffn_branches[0][1].region) if ffn_branches else frozenset(),
                                ffn_stream=ffn_branches[0][0].stream if ffn_branches else None))
    runs: Counter = Counter()   # a looped model runs one FFN module in several blocks: each run its own key
    for b in blocks:
        if b.ffn is not None and b.ffn.path:
            b.run = runs[b.ffn.path]
            runs[b.ffn.path] += 1
    # the stream after a block is what the next block reads (after a post-norm, the norm's output)
    for b, nxt in zip(blocks, blocks[1:]):
        b.stream_out = nxt.stream_in
    if chain[-1][1] and blocks[-1].form == "post_norm":
        blocks[-1].stream_out = _norm_output(blocks[-1].stream_out)
    return ModelIR(hidden_size=d, blocks=blocks, notes=_cross_check(graph, dyn, blocks))


def _holds_attention(chain: list[tuple[_Sum, bool]]) -> bool:
    return any(b.kind == "attention" for s, _ in chain for b in s.branches)


def _sum_path(s: _Sum) -> str | None:
    return gu.common_path([n for b in s.branches for n in b.region if gu.is_matmul(n)] + list(s.adds))


def _split_across_layers(groups: list[list[tuple[_Sum, bool]]]) -> list[list[tuple[_Sum, bool]]]:
    """Split a group whose sums lie in different layers of the model's layer list: a layer whose only branch is
    attention followed by a layer whose only branch is an FFN (NemotronH's `*` and `-` layers) reads as one
    (attention, FFN) pair, but each is a layer of its own. The layer list is the shallowest container under which
    the sums on either side of a group boundary differ by an index (`model.layers`); a group is split where its
    sums' indices under it change. Sums without a path there (a shared module, no metadata) never split a group;
    branches in an indexed list inside one layer (T5's `block.0.layer.0` / `layer.1`) differ below the container
    and stay together. With one group only (no boundary to read the list from: a pruned hybrid whose layers left
    are a recurrent mixer, an attention and an FFN), the sums inside it name the list, if it is not itself inside
    an indexed entry (T5's `block.0.layer` is the sublayers of one layer)."""
    paths = [[_sum_path(s) for s, _ in g] for g in groups]

    def container(a: str | None, b: str | None) -> tuple | None:
        if not (a and b):
            return None
        pa, pb = a.split("."), b.split(".")
        i = 0
        while i < min(len(pa), len(pb)) and pa[i] == pb[i]:
            i += 1
        return tuple(pa[:i]) if i < min(len(pa), len(pb)) and pa[i].isdigit() and pb[i].isdigit() else None

    containers = {c for a, b in zip(paths, paths[1:]) if (c := container(a[-1], b[0])) is not None}
    if len(groups) == 1:
        containers = {c for a, b in zip(paths[0], paths[0][1:]) if (c := container(a, b)) is not None
                      and not any(p.isdigit() for p in c)}
    if not containers:
        return groups
    layers = min(containers, key=len)
    depth = len(layers)

    def index(p: str | None) -> str | None:
        parts = p.split(".") if p else []
        return parts[depth] if len(parts) > depth and tuple(parts[:depth]) == layers \
            and parts[depth].isdigit() else None

    out = []
    for g, ps in zip(groups, paths):
        run, current = [], None
        for (s, post), p in zip(g, ps):
            idx = index(p)
            if run and idx is not None and current is not None and idx != current:
                out.append(run)
                run = []
            run.append((s, post))
            current = idx if idx is not None else current
        out.append(run)
    return out


def _cross_check(graph: fx.Graph, dyn: set, blocks: list[BlockInfo]) -> list[str]:
    """Disagreements between the blocks found and the other signals the graph offers: the attention ops it
    holds, one attention branch and one FFN per block, and blocks repeating one structure (no block several
    times the size of a typical one). A wrong block count is reported, never silent."""
    notes = []
    ops = [n for n in graph.nodes if n in dyn and n.op == "call_function" and n.target in gu.ATTENTION]
    held = {a.node for b in blocks for a in b.attention if a.node is not None}
    if ops and len(ops) != len(held):
        notes.append(f"the graph holds {len(ops)} attention ops, the {len(blocks)} blocks found hold {len(held)}: "
                     "some attention is outside every block")
    multi = [b.index for b in blocks if len(b.attention) > 1]
    if multi:
        notes.append(f"blocks {multi} hold {max(len(blocks[i].attention) for i in multi)} attention branches "
                     "each: the block boundaries may be wrong (no FFN branch between attention branches)")
    no_ffn = [b.index for b in blocks if b.ffn is None]
    if no_ffn:
        notes.append(f"blocks {no_ffn} have no FFN branch")
    sizes = sorted(len(b.nodes) for b in blocks)
    typical = sizes[len(sizes) // 2]
    big = [b.index for b in blocks if len(blocks) > 2 and len(b.nodes) > 2 * typical]
    if big:
        notes.append(f"blocks {big} are more than twice the size of a typical block ({typical} nodes): they may be "
                     "several blocks read as one")
    return notes


def _norm_output(n: fx.Node, depth: int = 12) -> fx.Node:
    """The output of the norm that follows `n` (post-norm models' last block)."""
    seen, frontier = [], [n]
    for _ in range(depth):
        frontier = [u for m in frontier for u in m.users if u not in seen and not gu.is_matmul(u)]
        seen.extend(frontier)
    for m in seen:
        if m.op == "call_function" and m.target in gu.NORMS:
            return next((u for u in m.users if gu.is_getitem(u) and u.args[1] == 0), m)
    shape = str(gu.val(n).shape)
    same = [m for m in seen if gu.val(m) is not None and str(gu.val(m).shape) == shape]
    return max(same, key=lambda m: list(n.graph.nodes).index(m)) if same else n


def _attention(region: set, masks) -> AttentionInfo:
    paths = gu.common_path([n for n in region if gu.is_matmul(n)])
    op, m, node = attention_site(region, masks)
    return AttentionInfo(paths, op, causal=m.causal, window=m.window, pattern=m.pattern, bias=m.bias,
                         slopes=m.slopes, softcap=m.softcap, reason=m.reason, node=node)
