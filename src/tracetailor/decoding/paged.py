"""A KV cache that holds only real tokens: `PagedKVBatch`, the `--kv-cache paged` layout.

`KVBatch` (kv.py) keeps each model layer's keys and values as one rectangle, rows
left-padded to the longest, so a short row beside a long one holds the long one's
width in padding. Here every layer keeps a pool of token slots, `[slots, heads,
head_dim]`, and the batch keeps a table of which slot holds each row's t-th token.
A row holds exactly its own tokens; rows that repeat a prompt (a prompt's samples)
share the prompt's slots; a token that leaves (rollback, a finished row) frees its
slot for the next one. Slot 0 is a zeroed dummy that padding points at.

For a forward pass the batch writes each new token's keys and values into fresh
slots and hands attention a left-padded view gathered from the pool, one layer at a
time: the view has the rectangle's shape, so the model, its mask and its position
ids are exactly `KVBatch`'s, but it lives only while its layer runs. The price is
one copy of the cache per layer per pass (a gather), which attention reads anyway;
the gain is that the memory held between passes is the real tokens, so a device
holds a bigger batch when lengths are mixed.

The same interface as `KVBatch`: prefill, feed, feed_chunks, feed_many, rollback,
pack, select, extend, rows, lengths, allocated_positions.
"""

from __future__ import annotations

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

from ..errors import UserError
from .kv import _cache_kwarg, left_padded


class PagedCacheError(UserError, RuntimeError):
    pass


class _Pass:
    """What every layer of one forward pass needs: where the new tokens go and what attention reads.
    Index tensors are kept per device (a device-mapped model has layers on several GPUs)."""

    def __init__(self, width: int, write_slots, src_rows, src_cols, gather):
        self.width = width  # cached columns before this pass (the view's past part)
        self._on = {gather.device: (write_slots, src_rows, src_cols, gather)}

    def on(self, device):
        if device not in self._on:
            self._on[device] = tuple(t.to(device) for t in next(iter(self._on.values())))
        return self._on[device]


