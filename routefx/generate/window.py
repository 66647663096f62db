"""Decoding with a fixed-shape KV cache (a window that shifts), so that a decode step can be one CUDA graph.

The decode graph (`routefx.generate.step`) takes the past K/V of every cached layer, [B, Hkv, P, Dh], and returns
them with the new position appended, [B, Hkv, P + 1, Dh]; with a growing cache every step has other shapes.
Here P is fixed at W, the most past positions the generation can need (prompt length + max_new_tokens - 2):
the prompt's cache sits at the right end of the window, left-padded with masked zeros, exactly as a
left-padded row of a batch. After each step the window moves one position: the next past is the returned cache
without its first (masked) position, and the attention mask moves with it. Attention only sees keys whose mask
is 1 and every position id is given explicitly, so the step computes what the growing cache computes: the masked
slots contribute nothing, and distances between a query and its keys (causal and sliding-window masks) are
unchanged because the whole window moves together.

Every step then has the same shapes and runs on the same buffers, so on CUDA it is captured once as a CUDA graph
(`torch.cuda.CUDAGraph`) and replayed per token: the graph runs the compiled decode graph (routers, routing
metadata and Triton kernels included: routefx's routed FFN needs no host synchronisation) and moves the window.
The host writes the new token ids into the input buffer and reads the logits buffer; nothing else. One capture
per (batch, window) is kept on the compiled model (at most MAX_GRAPHS, least recently used dropped) and reused by
later `generate` calls of the same shapes; windows are rounded up to a multiple of WINDOW_MULTIPLE positions, so
prompts of nearby lengths share one graph.

Cost of the fixed shape: each step attends over W keys instead of the positions used so far, and copies the
window (both small next to the weights a decode step reads at the lengths generate is used for).
"""
from __future__ import annotations

import torch

from routefx.errors import BackendError, UnsupportedModelError
from routefx.generate.graphs import generation_graphs
from routefx.generate.step import cache_entries, entry_shape, position_dim, prompt_positions

__all__ = ["WindowStepper", "window_length"]


WINDOW_MULTIPLE = 64   # windows are rounded up to this, so that nearby prompt lengths share one captured graph
MAX_GRAPHS = 8         # captured decode graphs kept per compiled model (the least recently used goes first)


