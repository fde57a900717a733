"""A KV cache of fixed shapes whose decode step is captured: `StaticKVBatch`, the `--kv-cache static` layout.

`KVBatch` (kv.py) grows its cache a column per step and its batch a row per admission, so every
step has new shapes: nothing can be captured, and a small model's step is mostly per-layer host
overhead (Python, dispatch, kernel launches), not the bytes it reads. Here each model gets one
store for the engine's life: per layer, keys and values of shape `[slots, heads, capacity, dim]`,
where `slots` is the engine's batch size and `capacity` a bucket (a power of two, at least 256)
that grows only when a row would outgrow it. Every decode step then has the same shapes, so it is
compiled once per (tokens per row, capacity) with `torch.compile`; on CUDA in mode
"reduce-overhead", which replays it as a CUDA graph.

Layout. A row sits in a slot, its t-th token at column t: the column is the position, so a row
never moves. A step of q tokens writes row i's tokens at columns `lengths[i] .. lengths[i]+q-1`
and each query attends to the columns at or left of its own (a 4-D mask built from those
columns). Rolling back is `lengths -= drop`: the columns past a row's length are never read
before they are written again. A free slot is fed a dummy token at columns 0.. (finite values,
never read). Rows that join are prefilled as usual (a `KVBatch`, eager: prompts vary in length)
and copied into free slots; a repeated row (a prompt's samples) is a copy of its slot.

What is fed with per-row lengths that vary (`feed_chunks`: a bridged pair's multi-token
spellings) runs the model eager on the same store: rare, and correct, only not captured.

The same interface as `KVBatch`: prefill (through `StaticLayout`), feed, feed_chunks, feed_many,
rollback, pack, select, extend, rows, lengths, allocated_positions, reserved_positions.
"""

from __future__ import annotations

import torch
from transformers.cache_utils import Cache, CacheLayerMixin

from ..errors import UserError
from .kv import KVBatch, _cache_kwarg, _layers, left_padded

MIN_CAPACITY = 256


class StaticCacheError(UserError, RuntimeError):
    pass


def _bucket(columns: int) -> int:
    capacity = MIN_CAPACITY
    while capacity < columns:
        capacity *= 2
    return capacity


class _SlotLayer(CacheLayerMixin):
    """One layer's keys and values, `[slots, heads, capacity, dim]`; a pass writes its new tokens at the
    columns the store names (`store.write_cols`, one per row and new token) and attention reads all."""

    is_compileable = True
    is_sliding = False

    def __init__(self, store: "_Store"):
        super().__init__()
        self._store = store

    def lazy_initialization(self, key_states, value_states) -> None:  # the store allocates
        raise RuntimeError("a static cache layer is allocated by its store, never lazily")

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        rows, cols = self._store.row_index, self._store.write_cols  # [S, 1], [S, q]
        # keys[rows, :, cols] is [S, q, heads, dim]; the new states are [S, heads, q, dim]
        self.keys[rows, :, cols] = key_states.transpose(1, 2).to(self.keys.dtype)
        self.values[rows, :, cols] = value_states.transpose(1, 2).to(self.values.dtype)
        return self.keys, self.values

    def get_mask_sizes(self, *args, **kwargs) -> tuple[int, int]:
        return self.keys.shape[2], 0

    def get_seq_length(self) -> int:
        return 0  # positions and the mask are always given: nothing reads this

    def get_max_length(self) -> int:
        return self.keys.shape[2]

    def get_max_cache_shape(self) -> int:
        return self.keys.shape[2]


