"""`ModelIR`: what recognition found in a captured graph. A view, recomputed from the graph, never stored.

Public fields are plain values (`to_dict()` is JSON); the graph anchors a pass needs (`FFNInfo.match`,
`BlockInfo.sums`) are fx nodes of the graph the view was computed from, and are left out of `to_dict()`.
"""
from __future__ import annotations

import dataclasses
import json
from typing import Any

from torch import fx

__all__ = ["ModelIR", "BlockInfo", "FFNInfo", "AttentionInfo", "WeightRef", "DenseFFNMatch"]


@dataclasses.dataclass(frozen=True)
class WeightRef:
    """A weight read by a matrix product, as the [out, in] matrix it acts as.

    `target` is the get_attr target; `transposed` says the stored tensor is [in, out]; `rows` selects output rows
    [start, end) of the [out, in] view (a half of a fused gate-up weight); `index` picks one matrix of a stacked
    [E, ...] tensor first.
    """

    target: str
    transposed: bool = False
    rows: tuple[int, int] | None = None
    index: int | None = None    # a stacked [E, ...] tensor: this weight is its index-th slice along dim 0 (taken
    #                             before the transpose and the rows; experts written as a loop over `w[e]`)


@dataclasses.dataclass(eq=False)
class DenseFFNMatch:
    """Graph anchors of a dense FFN: `inp` -> FFN -> `out`, both [..., d] with the same leading dims.

    Replacing `out` by a function of `inp` (and the weights below) replaces the whole FFN.
    """

    inp: fx.Node
    out: fx.Node
    nodes: frozenset  # every node of the FFN proper (matmuls, activation, views), `inp` excluded, `out` included
    up: WeightRef
    gate: WeightRef | None
    down: WeightRef
    b_up: WeightRef | None
    b_gate: WeightRef | None
    b_down: WeightRef | None


@dataclasses.dataclass(eq=False)
class FFNInfo:
    kind: str                       # "gated" | "mlp" | "moe" | "unknown"
    hidden_size: int
    intermediate_size: int | None   # per expert for MoE
    activation: str | None
    has_bias: bool
    path: str | None
    num_experts: int | None = None
    top_k: int | None = None
    shared_expert_size: int | None = None
    reason: str | None = None       # why kind is "unknown"
    routed: list | None = None      # neuron ranges [[start, end], ...] once the FFN is a routefx routed_ffn
    match: DenseFFNMatch | None = dataclasses.field(default=None, repr=False)

    def to_dict(self) -> dict[str, Any]:
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "match"}
        return d


@dataclasses.dataclass(eq=False)
class AttentionInfo:
    path: str | None
    op: str                         # the attention op's name (e.g. "scaled_dot_product_attention"), or "eager"
    causal: bool = False
    window: int | None = None       # sliding window (keys per query at most)
    pattern: str = "bidirectional"  # "causal" | "bidirectional" | "sliding" | "custom"
    bias: str | None = None         # an additive score bias: "alibi" (slope·(j − i) per head) | "additive"
    slopes: tuple[float, ...] | None = None   # ALiBi slopes per head (one when shared)
    softcap: float | None = None    # scores soft-capped as c·tanh(x / c)
    reason: str | None = None       # what could not be read, and why (pattern "custom", bias "additive")
    node: fx.Node | None = dataclasses.field(default=None, repr=False)

    def to_dict(self) -> dict[str, Any]:
        return {"path": self.path, "op": self.op, "causal": self.causal, "window": self.window,
                "pattern": self.pattern, "bias": self.bias, "slopes": None if self.slopes is None else
                list(self.slopes), "softcap": self.softcap, "reason": self.reason}

    def label(self) -> str:
        """One line: pattern, window, bias and soft-cap ("sliding 4 softcap 50", "causal alibi")."""
        return " ".join([self.pattern] + [str(x) for x in (self.window, self.bias) if x] +
                        ([f"softcap {self.softcap:g}"] if self.softcap else []))


@dataclasses.dataclass(eq=False)
class BlockInfo:
    index: int
    path: str | None
    form: str                       # "pre_norm" | "post_norm" | "parallel" | "sandwich" | another descriptive name
    ffn: FFNInfo | None
    attention: list[AttentionInfo]
    stream_in: fx.Node | None = dataclasses.field(default=None, repr=False)   # residual stream before the block
    stream_out: fx.Node | None = dataclasses.field(default=None, repr=False)  # ... and after it
    nodes: frozenset = dataclasses.field(default=frozenset(), repr=False)       # every node of its branches
    ffn_nodes: frozenset = dataclasses.field(default=frozenset(), repr=False)   # the FFN branch's nodes
    ffn_stream: fx.Node | None = dataclasses.field(default=None, repr=False)    # stream the FFN adds to
    run: int = 0                    # how many earlier blocks run the same FFN module (a looped model's iteration)

    @property
    def key(self) -> str:
        """Stable name of the block's FFN for plans: its module path (with `@run` from a looped model's second run
        of that module on), or its position without metadata."""
        path = self.ffn.path if self.ffn and self.ffn.path else None
        return (path + (f"@{self.run}" if self.run else "")) if path else f"block.{self.index}.ffn"

    def to_dict(self) -> dict[str, Any]:
        return {"index": self.index, "path": self.path, "form": self.form,
                "ffn": self.ffn.to_dict() if self.ffn else None,
                "attention": [a.to_dict() for a in self.attention]}


@dataclasses.dataclass(eq=False)
class ModelIR:
    hidden_size: int
    blocks: list[BlockInfo]
    notes: list[str] = dataclasses.field(default_factory=list)  # where other signals disagree with the blocks

    def to_dict(self) -> dict[str, Any]:
        return {"hidden_size": self.hidden_size, "blocks": [b.to_dict() for b in self.blocks], "notes": self.notes}

    @property
    def causal(self) -> bool:
        return any(a.causal for b in self.blocks for a in b.attention)

    def to_json(self, **kw) -> str:
        return json.dumps(self.to_dict(), **kw)

    @property
    def dense_ffn_blocks(self) -> list[BlockInfo]:
        return [b for b in self.blocks if b.ffn is not None and b.ffn.kind in ("gated", "mlp")]

    def __str__(self) -> str:
        head = ("#", "path", "form", "attention", "ffn", "act", "d", "F", "bias", "experts")
        rows = [head]
        for b in self.blocks:
            f = b.ffn
            experts = ""
            if f and f.kind == "moe":
                experts = f"{f.num_experts} top-{f.top_k}" + (f" +shared {f.shared_expert_size}"
                                                               if f.shared_expert_size else "")
            kind = f.kind if f else "-"
            if f and f.kind == "unknown":
                kind = f"unknown ({f.reason})"
            attn = ",".join(a.label() for a in b.attention) or "-"
            if f and f.routed and f.routed != [[0, f.intermediate_size]]:
                kind += " routed " + " ".join(f"[{s},{e})" for s, e in f.routed)
            rows.append((str(b.index), b.path or "?", b.form, attn, kind, (f.activation or "?") if f else "-",
                         str(f.hidden_size) if f else "-", str(f.intermediate_size or "?") if f else "-",
                         ("yes" if f.has_bias else "no") if f else "-", experts))
        widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
        lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
        lines.insert(1, "  ".join("-" * w for w in widths))
        lines += [f"note: {n}" for n in self.notes]
        return f"ModelIR: {len(self.blocks)} blocks, hidden size {self.hidden_size}\n" + "\n".join(lines)

    __repr__ = __str__
