"""Rows of many sequences decoding together: one left-padded KV cache, one forward per step.

Every row of a `PaddedBatch` ends at the same cache position; a shorter row is padded on the left,
and the padding is hidden by a 2-D attention mask (1 for a real token, 0 for padding). Position
ids are per row (the row's own token count), so rotary embeddings see each sequence exactly as if
it ran alone. New sequences are prefilled (together, left-padded) and merged in by padding
whichever side is shorter; finished rows are dropped, and any left padding common to every row is
trimmed so the cache never grows past the longest live row.

The cache is transformers' `DynamicCache`, whose layers are `DynamicLayer` (full attention:
keys of shape (rows, heads, length, dim)) or `DynamicSlidingWindowLayer` (Gemma 3's local
layers: only the last `sliding_window - 1` positions are kept, and `cumulative_length` counts
every position seen). Padding keeps distances between positions, so a sliding window over the
padded layout is the same window over each row's own tokens. Other layer kinds are refused.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Any

import torch
from transformers.cache_utils import DynamicLayer, DynamicSlidingWindowLayer

PAD_ID = 0  # any valid token id; padded positions are masked out


class UnsupportedCacheError(RuntimeError):
    """The model's KV cache has layers this module cannot pad and merge."""


def _left_pad(tensor: torch.Tensor, length: int, dim: int) -> torch.Tensor:
    """`tensor` with zeros added in front along `dim` up to `length`."""
    missing = length - tensor.shape[dim]
    if missing <= 0:
        return tensor
    shape = list(tensor.shape)
    shape[dim] = missing
    return torch.cat([tensor.new_zeros(shape), tensor], dim=dim)


def _check_layers(cache: Any) -> None:
    for layer in cache.layers:
        if type(layer) not in (DynamicLayer, DynamicSlidingWindowLayer):
            raise UnsupportedCacheError(
                f"cannot batch a KV cache layer of type {type(layer).__name__}"
            )


class PaddedBatch:
    """A KV cache over `rows` sequences, left-padded to a common length. Not thread-safe."""

    def __init__(self) -> None:
        self._clear()

    def _clear(self) -> None:
        self.cache: Any = None
        self.mask = torch.zeros(0, 0, dtype=torch.long)  # (rows, length): 1 real, 0 padding
        self.positions = torch.zeros(0, dtype=torch.long)  # (rows,): tokens each row holds

    @property
    def rows(self) -> int:
        return int(self.mask.shape[0])

    @property
    def length(self) -> int:
        """Cache positions, padding included."""
        return int(self.mask.shape[1])

    @classmethod
    @torch.inference_mode()
    def prefill(
        cls, model: Any, prompts: Sequence[Sequence[int]]
    ) -> tuple[PaddedBatch, torch.Tensor]:
        """Run `prompts` through `model` together; return their batch and next-token logits."""
        longest = max(len(p) for p in prompts)
        ids = torch.full((len(prompts), longest), PAD_ID, dtype=torch.long)
        mask = torch.zeros(len(prompts), longest, dtype=torch.long)
        for row, prompt in enumerate(prompts):
            ids[row, longest - len(prompt) :] = torch.tensor(prompt, dtype=torch.long)
            mask[row, longest - len(prompt) :] = 1
        padded = bool((mask == 0).any())
        out = model(
            input_ids=ids.to(model.device),
            # Without padding, no mask: exactly the call a lone request makes in `generate`.
            attention_mask=mask.to(model.device) if padded else None,
            position_ids=(mask.cumsum(-1) - 1).clamp(min=0).to(model.device),
            use_cache=True,
            logits_to_keep=1,
        )
        _check_layers(out.past_key_values)
        batch = cls()
        batch.cache = out.past_key_values
        batch.mask = mask
        batch.positions = mask.sum(-1)
        logits: torch.Tensor = out.logits[:, -1, :]
        return batch, logits

    @torch.inference_mode()
    def step(self, model: Any, tokens: torch.Tensor) -> torch.Tensor:
        """Append one token to every row (`tokens`: (rows,)), or as many to each (`tokens`:
        (rows, m)); return the logits after each row's last."""
        tokens = tokens if tokens.dim() == 2 else tokens[:, None]
        added = tokens.shape[1]
        self.mask = torch.cat([self.mask, self.mask.new_ones(self.rows, added)], dim=1)
        padded = bool((self.mask[:, 0] == 0).any())  # trimmed: column 0 is real for some row
        out = model(
            input_ids=tokens.to(model.device),
            attention_mask=self.mask.to(model.device) if padded else None,
            position_ids=(self.positions[:, None] + torch.arange(added)).to(model.device),
            past_key_values=self.cache,
            use_cache=True,
            logits_to_keep=1,
        )
        self.cache = out.past_key_values
        self.positions = self.positions + added
        logits: torch.Tensor = out.logits[:, -1, :]
        return logits

    def select(self, rows: Sequence[int]) -> None:
        """Keep these rows, in this order (an index may repeat: one prompt, `n` samples)."""
        if not rows:
            self._clear()
            return
        if list(rows) == list(range(self.rows)):
            return
        index = torch.tensor(rows, dtype=torch.long)
        self.cache.batch_select_indices(index.to(self.mask.device))
        self.mask = self.mask[index]
        self.positions = self.positions[index]
        self._trim()

    def extend(self, other: PaddedBatch) -> None:
        """Append `other`'s rows after this batch's, padding the shorter side on the left."""
        if other.rows == 0:
            return
        if self.rows == 0:
            self.cache, self.mask, self.positions = other.cache, other.mask, other.positions
            return
        length = max(self.length, other.length)
        for mine, theirs in zip(self.cache.layers, other.cache.layers, strict=True):
            stored = max(mine.keys.shape[-2], theirs.keys.shape[-2])
            mine.keys = torch.cat(
                [_left_pad(mine.keys, stored, -2), _left_pad(theirs.keys, stored, -2)]
            )
            mine.values = torch.cat(
                [_left_pad(mine.values, stored, -2), _left_pad(theirs.values, stored, -2)]
            )
            if isinstance(mine, DynamicSlidingWindowLayer):
                mine.cumulative_length = length
        self.mask = torch.cat([_left_pad(self.mask, length, 1), _left_pad(other.mask, length, 1)])
        self.positions = torch.cat([self.positions, other.positions])

    def _trim(self) -> None:
        """Drop the leading cache positions that are padding in every row."""
        real = self.mask.any(dim=0)
        drop = int(real.int().argmax())  # the first column some row uses
        if drop == 0:
            return
        self.mask = self.mask[:, drop:]
        for layer in self.cache.layers:
            keys, values = layer.keys, layer.values
            start = drop
            if isinstance(layer, DynamicSlidingWindowLayer):
                layer.cumulative_length -= drop
                start = keys.shape[-2] - min(keys.shape[-2], layer.cumulative_length)
            layer.keys, layer.values = keys[:, :, start:, :], values[:, :, start:, :]


