"""Which blocks a policy's `layers` names: block indices (`routefx.inspect`'s `#` column) or module paths.

A path names every block that lies in that module: `"model.layers.3"` is decoder layer 3 whether the model reads
as one block per layer or as several (a hybrid layer whose token mixer is not attention-like reads as one block
per residual branch: Falcon-H1's layer is two blocks, both with path `model.layers.3`). Policies that rewrite FFNs
also take an FFN's own module (`model.layers.3.mlp`). A path that is only part of a block (a block's attention or
FFN module for PruneLayers, a layer of a block that spans several modules) is refused with the block to name.
"""
from __future__ import annotations

from typing import Callable, Sequence

from routefx.errors import PolicyError
from routefx.ir.model_ir import BlockInfo, ModelIR

__all__ = ["resolve_blocks"]


def resolve_blocks(who: str, refs: Sequence[int | str], ir: ModelIR,
                   keep: Callable[[BlockInfo], bool] | None = None, by_ffn: bool = False) -> list[int]:
    """The block indices `refs` name, sorted. An int is a block index; a string a module path (every block whose
    path is that module or lies under it; with `by_ffn`, for policies that rewrite FFNs, also the block whose FFN
    module is that path or lies under it, `model.layers.3.mlp`). `keep`: for a path, only the blocks it accepts (a
    policy that rewrites one kind of FFN takes the blocks of a layer that have one); an index is returned as given,
    for the caller to check. Raises `PolicyError` for an index past the last block, a path no block lies in, or a
    block named twice."""
    n = len(ir.blocks)
    seen: dict[int, int | str] = {}
    for ref in refs:
        if isinstance(ref, int):
            if ref >= n:
                raise PolicyError(f"{who}: block {ref} does not exist; the model has {n} blocks (0..{n - 1})")
            found = [ref]
        else:
            under = [b for b in ir.blocks if _within(b.path, ref) or (by_ffn and b.ffn and _within(b.ffn.path, ref))]
            if not under:
                raise PolicyError(_no_block(who, ref, ir))
            found = [b.index for b in under if keep is None or keep(b)]
            if not found:
                raise PolicyError(f"{who}: module {ref!r} holds block(s) {[b.index for b in under]}, none of which "
                                  f"{who} rewrites (FFN kinds: "
                                  f"{[b.ffn.kind if b.ffn else 'none' for b in under]})")
        for i in found:
            if i in seen:
                raise PolicyError(f"{who}: block {i} is named twice ({seen[i]!r} and {ref!r})")
            seen[i] = ref
    return sorted(seen)


def _within(path: str | None, module: str | None) -> bool:
    """Is `path` the module `module` or inside it?"""
    return bool(path) and bool(module) and (path == module or path.startswith(module + "."))


def _no_block(who: str, ref: str, ir: ModelIR) -> str:
    part = [b for b in ir.blocks if (b.ffn and _within(ref, b.ffn.path))
            or any(_within(ref, a.path) for a in b.attention)] \
        or [b for b in ir.blocks if _within(ref, b.path)]  # the blocks ref lies inside
    if part:
        b = part[0]
        return (f"{who}: module {ref!r} is part of block {b.index} (path {b.path!r}), not a whole block; {who} takes "
                f"whole blocks: name block {b.index}")
    paths = list(dict.fromkeys(b.path or f"<block {b.index}>" for b in ir.blocks))
    shown = ", ".join(repr(p) for p in paths[:6]) + (f", ... ({len(paths)} in all)" if len(paths) > 6 else "")
    return f"{who}: no block lies in module {ref!r}; the blocks' module paths are {shown}"