def window_length(prompt_len: int, max_new_tokens: int) -> int:
    """Past positions a decode step sees: the prompt plus every generated token but the last two (the first new
    token comes from the prefill, the last one is never fed back), rounded up to a multiple of WINDOW_MULTIPLE
    (the extra positions are masked padding on the left)."""
    need = prompt_len + max(max_new_tokens - 2, 0)
    return -(-need // WINDOW_MULTIPLE) * WINDOW_MULTIPLE


class _Buffers:
    """The step's inputs and outputs, fixed for one (batch, window)."""

    def __init__(self, layout, kept, batch: int, window: int, device, vocab_like: torch.Tensor | None):
        self.window = window
        self.ids = torch.zeros(batch, 1, dtype=torch.long, device=device)
        self.mask = torch.zeros(batch, window + 1, dtype=torch.long, device=device)
        self.pos = torch.zeros(batch, 1, dtype=torch.long, device=device)
        entries = cache_entries(layout, kept)
        self.past = [torch.zeros(shape, dtype=dtype, device=device) for shape, dtype in
                     (entry_shape(layout, i, name, slot, batch, window) for i, name, slot in entries)]
        self.dims = [position_dim(name) for _, name, _ in entries]   # K/V along 2, indexer keys along 1
        self.logits = None if vocab_like is None else torch.empty_like(vocab_like)


class WindowStepper:
    """`Stepper`'s interface (`prefill(ids)` -> [B, V] logits of the last prompt position, `decode(new)` -> [B, V])
    over a window of `window_length(S, max_new_tokens)` past positions (see the module docstring).

    cuda_graph: capture the decode step as a CUDA graph (CUDA only); else the step runs as plain calls (the same
    arithmetic; what the CPU tests check against Hugging Face)."""

    def __init__(self, cm, mask: torch.Tensor, max_new_tokens: int, *, cuda_graph: bool):
        self.cm = cm
        self.g = generation_graphs(cm)
        self.g.layout.refuse_recurrent(cm._model, "static_cache=True (a fixed-shape window that shifts)",
                                       indexer_ok=True)
        if not self.g.layout.positions:
            raise UnsupportedModelError(
                f"static_cache=True (a fixed-shape window that shifts) needs a model that takes position_ids; "
                f"{type(cm._model).__name__}'s forward computes its positions itself (from the cache's length, "
                "which the window keeps fixed, where it has positions). Plain generate (a growing cache) runs it")
        self.mask = mask
        self.device = mask.device
        if cuda_graph and self.device.type != "cuda":
            raise BackendError(f"a CUDA-graph decode step needs the inputs on a CUDA device, found {self.device}")
        self.cuda_graph = cuda_graph
        self.batch, self.prompt_len = mask.shape
        self.window = window_length(self.prompt_len, max_new_tokens)
        self.buf: _Buffers | None = None
        self.graph = None
        self.steps = 0

    # -- the step --------------------------------------------------------------------------------------------
    def _step(self, buf: _Buffers) -> torch.Tensor:
        """One decode step on `buf`, moving the window in place; returns the step's logits [B, V]."""
        names = self.g.past_names
        feeds = {"input_ids": buf.ids, "attention_mask": buf.mask, "position_ids": buf.pos,
                 **dict(zip(names, buf.past))}
        out = self.g.decode_for(feeds).run(**feeds)      # the window's sizes within the graph's guards
        logits = out[0][:, -1]
        for p, new, dim in zip(buf.past, out[1:], buf.dims):
            p.copy_(new.narrow(dim, 1, buf.window))
        buf.mask[:, :-1].copy_(buf.mask[:, 1:].clone())   # the last slot stays 1: the next token
        buf.pos.add_(1)
        if buf.logits is not None:
            buf.logits.copy_(logits)
            return buf.logits
        return logits

    def _captured(self, vocab_like: torch.Tensor):
        """The (buffers, graph) for this batch and window: made once per compiled model, then reused."""
        store = self.cm.__dict__.setdefault("_decode_graphs", {})
        key = (self.batch, self.window, str(self.device), vocab_like.dtype, vocab_like.shape[-1])
        if key in store:
            store[key] = store.pop(key)  # most recently used last
            return store[key]
        while len(store) >= MAX_GRAPHS:
            store.pop(next(iter(store)))
        buf = _Buffers(self.g.layout, self.g.kept, self.batch, self.window, self.device, vocab_like)
        buf.mask[:, -1] = 1  # warm-up on an empty window: each row sees its own token only
        stream = torch.cuda.Stream(self.device)
        stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(stream), torch.no_grad():
            for _ in range(2):  # compiles, autotunes and caches the range tables before the capture
                self._step(buf)
        torch.cuda.current_stream(self.device).wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(graph), torch.no_grad():
                self._step(buf)
        except Exception as e:  # a host synchronisation or an op that cannot be captured
            raise BackendError(f"the decode step could not be captured as a CUDA graph: {type(e).__name__}: "
                               f"{(str(e).strip().splitlines() or [''])[0][:300]}; generate with "
                               "static_cache=False to decode without CUDA graphs") from e
        store[key] = (buf, graph)
        return store[key]

    # -- Stepper's interface ---------------------------------------------------------------------------------
    def prefill(self, ids: torch.Tensor) -> torch.Tensor:
        pos = prompt_positions(self.mask)
        feeds = {"input_ids": ids, "attention_mask": self.mask, "position_ids": pos}
        out = self.g.prefill_for(feeds).run(**feeds)
        logits = out[0][:, -1]
        if self.cuda_graph:
            self.buf, self.graph = self._captured(logits)
        else:
            self.buf = _Buffers(self.g.layout, self.g.kept, self.batch, self.window, self.device, None)
        buf, w, s = self.buf, self.window, self.prompt_len
        for p, kv, dim in zip(buf.past, out[1:], buf.dims):
            p.zero_()
            p.narrow(dim, w - s, s).copy_(kv)
        buf.mask.zero_()
        buf.mask[:, w - s:w].copy_(self.mask)
        buf.mask[:, w] = 1
        buf.pos.copy_(pos[:, -1:] + 1)
        self.steps = 0
        return logits

    def decode(self, new: torch.Tensor) -> torch.Tensor:
        """new: [B, 1] tokens -> logits of the next position [B, V]."""
        if new.shape != (self.batch, 1):
            raise BackendError(f"the windowed decode step takes one token per row, [{self.batch}, 1]; got "
                               f"{list(new.shape)}")
        if self.steps >= self.window - self.prompt_len + 1:  # not reached: the window holds max_new_tokens
            raise BackendError(f"the window of {self.window} past positions is full after {self.steps} steps")
        self.buf.ids.copy_(new)
        self.steps += 1
        if self.graph is not None:
            self.graph.replay()
            return self.buf.logits
        with torch.no_grad():
            return self._step(self.buf)