def gather(caches: Sequence[Any], lengths: Sequence[int], drop: Sequence[int] = ()) -> PaddedBatch:
    """One batch over the KV caches of separate sequences (`lengths`: the tokens each holds),
    left-padded as `PaddedBatch.extend` pads, without the last `drop[i]` positions of cache `i`
    (to be run again in the step, so that rows feeding fewer tokens line up: see `can_drop`);
    the caches themselves are left as they are."""
    for cache in caches:
        _check_layers(cache)
    drop = list(drop) or [0] * len(caches)
    kept = [n - d for n, d in zip(lengths, drop, strict=True)]
    length = max(kept)
    merged = copy.copy(caches[0])
    merged.layers = [copy.copy(layer) for layer in caches[0].layers]
    for j, layer in enumerate(merged.layers):
        column = [_without(cache.layers[j], d) for cache, d in zip(caches, drop, strict=True)]
        stored = max(keys.shape[-2] for keys, _ in column)
        layer.keys = torch.cat([_left_pad(keys, stored, -2) for keys, _ in column])
        layer.values = torch.cat([_left_pad(values, stored, -2) for _, values in column])
        if isinstance(layer, DynamicSlidingWindowLayer):
            layer.cumulative_length = length
    batch = PaddedBatch()
    batch.cache = merged
    batch.mask = torch.stack([_left_pad(torch.ones(n, dtype=torch.long), length, 0) for n in kept])
    batch.positions = torch.tensor(kept, dtype=torch.long)
    return batch


def can_drop(cache: Any, positions: int) -> bool:
    """Whether `gather` may leave out a cache's last `positions`: not from a sliding layer that
    has already let positions go (the re-run ones would need them in their window)."""
    return positions == 0 or all(
        _stored(layer) == layer.cumulative_length
        for layer in cache.layers
        if isinstance(layer, DynamicSlidingWindowLayer)
    )


def _stored(layer: Any) -> int:
    return int(layer.keys.shape[-2])


def _without(layer: Any, positions: int) -> tuple[torch.Tensor, torch.Tensor]:
    if positions == 0:
        return layer.keys, layer.values
    return layer.keys[..., :-positions, :], layer.values[..., :-positions, :]


def scatter(batch: PaddedBatch, caches: Sequence[Any]) -> None:
    """Give each of the caches `gather` took its row of `batch` back, without the padding."""
    lengths = batch.positions.tolist()
    for j, layer in enumerate(batch.cache.layers):
        for row, (cache, n) in enumerate(zip(caches, lengths, strict=True)):
            own = cache.layers[j]
            keep = min(n, layer.keys.shape[-2])  # a sliding layer stores only its window
            own.keys = layer.keys[row : row + 1, :, -keep:, :]
            own.values = layer.values[row : row + 1, :, -keep:, :]
            if isinstance(own, DynamicSlidingWindowLayer):
                own.cumulative_length = n
