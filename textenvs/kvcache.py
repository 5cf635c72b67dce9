"""The one home of direct KV-cache manipulation: token sequences and the layers of their caches.

transformers' ``DynamicCache`` keeps, per layer, ``keys`` and ``values`` of shape
``(batch, heads, positions, head_dim)``. The rest of textenvs never touches those tensors: the
language model (:mod:`textenvs.lm`) and the batched forwards (:mod:`textenvs.batching`) call the
functions below, so a change of the cache's layout in a new transformers release is fixed here.

A causal LM's cached keys and values of positions ``< p`` do not depend on anything at or after
``p``; that is what makes :func:`crop` (edits) and right-padding (batches) exact.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import DynamicCache


@dataclass
class TokenSequence:
    """One token sequence of a language model: its ids and the KV cache of those ids (batch size 1).

    ``cache`` is None while a :class:`textenvs.batching.LockstepBatch` holds the sequence's keys and
    values in one of its rows. Only :class:`textenvs.lm.LanguageModel` and the batching module
    change a sequence; an environment reads it.
    """

    ids: list[int]
    cache: DynamicCache | None

    def __len__(self) -> int:
        return len(self.ids)


def empty_cache() -> DynamicCache:
    return DynamicCache()


def cache_from_layers(layers: list[tuple[torch.Tensor, torch.Tensor]]) -> DynamicCache:
    """A cache holding the given ``(keys, values)`` of each layer."""
    return DynamicCache(ddp_cache_data=layers)


def crop(cache: DynamicCache, length: int) -> None:
    """Keep the first ``length`` positions of every layer."""
    for layer in cache.layers:  # keys / values: (1, H, T, hd)
        layer.keys = layer.keys[:, :, :length]
        layer.values = layer.values[:, :, :length]


def row_view(batch: DynamicCache, row: int, length: int) -> DynamicCache:
    """A cache of batch size 1 viewing the first ``length`` positions of ``row`` (no copy)."""
    return cache_from_layers(
        [
            (layer.keys[row : row + 1, :, :length], layer.values[row : row + 1, :, :length])
            for layer in batch.layers
        ]
    )


def stack_right_padded(caches: list[DynamicCache], lengths: list[int]) -> DynamicCache:
    """One batch cache of several caches of batch size 1, each right-padded to the longest with
    zeros.
    """
    past = max(lengths)
    layers = []
    for layer in range(len(caches[0].layers)):
        ks, vs = [], []
        for cache, n in zip(caches, lengths):
            cached = cache.layers[layer]  # keys / values: (1, H, n, hd)
            ks.append(torch.nn.functional.pad(cached.keys, (0, 0, 0, past - n)))
            vs.append(torch.nn.functional.pad(cached.values, (0, 0, 0, past - n)))
        layers.append((torch.cat(ks), torch.cat(vs)))  # (B, H, past, hd)
    return cache_from_layers(layers)


def take_row_segments(
    own: DynamicCache, batch: DynamicCache, row: int, length: int, start: int, added: int
) -> None:
    """Make ``own`` the first ``length`` positions of batch ``row`` followed by its ``added`` from
    ``start``.

    After a right-padded forward the batch cache holds each row's old positions, its padding, then
    its new positions from ``start`` (the padded width) on; this drops the padding.
    """
    for layer, batch_layer in zip(own.layers, batch.layers):
        k, v = (
            batch_layer.keys[row : row + 1],
            batch_layer.values[row : row + 1],
        )  # (1, H, past + new, hd)
        layer.keys = torch.cat([k[:, :, :length], k[:, :, start : start + added]], dim=2)
        layer.values = torch.cat([v[:, :, :length], v[:, :, start : start + added]], dim=2)


# -- caches of several rows that persist across forwards (textenvs.batching.LockstepBatch) -----


def copy_row_slots(batch: DynamicCache, row: int, slots: torch.Tensor) -> DynamicCache:
    """A cache of batch size 1 holding a copy of the positions ``slots`` ``(n,)`` of ``row``, in
    that order (a row's valid slots, taken out of a persistent batch)."""
    return cache_from_layers(
        [
            (
                layer.keys[row : row + 1].index_select(2, slots),  # (1, H, n, hd)
                layer.values[row : row + 1].index_select(2, slots),
            )
            for layer in batch.layers
        ]
    )


def zero_rows_like(cache: DynamicCache, rows: int) -> DynamicCache:
    """A cache of ``rows`` rows of zeros, each as long as ``cache`` (batch size 1) and of its dtype
    and device.
    """
    return cache_from_layers(
        [
            (
                torch.zeros(
                    (rows, *layer.keys.shape[1:]), dtype=layer.keys.dtype, device=layer.keys.device
                ),
                torch.zeros(
                    (rows, *layer.values.shape[1:]),
                    dtype=layer.values.dtype,
                    device=layer.values.device,
                ),
            )
            for layer in cache.layers
        ]
    )


def write_row(batch: DynamicCache, row: int, cache: DynamicCache, length: int) -> None:
    """Overwrite ``row`` of ``batch`` with the ``length`` positions of ``cache``, then zeros."""
    for own, new in zip(batch.layers, cache.layers):
        own.keys[row] = 0
        own.values[row] = 0
        own.keys[row, :, :length] = new.keys[0]
        own.values[row, :, :length] = new.values[0]


def pad_slots(batch: DynamicCache, extra: int) -> None:
    """Add ``extra`` zero slots at the end of every row."""
    for layer in batch.layers:
        layer.keys = torch.nn.functional.pad(layer.keys, (0, 0, 0, extra))
        layer.values = torch.nn.functional.pad(layer.values, (0, 0, 0, extra))


def gather_slots(batch: DynamicCache, order: torch.Tensor) -> None:
    """Keep, per row, the slots ``order[row]`` ``(B, S')`` in that order."""
    for layer in batch.layers:
        index = order[:, None, :, None].expand(-1, layer.keys.shape[1], -1, layer.keys.shape[3])
        layer.keys = torch.gather(layer.keys, 2, index)
        layer.values = torch.gather(layer.values, 2, index)
