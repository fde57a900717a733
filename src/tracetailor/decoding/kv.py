"""A batch of sequences held in one model's KV cache, with rows that come and go.

`KVBatch` owns a transformers `DynamicCache`, a 2-D attention mask and each row's
count of real tokens. Rows are left-padded to a common cache length; the mask hides
the padding and explicit position ids keep each row's positions its own, so a row
computes the same thing whatever batch it sits in. Rows leave (`select`) and join
(`extend`) between steps; columns that are padding for every row are trimmed.
`rollback` forgets each row's last few tokens (drafted decoding) and `pack`s the rows
so that no holes remain: the cache stays as wide as its longest row. What is left is
the rectangle's own waste, the left padding of rows shorter than the longest.

It knows nothing of sampling, of the other model, or of text.
"""

from __future__ import annotations

import inspect

import torch
import torch.nn.functional as F
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer


class SlackLayer(DynamicLayer):
    """A DynamicLayer that appends into spare capacity instead of re-copying the whole
    cache every step (DynamicLayer's torch.cat makes decoding quadratic in length).
    `keys`/`values` stay ordinary tensors, views of the buffers; a view that starts further in
    (leading columns trimmed) or ends earlier (columns rolled back) still appends in place.
    Code that replaces them otherwise (row selection, merging) makes the next append reallocate."""

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        old = self.keys.shape[-2] if self.keys.dim() == 4 else 0
        new = old + key_states.shape[-2]
        start = self._start_in_buffer() if old > 0 else None
        if start is None or start + new > self._kbuf.shape[-2]:
            capacity = new + max(64, new // 4)
            limit = getattr(self, "limit", None)  # the run's longest row (`RectangleLayout.reserve`): no slack past it
            if limit and new <= limit:  # (a bridged teacher may spell a row in more tokens: then slack as usual)
                capacity = min(capacity, limit)
            shape = (*key_states.shape[:2], capacity, key_states.shape[-1])
            kbuf = key_states.new_empty(shape)
            vbuf = value_states.new_empty(shape[:-1] + (value_states.shape[-1],))
            if old:
                kbuf[:, :, :old] = self.keys
                vbuf[:, :, :old] = self.values
            self._kbuf, self._vbuf, start = kbuf, vbuf, 0
        self._kbuf[:, :, start + old:start + new] = key_states
        self._vbuf[:, :, start + old:start + new] = value_states
        self.keys, self.values = self._kbuf[:, :, start:start + new], self._vbuf[:, :, start:start + new]
        return self.keys, self.values

    def _start_in_buffer(self) -> int | None:
        """The column of the buffers where `keys`/`values` start, or None when they are not views of them."""
        starts = set()
        for view, buf in ((self.keys, getattr(self, "_kbuf", None)), (self.values, getattr(self, "_vbuf", None))):
            if (buf is None or view.shape[:2] != buf.shape[:2] or view.stride() != buf.stride()
                    or view.untyped_storage().data_ptr() != buf.untyped_storage().data_ptr()):
                return None
            offset, column = view.data_ptr() - buf.data_ptr(), buf.stride(2) * buf.element_size()
            if offset < 0 or offset % column:
                return None
            starts.add(offset // column)
        return starts.pop() if len(starts) == 1 else None


def _new_cache(model, limit: int | None = None) -> DynamicCache:
    cache = DynamicCache(config=model.config)
    # only plain full-attention layers get spare capacity; sliding or other kinds keep their own logic
    cache.layers = [SlackLayer() if type(layer) is DynamicLayer else layer for layer in cache.layers]
    for layer in cache.layers:
        if isinstance(layer, SlackLayer):
            layer.limit = limit
    return cache


class RectangleLayout:
    """The engine's handle on the rectangle: `reserve(columns)` bounds each layer's spare append capacity by the
    run's longest row (the most columns a row can hold), so no buffer is allocated past what the run can use."""

    def __init__(self):
        self.columns: int | None = None

    def reserve(self, columns: int, width: int = 0) -> None:
        self.columns = columns

    def prefill(self, model, seqs: list[list[int]]) -> tuple["KVBatch", torch.Tensor]:
        return KVBatch.prefill(model, seqs, limit=self.columns)


def _cache_kwarg(model) -> str:
    """transformers renamed `past_key_values` to `cache` in 5.2x; support both."""
    params = inspect.signature(model.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def _layers(cache: DynamicCache):
    return [layer for layer in cache.layers if getattr(layer, "keys", None) is not None and layer.keys.numel() > 0]


def left_padded(seqs: list[list[int]], least: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Token lists as one left-padded block on the host: (ids [B, width] long, mask [B, width] long, 1 = real),
    at least `least` columns wide."""
    width = max([least] + [len(s) for s in seqs])
    ids = torch.zeros(len(seqs), width, dtype=torch.long)
    mask = torch.zeros(len(seqs), width, dtype=torch.long)
    for i, s in enumerate(seqs):
        if s:
            ids[i, width - len(s):] = torch.tensor(s, dtype=torch.long)
            mask[i, width - len(s):] = 1
    return ids, mask


class KVBatch:
    def __init__(self, model, cache: DynamicCache, mask: torch.Tensor, lengths: torch.Tensor):
        self.model = model
        self.cache = cache
        self.mask = mask  # [B, L] long: 1 real token, 0 padding
        self.lengths = lengths  # [B] long: real tokens per row (= next position id)
        self.padded = bool((mask == 0).any())
        self._kwarg = _cache_kwarg(model)
        # drafted decoding reads guesses past a row's budget (then rolls them back, unused); at the end of the
        # context their positions would fall off a table of absolute positions (GPT-2), so they are clamped.
        # A kept token never sits there: the budgets keep every row within the context.
        self.max_position = getattr(getattr(model, "config", None), "max_position_embeddings", None)

    @property
    def rows(self) -> int:
        return self.mask.shape[0]

    @classmethod
    @torch.inference_mode()
    def prefill(cls, model, seqs: list[list[int]], limit: int | None = None) -> tuple["KVBatch", torch.Tensor]:
        """Run the prompts through `model`; return the batch and each row's next-token logits. `limit`: the most
        columns a row can take in this run (spare capacity stops there)."""
        device = model.device
        ids, mask = left_padded(seqs, least=1)  # an empty sequence is all padding (its logits mean nothing)
        ids, mask = ids.to(device), mask.to(device)
        batch = cls(model, _new_cache(model, limit), mask[:, :0], torch.zeros(len(seqs), dtype=torch.long,
                                                                              device=device))
        logits = batch._forward(ids, mask)
        return batch, logits

    def _forward(self, ids: torch.Tensor, new_mask: torch.Tensor, every: bool = False) -> torch.Tensor:
        """Append `ids` [B, m] (left-padded per `new_mask`) to every row; return last logits [B, V]
        (`every`: the logits at every new column, [B, m, V])."""
        m = ids.shape[1]
        # position of each new token = real tokens before it in its row; padding gets 0
        positions = self.lengths.unsqueeze(1) + new_mask.cumsum(1) - 1
        positions = positions.clamp_min(0) * new_mask
        if isinstance(self.max_position, int) and self.max_position > 0:
            positions = positions.clamp_max(self.max_position - 1)
        self.mask = torch.cat([self.mask, new_mask], dim=1)
        self.lengths = self.lengths + new_mask.sum(1)
        if m > 1 and not self.padded:
            self.padded = bool((new_mask == 0).any())
        out = self.model(
            input_ids=ids,
            attention_mask=self.mask if self.padded else None,
            position_ids=positions,
            use_cache=True,
            logits_to_keep=0 if every else 1,
            **{self._kwarg: self.cache},
        )
        return out.logits if every else out.logits[:, -1, :]

    @torch.inference_mode()
    def feed(self, tokens: torch.Tensor) -> torch.Tensor:
        """One token per row ([B] long); returns next-token logits [B, V]."""
        ids = tokens.to(self.mask.device).unsqueeze(1)
        return self._forward(ids, torch.ones_like(ids))

    @torch.inference_mode()
    def feed_chunks(self, chunks: list[list[int]], every: bool = False) -> torch.Tensor:
        """A variable number of tokens per row (each >= 1), left-padded into one call
        (`every`: logits at every column, [B, width, V]; row i's chunk ends at the last column)."""
        ids, mask = left_padded(chunks)
        return self._forward(ids.to(self.mask.device), mask.to(self.mask.device), every)

    @torch.inference_mode()
    def feed_many(self, ids: torch.Tensor) -> torch.Tensor:
        """The same number of tokens for every row ([B, m] long); returns the logits at each, [B, m, V]."""
        ids = ids.to(self.mask.device)
        return self._forward(ids, torch.ones_like(ids), every=True)

    def rollback(self, drop: torch.Tensor) -> None:
        """Forget the last `drop[i]` real tokens of row i ([B] long, each at most what the last feed appended),
        then `pack` the rows: what is fed next continues each row's positions (they come from `lengths`)."""
        if any(not isinstance(layer, SlackLayer) for layer in self.cache.layers):
            raise RuntimeError("rolling back needs plain full-attention cache layers; this model has others "
                               "(e.g. sliding-window): decode it with --draft-tokens 0")
        drop = drop.to(self.mask.device)
        if bool((drop > 0).any()):
            real_from_right = self.mask.flip(1).cumsum(1).flip(1)  # real tokens at or right of each column
            self.mask = self.mask * (real_from_right > drop.unsqueeze(1)).long()
            self.lengths = self.lengths - drop
        self.pack()

    @torch.inference_mode()
    def pack(self) -> None:
        """Make each row's real tokens fill its rightmost `lengths[i]` columns, so that the cache is no wider
        than its longest row: a real token left of that span moves into a hole inside it.

        Attention does not depend on the order of cached columns (each key carries its own position, rotated
        in when it was computed, and the mask marks what is real); only tokens fed in one call need their
        columns in order, and those are appended after all others. So a move costs one column per hole."""
        width = self.mask.shape[1]
        target = torch.arange(width, device=self.mask.device).unsqueeze(0) >= (width - self.lengths).unsqueeze(1)
        real = self.mask.bool()
        holes = target & ~real
        if bool(holes.any()):
            # per row there are as many strays as holes, and nonzero() lists them row by row: they pair up
            dst_rows, dst_cols = holes.nonzero(as_tuple=True)
            src_rows, src_cols = (real & ~target).nonzero(as_tuple=True)
            for layer in _layers(self.cache):
                dev = layer.keys.device
                dr, dc, sr, sc = (t.to(dev) for t in (dst_rows, dst_cols, src_rows, src_cols))
                layer.keys[dr, :, dc] = layer.keys[sr, :, sc]
                layer.values[dr, :, dc] = layer.values[sr, :, sc]
        self.mask = target.long()
        tail = int((self.mask.flip(1).cumsum(1) == 0).all(0).sum()) if self.rows else 0
        if tail:  # rows all shorter than the columns (rolled back everywhere): a narrower view, same buffer
            keep = width - tail
            self.mask = self.mask[:, :keep]
            for layer in _layers(self.cache):
                layer.keys, layer.values = layer.keys[:, :, :keep], layer.values[:, :, :keep]
        self._trim()

    def allocated_positions(self) -> int:
        """Cache positions held per model layer (rows x columns), real or not: the numerator of KV waste."""
        return self.mask.numel()

    def reserved_positions(self) -> int:
        """Positions reserved per layer: the rectangle's, as held (its spare append capacity is not counted)."""
        return self.allocated_positions()

    def select(self, rows: torch.Tensor) -> None:
        """Keep `rows` (indices, may repeat) in that order; trim all-padding columns."""
        rows = rows.to(self.mask.device)
        self.mask = self.mask[rows]
        self.lengths = self.lengths[rows]
        for layer in _layers(self.cache):
            # under a device map (accelerate) each layer's cache lives on that layer's GPU
            at = rows if layer.keys.device == rows.device else rows.to(layer.keys.device)
            layer.keys = layer.keys[at]
            layer.values = layer.values[at]
        self._trim()

    def _trim(self) -> None:
        if self.mask.shape[0] == 0:
            return
        lead = int((self.mask.cumsum(1) == 0).all(0).sum())
        if lead:
            self.mask = self.mask[:, lead:]
            for layer in _layers(self.cache):
                layer.keys = layer.keys[:, :, lead:]
                layer.values = layer.values[:, :, lead:]
        self.padded = bool((self.mask == 0).any())

    def extend(self, other: "KVBatch") -> None:
        """Append `other`'s rows after ours, left-padding the shorter cache."""
        width = max(self.mask.shape[1], other.mask.shape[1])

        def pad(t: torch.Tensor, dim_from_end: int) -> torch.Tensor:
            missing = width - t.shape[-dim_from_end]
            if missing == 0:
                return t
            spec = [0, 0] * (dim_from_end - 1) + [missing, 0]
            return F.pad(t, spec)

        ours, theirs = _layers(self.cache), _layers(other.cache)
        if len(ours) != len(theirs):
            raise RuntimeError("cannot merge caches with different layer layouts")
        for a, b in zip(ours, theirs):
            a.keys = torch.cat([pad(a.keys, 2), pad(b.keys, 2)], dim=0)
            a.values = torch.cat([pad(a.values, 2), pad(b.values, 2)], dim=0)
        self.mask = torch.cat([pad(self.mask, 1), pad(other.mask, 1)], dim=0)
        self.lengths = torch.cat([self.lengths, other.lengths])
        self.padded = bool((self.mask == 0).any())