class _Store:
    """One model's slots for the engine's life: the buffers, the cache object over them and the step."""

    def __init__(self, model, layout: "StaticLayout"):
        _check_model(model)
        self.model = model
        self.layout = layout
        self.slots = slots = layout.slots
        self.compiled = compiled = layout.compiled
        self.device = model.device
        self.capacity = 0
        self.cache: Cache | None = None
        self.row_index = torch.arange(slots, device=self.device).unsqueeze(1)
        self.write_cols: torch.Tensor | None = None  # [S, q]: where each pass writes, set by `forward`
        self.columns: torch.Tensor | None = None  # arange(capacity), for the masks
        self.owner: "StaticKVBatch | None" = None
        self._kwarg = _cache_kwarg(model)
        self._float_mask = getattr(model.config, "_attn_implementation", "sdpa") == "eager"
        self.max_position = getattr(model.config, "max_position_embeddings", None)
        self._step = model
        if compiled:
            _raise_recompile_limit()
            mode = "reduce-overhead" if self.device.type == "cuda" else None
            self._step = torch.compile(model, dynamic=False, mode=mode)

    def ensure(self, columns: int, like: list) -> None:
        """Make room for `columns` columns per slot (buffers shaped after the prefill cache layers `like`), and
        for the layout's reservation: the run's longest row, so that a run compiles each shape once."""
        if columns <= self.capacity:
            return
        capacity = _bucket(max(columns, self.layout.reserved))
        if self.cache is None:
            self.cache = Cache(layers=[_SlotLayer(self) for _ in like])
        refs = like if not self.cache.layers[0].is_initialized else list(self.cache.layers)
        for layer, ref in zip(self.cache.layers, refs):
            shape_k = (self.slots, ref.keys.shape[1], capacity, ref.keys.shape[3])
            shape_v = (self.slots, ref.values.shape[1], capacity, ref.values.shape[3])
            keys = torch.zeros(shape_k, dtype=ref.keys.dtype, device=self.device)
            values = torch.zeros(shape_v, dtype=ref.values.dtype, device=self.device)
            if layer.is_initialized:  # a bigger bucket: the old columns carry over
                keys[:, :, :self.capacity] = layer.keys
                values[:, :, :self.capacity] = layer.values
            layer.keys, layer.values, layer.is_initialized = keys, values, True
            if self.compiled:
                torch._dynamo.mark_static_address(keys)
                torch._dynamo.mark_static_address(values)
        self.capacity = capacity
        self.columns = torch.arange(capacity, device=self.device)

    def forward(self, ids: torch.Tensor, cols: torch.Tensor, every: bool, captured: bool) -> torch.Tensor:
        """Run ids [S, q] whose cache columns (= positions) are `cols` [S, q]; logits [S, q, V] or [S, V]."""
        positions = cols
        if isinstance(self.max_position, int) and self.max_position > 0:
            positions = cols.clamp_max(self.max_position - 1)
        allowed = self.columns.view(1, 1, 1, -1) <= cols.unsqueeze(1).unsqueeze(-1)  # [S, 1, q, capacity]
        if self._float_mask:  # eager attention adds the mask
            dtype = self.cache.layers[0].keys.dtype
            mask = torch.zeros(allowed.shape, dtype=dtype, device=self.device)
            mask.masked_fill_(~allowed, torch.finfo(dtype).min)
        else:
            mask = allowed
        self.write_cols = cols
        step = self._step if captured else self.model
        out = step(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True,
                   logits_to_keep=0 if every else 1, **{self._kwarg: self.cache})
        logits = out.logits if every else out.logits[:, -1, :]
        return logits


def _raise_recompile_limit() -> None:
    """One graph per (tokens per row, capacity bucket) and model: more than dynamo's default of 8."""
    config = torch._dynamo.config
    for name in ("recompile_limit", "cache_size_limit"):
        if hasattr(config, name):
            setattr(config, name, max(getattr(config, name), 64))
    if hasattr(config, "accumulated_recompile_limit"):
        config.accumulated_recompile_limit = max(config.accumulated_recompile_limit, 1024)
    elif hasattr(config, "accumulated_cache_size_limit"):
        config.accumulated_cache_size_limit = max(config.accumulated_cache_size_limit, 1024)


def _check_model(model) -> None:
    config = model.config
    kinds = set(getattr(config, "layer_types", None) or ["full_attention"])
    if kinds != {"full_attention"}:
        raise StaticCacheError(f"--kv-cache static needs full attention in every layer; this model has "
                               f"{', '.join(sorted(kinds))} layers: use --kv-cache rectangle")
    attn = getattr(config, "_attn_implementation", "sdpa") or "sdpa"
    if attn not in ("sdpa", "eager"):
        raise StaticCacheError(f"--kv-cache static needs sdpa or eager attention, not {attn!r}: load the model "
                               "with attn_implementation='sdpa', or use --kv-cache rectangle")
    if len({p.device for p in model.parameters()}) > 1:
        raise StaticCacheError("--kv-cache static holds a model on one device; this one is spread over several "
                               "(a device map): use --kv-cache rectangle or paged")


class StaticLayout:
    """The engine's handle on the static layout: one store per model, `slots` rows each."""

    def __init__(self, slots: int, compiled: bool = True):
        self.slots = slots
        self.compiled = compiled
        self.reserved = 0  # columns every store allocates at least (`reserve`)
        self.widest = 0  # tokens per row of the widest `feed_many` so far, or as reserved: narrower ones pad up
        self._stores: dict[int, _Store] = {}

    def reserve(self, columns: int, width: int = 0) -> None:
        """Allocate at least `columns` columns per slot from the start (a run's longest prompt + budget + draft):
        a capacity that grows mid-run costs a copy and a compile per new bucket. `width`: pad every `feed_many`
        to at least this many tokens per row (a drafted run's verify width, K + 1), so that the first pass
        compiles the shape of all the others even when its rows' budgets are short."""
        self.reserved = max(self.reserved, columns)
        self.widest = max(self.widest, width)

    def store(self, model) -> _Store:
        key = id(model)
        if key not in self._stores or self._stores[key].model is not model:
            self._stores[key] = _Store(model, self)
        return self._stores[key]

    @torch.inference_mode()
    def prefill(self, model, seqs: list[list[int]]) -> tuple["StaticKVBatch", torch.Tensor]:
        store = self.store(model)
        if len(seqs) > store.slots:
            raise ValueError(f"{len(seqs)} rows do not fit in {store.slots} slots")
        staged, logits = KVBatch.prefill(model, seqs)
        return StaticKVBatch(store, staged), logits