class _Slots:
    """The slot allocator shared by one model's layers: capacity and the stack of free slots."""

    def __init__(self, device, capacity: int = 256, limit: int | None = None):
        self.limit = limit  # the most slots the run can fill (`PagedLayout.reserve`): no slack past it
        self.capacity = max(2, min(capacity, limit or capacity))
        self.free = torch.arange(self.capacity - 1, 0, -1, device=device)  # slot 0 is the dummy
        self.pass_: _Pass | None = None

    def take(self, n: int) -> torch.Tensor:
        if n > self.free.numel():
            needed = self.capacity + n - self.free.numel()
            grown = max(needed, self.capacity * 9 // 8 + 64)  # slack <= 1/8
            if self.limit and needed <= self.limit:
                grown = min(grown, self.limit)
            new = torch.arange(grown - 1, self.capacity - 1, -1, device=self.free.device)
            self.free = torch.cat([new, self.free])  # fresh slots at the bottom: freed ones are reused first
            self.capacity = grown
        taken = self.free[self.free.numel() - n:]
        self.free = self.free[: self.free.numel() - n]
        return taken.flip(0)

    def give_back(self, slots: torch.Tensor) -> None:
        if slots.numel():
            self.free = torch.cat([self.free, slots.to(self.free.device)])


class PagedLayer(DynamicLayer):
    """One full-attention layer's pools. `update` writes the pass's new tokens and returns the gathered view."""

    def __init__(self, slots: _Slots):
        super().__init__()
        self.slots = slots
        self.pool_k: torch.Tensor | None = None
        self.pool_v: torch.Tensor | None = None

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.device = key_states.device
        heads, k_dim, v_dim = key_states.shape[1], key_states.shape[-1], value_states.shape[-1]
        self.pool_k = key_states.new_zeros(self.slots.capacity, heads, k_dim)
        self.pool_v = value_states.new_zeros(self.slots.capacity, heads, v_dim)
        self.keys = self.values = key_states.new_empty(0)
        self.is_initialized = True

    def grow(self) -> None:
        """Make the pools as large as the allocator's capacity (it grows when it runs out of free slots)."""
        have = self.pool_k.shape[0]
        if have < self.slots.capacity:
            extra = self.slots.capacity - have
            self.pool_k = torch.cat([self.pool_k, self.pool_k.new_zeros(extra, *self.pool_k.shape[1:])])
            self.pool_v = torch.cat([self.pool_v, self.pool_v.new_zeros(extra, *self.pool_v.shape[1:])])

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        self.grow()
        write, rows, cols, gather = self.slots.pass_.on(key_states.device)
        self.pool_k[write] = key_states[rows, :, cols]
        self.pool_v[write] = value_states[rows, :, cols]
        b, w = gather.shape
        flat = gather.reshape(-1)
        keys = self.pool_k.index_select(0, flat).view(b, w, *self.pool_k.shape[1:]).transpose(1, 2)
        values = self.pool_v.index_select(0, flat).view(b, w, *self.pool_v.shape[1:]).transpose(1, 2)
        return keys, values

    def get_seq_length(self) -> int:
        return self.slots.pass_.width if self.slots.pass_ is not None else 0

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.get_seq_length() + query_length, 0

    def copy_slots(self, other: "PagedLayer", src: torch.Tensor, dst: torch.Tensor) -> None:
        self.grow()
        self.pool_k[dst.to(self.pool_k.device)] = other.pool_k[src.to(other.pool_k.device)].to(self.pool_k.device)
        self.pool_v[dst.to(self.pool_v.device)] = other.pool_v[src.to(other.pool_v.device)].to(self.pool_v.device)

    def crop(self, tokens_to_remove: int) -> None:
        raise PagedCacheError("a paged cache rolls back per row (PagedKVBatch.rollback), not by crop")


def _new_cache(model, slots: _Slots) -> DynamicCache:
    cache = DynamicCache(config=model.config)
    if any(type(layer) is not DynamicLayer for layer in cache.layers):
        raise PagedCacheError(f"--kv-cache paged needs plain full-attention layers; {type(model).__name__} has "
                              "others (e.g. sliding-window): use --kv-cache rectangle")
    cache.layers = [PagedLayer(slots) for _ in cache.layers]
    return cache


class PagedLayout:
    """The engine's handle on the paged layout: `reserve(columns)` bounds each pool by what the run can fill
    (`slots` rows of at most `columns` tokens, and the dummy slot)."""

    def __init__(self, slots: int):
        self.slots = slots
        self.limit: int | None = None

    def reserve(self, columns: int, width: int = 0) -> None:
        self.limit = self.slots * columns + 1

    def prefill(self, model, seqs: list[list[int]]) -> tuple["PagedKVBatch", torch.Tensor]:
        return PagedKVBatch.prefill(model, seqs, limit=self.limit)


class PagedKVBatch:
    def __init__(self, model, rows: int, device, limit: int | None = None):
        self.model = model
        self.slots = _Slots(device, limit=limit)
        self.cache = _new_cache(model, self.slots)
        self.table = torch.zeros(rows, 64, dtype=torch.long, device=device)  # [B, columns]: slot of token t
        self.lengths = torch.zeros(rows, dtype=torch.long, device=device)  # real tokens per row
        # the same counts on the host: the shapes of a pass are decided there, without waiting on the device
        self.host_lengths = torch.zeros(rows, dtype=torch.long)
        self._kwarg = _cache_kwarg(model)
        self.max_position = getattr(getattr(model, "config", None), "max_position_embeddings", None)

    @property
    def rows(self) -> int:
        return self.lengths.shape[0]

    @classmethod
    @torch.inference_mode()
    def prefill(cls, model, seqs: list[list[int]], limit: int | None = None) -> tuple["PagedKVBatch", torch.Tensor]:
        """Run the prompts through `model`; return the batch and each row's next-token logits. `limit`: the most
        slots the run can fill (the pool's growth stops there)."""
        batch = cls(model, len(seqs), model.device, limit=limit)
        ids, mask = left_padded(seqs, least=1)  # an empty sequence is all padding (its logits mean nothing)
        return batch, batch._forward(ids.to(model.device), mask)

    def _forward(self, ids: torch.Tensor, new_mask: torch.Tensor, every: bool = False) -> torch.Tensor:
        """Append `ids` [B, m] (on the device; left-padded per `new_mask`, [B, m] on the host) to every row;
        return last logits [B, V] (`every`: the logits at every new column, [B, m, V])."""
        dev = self.lengths.device
        b = ids.shape[0]
        old = self.host_lengths
        rank = new_mask.cumsum(1)  # 1-based rank of each real new token in its row
        new_lengths = old + new_mask.sum(1)
        longest = int(new_lengths.max()) if b else 0
        if longest > self.table.shape[1]:
            more = max(longest - self.table.shape[1], self.table.shape[1] // 2)
            self.table = torch.cat([self.table, self.table.new_zeros(b, more)], 1)
        rows, cols = new_mask.nonzero(as_tuple=True)  # row by row, in column order
        token_of_new = old.unsqueeze(1) + rank - 1  # each new column's token index in its row
        width = int(old.max()) if b else 0  # cached columns of the view: the longest row's tokens
        padded = bool((old != width).any()) or not bool(new_mask.bool().all())
        positions = token_of_new.clamp_min(0) * new_mask
        if isinstance(self.max_position, int) and self.max_position > 0:
            positions = positions.clamp_max(self.max_position - 1)
        rows, cols, at, token_of_new, mask, positions, lengths = (
            t.to(dev, non_blocking=True) for t in (rows, cols, token_of_new[rows, cols], token_of_new, new_mask,
                                                   positions, old))
        slots = self.slots.take(rows.numel())
        self.table[rows, at] = slots
        # the view attention reads: each row's old tokens right-aligned in `width` columns, then the new columns
        past = torch.arange(width, device=dev).unsqueeze(0) - (width - lengths).unsqueeze(1)  # token index
        real = torch.cat([past >= 0, mask.bool()], 1)
        token = torch.cat([past, token_of_new], 1).clamp_min(0)
        gather = torch.where(real, self.table.gather(1, token), 0)
        self.slots.pass_ = _Pass(width, slots, rows, cols, gather)
        try:
            out = self.model(
                input_ids=ids,
                attention_mask=real.long() if padded else None,
                position_ids=positions,
                use_cache=True,
                logits_to_keep=0 if every else 1,
                **{self._kwarg: self.cache},
            )
        finally:
            self.slots.pass_ = None
        self.host_lengths = new_lengths
        self.lengths = new_lengths.to(dev, non_blocking=True)
        return out.logits if every else out.logits[:, -1, :]

    @torch.inference_mode()
    def feed(self, tokens: torch.Tensor) -> torch.Tensor:
        """One token per row ([B] long); returns next-token logits [B, V]."""
        ids = tokens.to(self.lengths.device).unsqueeze(1)
        return self._forward(ids, torch.ones(ids.shape, dtype=torch.long))

    @torch.inference_mode()
    def feed_chunks(self, chunks: list[list[int]], every: bool = False) -> torch.Tensor:
        """A variable number of tokens per row (each >= 1), left-padded into one call
        (`every`: logits at every column, [B, width, V]; row i's chunk ends at the last column)."""
        ids, mask = left_padded(chunks)
        return self._forward(ids.to(self.lengths.device), mask, every)

    @torch.inference_mode()
    def feed_many(self, ids: torch.Tensor) -> torch.Tensor:
        """The same number of tokens for every row ([B, m] long); returns the logits at each, [B, m, V]."""
        return self._forward(ids.to(self.lengths.device), torch.ones(ids.shape, dtype=torch.long), every=True)

    @torch.inference_mode()
    def rollback(self, drop: torch.Tensor) -> None:
        """Forget the last `drop[i]` tokens of row i ([B] long, each at most what the last feed appended: those
        slots are the row's own, never shared) and free their slots."""
        drop = drop.cpu()
        if bool((drop > 0).any()):
            kept = self.host_lengths - drop
            col = torch.arange(int(self.host_lengths.max()))
            rows, cols = ((col >= kept.unsqueeze(1)) & (col < self.host_lengths.unsqueeze(1))).nonzero(as_tuple=True)
            rows, cols = rows.to(self.table.device), cols.to(self.table.device)
            self.slots.give_back(self.table[rows, cols])
            self.table[rows, cols] = 0
            self.host_lengths = kept
            self.lengths = kept.to(self.lengths.device)

    def pack(self) -> None:
        """Nothing to pack: rows hold no holes."""

    def _held(self) -> torch.Tensor:
        """The slots some row refers to (shared prompt slots once)."""
        col = torch.arange(self.table.shape[1], device=self.table.device).unsqueeze(0)
        return self.table[col < self.lengths.unsqueeze(1)].unique()

    @torch.inference_mode()
    def select(self, rows: torch.Tensor) -> None:
        """Keep `rows` (indices, may repeat: repeated rows share their slots) in that order; free the slots
        no kept row refers to."""
        self.host_lengths = self.host_lengths[rows.cpu()]
        rows = rows.to(self.lengths.device)
        self.table = self.table[rows]
        self.lengths = self.lengths[rows]
        longest = int(self.host_lengths.max()) if self.rows else 0
        if longest < self.table.shape[1] // 2:
            self.table = self.table[:, : max(64, longest)].clone()
        used = torch.zeros(self.slots.capacity, dtype=torch.bool, device=self.table.device)
        used[0] = True
        used[self._held()] = True
        used[self.slots.free.to(used.device)] = True
        self.slots.give_back((~used).nonzero().flatten())

    @torch.inference_mode()
    def extend(self, other: "PagedKVBatch") -> None:
        """Append `other`'s rows after ours, copying the tokens they hold into our pools."""
        held = other._held()
        mine = self.slots.take(held.numel())
        ours, theirs = self.cache.layers, other.cache.layers
        if len(ours) != len(theirs):
            raise RuntimeError("cannot merge caches with different layer layouts")
        for a, t in zip(ours, theirs):
            if t.pool_k is not None:
                a.copy_slots(t, held, mine)
        remap = torch.zeros(other.slots.capacity, dtype=torch.long, device=other.table.device)
        remap[held] = mine.to(remap.device)
        table = remap[other.table].to(self.table.device)
        width = max(self.table.shape[1], table.shape[1])
        pad = lambda t: torch.cat([t, t.new_zeros(t.shape[0], width - t.shape[1])], 1)  # noqa: E731
        self.table = torch.cat([pad(self.table), pad(table)])
        self.lengths = torch.cat([self.lengths, other.lengths.to(self.lengths.device)])
        self.host_lengths = torch.cat([self.host_lengths, other.host_lengths])

    def allocated_positions(self) -> int:
        """Slots held by the rows (a prompt shared by its samples counts once): the numerator of KV waste."""
        return int(self._held().numel())

    def reserved_positions(self) -> int:
        """Slots the pools hold, free or not (what the device memory holds for this cache per layer)."""
        return self.slots.capacity - 1