class StaticKVBatch:
    """Rows in a model's store; fresh from a prefill, a batch is `staged` (an eager KVBatch) until first fed."""

    def __init__(self, store: _Store, staged: KVBatch):
        self.store = store
        self.staged: KVBatch | None = staged
        self.slot: list[int] = []  # row i sits in slot slot[i]
        self._slot_index: torch.Tensor | None = None  # the same on the device
        self._lengths: torch.Tensor | None = None
        # at least the longest row, known on the host: room is checked against it, so a step needs no device
        # sync; it only grows between admissions (rollback leaves it high) and is made exact when room runs out
        self._longest = 0

    # -- the KVBatch interface ---------------------------------------------------------
    @property
    def rows(self) -> int:
        return self.staged.rows if self.staged is not None else len(self.slot)

    @property
    def lengths(self) -> torch.Tensor:
        return self.staged.lengths if self.staged is not None else self._lengths

    @torch.inference_mode()
    def feed(self, tokens: torch.Tensor) -> torch.Tensor:
        """One token per row ([B] long); next-token logits [B, V], from the captured step."""
        return self._step(tokens.to(self.store.device).unsqueeze(1), every=False)

    @torch.inference_mode()
    def feed_many(self, ids: torch.Tensor) -> torch.Tensor:
        """The same number of tokens for every row ([B, m] long); the logits at each [B, m, V], captured.

        m is padded up to the widest m fed so far (a drafted run's verify passes narrow when budgets run out):
        one graph, not one per width. The padding is written past each row's end and never read."""
        ids = ids.to(self.store.device)
        m = ids.shape[1]
        layout = self.store.layout
        width = layout.widest = max(m, layout.widest)
        if width > m:
            ids = torch.cat([ids, ids[:, -1:].expand(-1, width - m)], dim=1)
        logits = self._step(ids, every=True)[:, :m]
        self._lengths = self._lengths - (width - m)
        return logits

    @torch.inference_mode()
    def feed_chunks(self, chunks: list[list[int]], every: bool = False) -> torch.Tensor:
        """A variable number of tokens per row (each >= 1), left-padded as for `KVBatch` (row i's chunk ends at the
        last column); the model runs eager. Padding columns are written past the row's end (never read)."""
        self._own()
        store = self.store
        ids, mask = left_padded(chunks)
        ids, mask = ids.to(store.device), mask.to(store.device)
        m = ids.shape[1]
        counts = mask.sum(1)
        self._make_room(m)
        # row i's real tokens go to columns lengths[i] .. lengths[i] + n_i - 1, its padding right after them
        j = torch.arange(m, device=store.device).unsqueeze(0)
        cols_rows = self._lengths.unsqueeze(1) + (j - (m - counts).unsqueeze(1)) % m
        full_ids, cols = self._spread(ids, cols_rows, m)
        logits = store.forward(full_ids, cols, every=True, captured=False)
        self._lengths = self._lengths + counts
        self._longest += m
        logits = logits[self._slot_index]
        return logits if every else logits[:, -1, :]

    def rollback(self, drop: torch.Tensor) -> None:
        """Forget the last `drop[i]` tokens of row i: its later columns are written before anything reads them."""
        self._own()
        self._lengths = self._lengths - drop.to(self._lengths.device)

    def pack(self) -> None:
        """Nothing to pack: a row's t-th token is always at column t."""

    def allocated_positions(self) -> int:
        """Positions held per layer: every slot's full capacity (the static shapes' price)."""
        if self.staged is not None:
            return self.staged.allocated_positions()
        return self.store.slots * self.store.capacity

    def reserved_positions(self) -> int:
        return self.allocated_positions()

    @torch.inference_mode()
    def select(self, rows: torch.Tensor) -> None:
        """Keep `rows` (indices, may repeat) in that order; a repeat gets a copy of its row's slot."""
        if self.staged is not None:
            self.staged.select(rows)
            return
        self._own()
        idx = rows.tolist()
        lengths = self._lengths[rows.to(self._lengths.device)]
        taken: set[int] = set()
        slots, copies = [], []
        for i in idx:
            slot = self.slot[i]
            if slot in taken:
                copies.append((slot, len(slots)))
                slot = -1
            else:
                taken.add(slot)
            slots.append(slot)
        free = [s for s in range(self.store.slots) if s not in taken]
        for src, at in copies:
            dst = free.pop(0)
            for layer in self.store.cache.layers:
                layer.keys[dst] = layer.keys[src]
                layer.values[dst] = layer.values[src]
            slots[at] = dst
        self._set_slots(slots)
        self._lengths = lengths

    @torch.inference_mode()
    def extend(self, other: "StaticKVBatch") -> None:
        """Append `other`'s rows (a fresh prefill) after ours."""
        if other.staged is None:
            raise RuntimeError("only a freshly prefilled batch can join a static batch")
        if self.staged is not None:
            self.staged.extend(other.staged)
            return
        self._own()
        used = set(self.slot)
        free = [s for s in range(self.store.slots) if s not in used]
        if other.staged.rows > len(free):
            raise ValueError(f"{other.staged.rows} rows joining, {len(free)} slots free")
        new = free[:other.staged.rows]
        self._longest = max(self._longest, self._copy_in(other.staged, new))
        self._set_slots(self.slot + new)
        self._lengths = torch.cat([self._lengths, other.staged.lengths.to(self._lengths.device)])
        other.staged = None

    # -- inside ---------------------------------------------------------------------------------
    def _own(self) -> None:
        """Move a staged batch into the store (which it takes from whatever batch held it before)."""
        store = self.store
        if self.staged is None:
            if store.owner is not self:
                raise RuntimeError("this static batch's store has been taken by a newer batch")
            return
        staged = self.staged
        if staged.rows > store.slots:
            raise ValueError(f"{staged.rows} rows do not fit in {store.slots} slots")
        store.owner = self
        self._set_slots(list(range(staged.rows)))
        self._longest = self._copy_in(staged, self.slot)
        self._lengths = staged.lengths.clone()
        self.staged = None

    def _copy_in(self, staged: KVBatch, slots: list[int]) -> int:
        """Copy each row of a prefilled batch (real tokens right-aligned, in order) to columns 0.. of its slot;
        return the longest row's length."""
        store = self.store
        layers = _layers(staged.cache)
        lengths = staged.lengths.to(store.device)
        width = staged.mask.shape[1]
        longest = int(lengths.max()) if len(slots) else 0
        store.ensure(longest + 1, layers)
        if not longest:
            return longest
        span = torch.arange(width, device=store.device).unsqueeze(0) >= (width - lengths).unsqueeze(1)
        src_rows, src_cols = span.nonzero(as_tuple=True)
        dst_rows = torch.tensor(slots, dtype=torch.long, device=store.device)[src_rows]
        dst_cols = src_cols - (width - lengths)[src_rows]
        for layer, ref in zip(store.cache.layers, layers):
            layer.keys[dst_rows, :, dst_cols] = ref.keys[src_rows, :, src_cols].to(layer.keys.dtype)
            layer.values[dst_rows, :, dst_cols] = ref.values[src_rows, :, src_cols].to(layer.values.dtype)
        return longest

    def _set_slots(self, slots: list[int]) -> None:
        self.slot = slots
        self._slot_index = torch.tensor(slots, dtype=torch.long, device=self.store.device)

    def _make_room(self, q: int) -> None:
        """Enough capacity for every row to take q more columns (the exact longest row, a device sync, is read
        only when the host's bound says room may be short)."""
        if self._longest + q > self.store.capacity:
            self._longest = int(self._lengths.max())
            self.store.ensure(self._longest + q, [])

    def _spread(self, ids: torch.Tensor, cols_rows: torch.Tensor, q: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The rows' ids [B, q] and columns placed in their slots of an [S, q] block; a free slot reads a
        dummy token at columns 0 .. q-1."""
        store = self.store
        full_ids = torch.zeros(store.slots, q, dtype=torch.long, device=store.device)
        cols = torch.arange(q, device=store.device).unsqueeze(0).repeat(store.slots, 1)
        full_ids[self._slot_index] = ids
        cols[self._slot_index] = cols_rows
        return full_ids, cols

    def _step(self, ids: torch.Tensor, every: bool) -> torch.Tensor:
        self._own()
        store = self.store
        q = ids.shape[1]
        self._make_room(q)
        cols_rows = self._lengths.unsqueeze(1) + torch.arange(q, device=store.device).unsqueeze(0)
        full_ids, cols = self._spread(ids, cols_rows, q)
        logits = store.forward(full_ids, cols, every=every, captured=True)
        self._lengths = self._lengths + q
        self._longest += q
        return logits[self._slot_index]
