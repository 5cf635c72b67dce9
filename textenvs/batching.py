"""Batched forwards: N token sequences through the language model in one (or a few) forwards.

The batched vector envs (:mod:`textenvs.vector`) run their sub-envs' forwards here:

* :func:`prefill_batch`: the prompts of several (re)starting episodes in ONE right-padded forward;
* :func:`extend_batch`: tails of different lengths (the edit env recomputes everything after an
  edit) appended to their sequences in one padded, masked forward, or a few grouped by tail length
  (:func:`plan_tail_groups`) where padding would cost more than another forward;
* :class:`LockstepBatch`: sequences that each grow by one token per step (generation) kept in ONE
  persistent batch cache, so a step is one forward with no copying of caches;
* :func:`greedy_batch`: greedy continuations of many prompts decoded together (the edit envs'
  drafts).

Every result equals the single-sequence :meth:`textenvs.lm.LanguageModel.extend` of that sequence,
up to float rounding. Cache layers are handled by :mod:`textenvs.kvcache` only.
"""

from __future__ import annotations

import math

import torch

from textenvs import kvcache
from textenvs.kvcache import TokenSequence
from textenvs.lm import LanguageModel


def plan_tail_groups(sizes: list[int], overhead: float) -> list[list[int]]:
    """Split rows with tails of ``sizes`` tokens into groups, one padded forward each.

    A group costs ``overhead`` (a forward's fixed cost, in tokens of compute) plus its rows times
    its longest tail (the padded tokens it computes). The rows are sorted by tail length and cut
    into the contiguous groups of least total cost (exact, by dynamic programming), so the plan
    is never costlier than one batch of all rows, nor than one forward per row. Deterministic:
    the same sizes always give the same groups.

    Returns:
        Lists of indices into ``sizes``, shortest tails first.
    """
    order = sorted(range(len(sizes)), key=lambda k: sizes[k])
    sorted_sizes = [sizes[k] for k in order]
    best = [0.0] + [math.inf] * len(order)  # best[i]: least cost of the first i rows
    cut = [0] * (len(order) + 1)
    for i in range(1, len(order) + 1):
        for j in range(i):  # the last group is rows j..i-1, its longest tail sorted_sizes[i - 1]
            cost = best[j] + overhead + (i - j) * sorted_sizes[i - 1]
            if cost < best[i]:
                best[i], cut[i] = cost, j
    groups, i = [], len(order)
    while i > 0:
        groups.append(order[cut[i] : i])
        i = cut[i]
    return groups[::-1]


RELEASE_AFTER_TOKENS = 4096
"""A batched reset that prefilled at least this many tokens hands its freed working memory back
to the system (:func:`textenvs.system.release_freed_memory`)."""


@torch.inference_mode()
def prefill_batch(
    lm: LanguageModel, batch: list[list[int]]
) -> list[tuple[TokenSequence, torch.Tensor, torch.Tensor]]:
    """:meth:`LanguageModel.prefill` of several sequences with ONE right-padded forward.

    Every sequence starts at position 0 and its padding comes after its last token, so the
    causal mask already keeps the padding out of its view: each result equals
    :meth:`~textenvs.lm.LanguageModel.prefill` of that sequence alone, up to float rounding. Each
    sequence's cache is a view of the batch's. Identical sequences (a group of completions of
    one prompt) run once and share that row: their caches view the same positions, which every
    consumer copies or extends rather than writes.
    """
    for ids in batch:
        if not ids:
            raise ValueError("Cannot run the model on an empty sequence: give at least one token.")
        lm.check_length(len(ids))
    rows: dict[tuple[int, ...], int] = {}  # each distinct sequence's row in the forward
    row_of = [rows.setdefault(tuple(ids), len(rows)) for ids in batch]
    if len(rows) < len(batch):
        distinct = [list(ids) for ids in rows]
        done = prefill_batch(lm, distinct)
        return [
            (TokenSequence(list(batch[b]), kvcache.row_view(done[r][0].cache, 0, len(batch[b]))),)
            + done[r][1:]
            for b, r in enumerate(row_of)
        ]
    if len(batch) == 1:
        return [lm.prefill(batch[0])]
    lengths = [len(ids) for ids in batch]
    input_ids = torch.full((len(batch), max(lengths)), lm.eos_token_id, dtype=torch.long)
    mask = torch.zeros_like(input_ids)
    for b, ids in enumerate(batch):
        input_ids[b, : len(ids)] = torch.tensor(ids)
        mask[b, : len(ids)] = 1
    cache = kvcache.empty_cache()
    last = (
        torch.tensor(lengths, device=lm.device)[:, None] - 1
    )  # (B, 1) each sequence's last position
    hidden, logits = lm.forward(input_ids.to(lm.device), cache, mask.to(lm.device), logits_at=last)
    if logits.shape[1] > 1:  # the model computed every position's logits: keep each row's last
        logits = logits.gather(1, last[:, :, None].expand(-1, -1, logits.shape[-1]))
    return [
        (TokenSequence(list(batch[b]), kvcache.row_view(cache, b, n)), hidden[b, :n], logits[b, 0])
        for b, n in enumerate(lengths)
    ]


@torch.inference_mode()
def extend_batch(
    lm: LanguageModel, seqs: list[TokenSequence], tails: list[list[int]]
) -> list[tuple[torch.Tensor, torch.Tensor] | None]:
    """Append ``tails[i]`` to ``seqs[i]`` for every i, in as few batched incremental forwards as
    pay.

    Caches of different lengths are right-padded into one temporary batch cache; an attention
    mask hides the padding and explicit position ids keep every sequence's positions, so each
    result equals :meth:`~textenvs.lm.LanguageModel.extend` on that sequence alone. Each sequence
    keeps its own cache. Tails of very different lengths would make one batch mostly padding, so
    the rows are split into groups of similar tail length where that saves more padded tokens
    than the extra forwards cost (:func:`plan_tail_groups` with ``lm.forward_overhead_tokens``).

    Returns:
        Per sequence, hidden states ``(n_i, d)`` and logits ``(n_i, V)`` of its new positions,
        or ``None`` where its tail is empty (nothing is run for it).
    """
    results: list[tuple[torch.Tensor, torch.Tensor] | None] = [None] * len(seqs)
    active = [i for i, tail in enumerate(tails) if tail]
    for group in plan_tail_groups([len(tails[i]) for i in active], lm.forward_overhead_tokens):
        rows = [active[k] for k in group]
        if len(rows) == 1:
            results[rows[0]] = lm.extend(seqs[rows[0]], tails[rows[0]])
            continue
        for i, out in zip(
            rows, _extend_padded(lm, [seqs[i] for i in rows], [tails[i] for i in rows])
        ):
            results[i] = out
    return results


def _extend_padded(
    lm: LanguageModel, seqs: list[TokenSequence], tails: list[list[int]]
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """ONE right-padded, masked forward appending ``tails[i]`` (non-empty) to ``seqs[i]``."""
    lengths = [len(seq) for seq in seqs]
    sizes = [len(tail) for tail in tails]
    for n, m in zip(lengths, sizes):
        lm.check_length(n + m)
    past, new = max(lengths), max(sizes)
    cache = kvcache.stack_right_padded([seq.cache for seq in seqs], lengths)
    mask = torch.zeros(len(seqs), past + new, dtype=torch.long)  # (B, past + new)
    input_ids = torch.full((len(seqs), new), lm.eos_token_id, dtype=torch.long)
    for b, (tail, n, m) in enumerate(zip(tails, lengths, sizes)):
        mask[b, :n] = 1
        mask[b, past : past + m] = 1
        input_ids[b, :m] = torch.tensor(tail)
    position_ids = torch.tensor(lengths)[:, None] + torch.arange(new)[None]  # (B, new)
    hidden, logits = lm.forward(
        input_ids.to(lm.device), cache, mask.to(lm.device), position_ids.to(lm.device)
    )
    out = []
    for b, (seq, tail, n, m) in enumerate(zip(seqs, tails, lengths, sizes)):
        kvcache.take_row_segments(seq.cache, cache, b, n, past, m)
        seq.ids.extend(tail)
        out.append((hidden[b, :m], logits[b, :m]))
    return out


# Architectures whose attention, under PyTorch's SDPA, masks a one-token step by the padding mask
# alone: no sliding window, chunked attention or ALiBi derived from the 2D mask.
PREPARED_MASK_MODEL_TYPES = ("gpt2", "llama", "qwen2")


def takes_prepared_step_mask(config) -> bool:
    """Whether a one-token batched step may hand the model its padding mask as a ready 4D mask.

    transformers rebuilds a 4D attention mask from a 2D padding mask on every forward (about a
    tenth of a batched step of the tiny model); a ready ``(B, 1, 1, S)`` boolean mask is used as
    it is. That is exact only where a single new token's mask is the padding mask itself: SDPA
    attention, full (not sliding or chunked) attention in every layer, and an architecture in
    :data:`PREPARED_MASK_MODEL_TYPES`. Any other model gets the 2D mask.
    """
    layer_types = getattr(config, "layer_types", None) or ["full_attention"]
    return (
        getattr(config, "_attn_implementation", None) == "sdpa"
        and config.model_type in PREPARED_MASK_MODEL_TYPES
        and all(kind == "full_attention" for kind in layer_types)
        and not getattr(config, "use_sliding_window", False)
        and getattr(config, "sliding_window", None) is None
    )


class LockstepBatch:
    """N sequences in ONE right-padded batch cache, each advanced by at most one token per call.

    The generation vector env keeps its sub-envs here so that a step is a single batched forward
    with no per-step copying of caches: row ``i`` of every layer's keys / values holds sequence
    ``i``, an attention mask ``(N, S)`` marks its valid slots and ``lengths`` (on the host, so a
    step never waits for the device to read them back) its token count, which is also the
    position of its next token. Rows of different lengths, and rows restarted at any time, share
    the batch. Slots freed by a restarted row, or left empty by a row that sat a step out, are
    reclaimed by :meth:`compact` once more than ``slack`` columns are wasted, which keeps memory
    flat over any number of steps.

    The batch owns its rows' caches: :meth:`adopt` moves a sequence's cache into a row (the
    sequence's own ``cache`` becomes None) and :meth:`advance` appends each stepped row's token to
    its sequence's ids, so a sequence's ids and its row always agree.
    """

    def __init__(self, lm: LanguageModel, n: int, slack: int = 16) -> None:
        self.lm, self.n, self.slack = lm, n, slack
        self.cache = None  # the batch cache, made by the first adopt()
        self.mask = torch.zeros(n, 0, dtype=torch.long, device=lm.device)  # (N, S)
        self.lengths = [0] * n  # tokens held by each row: its valid slots, and its next position
        self.rows: list[TokenSequence | None] = [None] * n
        self.mask_4d = takes_prepared_step_mask(lm.model.config)
        self._ones = torch.ones(n, 1, dtype=torch.long, device=lm.device)

    @property
    def slots(self) -> int:
        return self.mask.shape[1]

    @torch.inference_mode()
    def adopt(self, i: int, seq: TokenSequence) -> None:
        """Put ``seq`` (cached by :meth:`LanguageModel.prefill`) into row ``i``; its own cache is
        released.
        """
        length = len(seq)
        if self.cache is None:
            self.cache = kvcache.zero_rows_like(seq.cache, self.n)
            self.mask = torch.zeros(self.n, length, dtype=torch.long, device=self.lm.device)
        if length > self.slots:
            kvcache.pad_slots(self.cache, length - self.slots)
            self.mask = torch.nn.functional.pad(self.mask, (0, length - self.slots))
        kvcache.write_row(self.cache, i, seq.cache, length)
        self.mask[i] = 0
        self.mask[i, :length] = 1
        self.lengths[i] = length
        seq.cache = None  # the batch holds it now
        self.rows[i] = seq

    @torch.inference_mode()
    def release(self, i: int) -> TokenSequence:
        """Take row ``i``'s sequence out of the batch with its own cache (a copy of its valid
        slots, in order); the row is empty until the next :meth:`adopt`."""
        seq = self.rows[i]
        slots = self.mask[i].nonzero().flatten()  # (len(seq),) its valid slots, in order
        seq.cache = kvcache.copy_row_slots(self.cache, i, slots)
        self.mask[i] = 0
        self.lengths[i] = 0
        self.rows[i] = None
        return seq

    @torch.inference_mode()
    def extend_rows(
        self, rows: list[int], tails: list[list[int]]
    ) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Append ``tails[j]`` (any number of tokens) to row ``rows[j]``: the rows leave the batch
        with their own caches (:meth:`release`), run in ONE padded forward
        (:func:`extend_batch`) and come back (:meth:`adopt`). A conversation's turn, appended
        between one-token steps. Returns each row's hidden states ``(n, d)`` and logits
        ``(n, V)`` of its new positions."""
        seqs = [self.release(i) for i in rows]
        out = extend_batch(self.lm, seqs, tails)
        for i, seq in zip(rows, seqs):
            self.adopt(i, seq)
        return out

    @torch.inference_mode()
    def advance(
        self, tokens: list[int], stepping: list[int] | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Append ``tokens[i]`` to every row ``i`` in ``stepping`` (default: all rows) in ONE
        forward.

        A row not in ``stepping`` sits the step out: its token is run (the batch has one shape)
        but masked out of every later step and not counted, so its sequence is unchanged.

        Returns:
            Hidden states ``(N, d)`` and logits ``(N, V)``; rows that sat out hold meaningless
            values.
        """
        if self.cache is None:
            raise RuntimeError("LockstepBatch.advance() before any adopt(): adopt every row first.")
        stepped = list(range(self.n)) if stepping is None else stepping
        if len(stepped) == self.n:
            column = self._ones
        else:
            column = torch.zeros(self.n, 1, dtype=torch.long)
            column[stepped] = 1
            column = column.to(self.lm.device)
        self.lm.check_length(max(self.lengths[i] for i in stepped) + 1 if stepped else 0)
        self.mask = torch.cat([self.mask, column], dim=1)  # (N, S + 1)
        new = torch.tensor(
            [tokens, self.lengths], device=self.lm.device
        )  # (2, N): new tokens, their positions
        # One new token per row attends to exactly the row's valid slots
        # (see takes_prepared_step_mask).
        mask = self.mask.bool()[:, None, None, :] if self.mask_4d else self.mask
        hidden, logits = self.lm.forward(new[0][:, None], self.cache, mask, new[1][:, None])
        for i in stepped:
            self.lengths[i] += 1
            self.rows[i].ids.append(tokens[i])
        if self.slots - max(self.lengths) > self.slack:
            self.compact()
        return hidden[:, 0], logits[:, 0]

    @torch.inference_mode()
    def compact(self) -> None:
        """Move every row's valid slots to the front and drop the columns no row uses."""
        keep = max(self.lengths)
        # Stable order of slots per row: valid ones first, in their original order.
        order = torch.sort(1 - self.mask, dim=1, stable=True).indices[:, :keep]  # (N, keep)
        kvcache.gather_slots(self.cache, order)
        self.mask = torch.gather(self.mask, 1, order)


@torch.inference_mode()
def greedy_batch(lm: LanguageModel, prompts: list[list[int]], max_new_tokens: int) -> list[str]:
    """:meth:`LanguageModel.greedy` of several prompts: ONE padded prefill, then ONE forward per
    new token for the rows still writing (a :class:`LockstepBatch`; a row stops at EOS).

    Each text equals ``lm.greedy(prompt, max_new_tokens)`` up to float rounding. A shared model's
    memo is read first (remembered prompts run no forward) and holds every new text after.
    """
    texts = [lm.recall_greedy(ids, max_new_tokens) for ids in prompts]
    todo = [i for i, text in enumerate(texts) if text is None]
    if not todo or max_new_tokens < 1:
        return [text if text is not None else "" for text in texts]
    starts = prefill_batch(lm, [prompts[i] for i in todo])
    batch = LockstepBatch(lm, len(todo))
    for row, (seq, _, _) in enumerate(starts):
        batch.adopt(row, seq)
    logits = torch.stack([row_logits for _, _, row_logits in starts])  # (n, V)
    new: list[list[int]] = [[] for _ in todo]
    writing = list(range(len(todo)))
    for step in range(max_new_tokens):
        tokens = logits.argmax(-1).tolist()
        writing = [row for row in writing if tokens[row] not in lm.stop_token_ids]
        for row in writing:
            new[row].append(tokens[row])
        if not writing or step == max_new_tokens - 1:  # the last token needs no forward
            break
        _, logits = batch.advance(tokens, writing)
    for row, i in enumerate(todo):
        texts[i] = lm.decode(new[row]).strip()
        lm.remember_greedy(prompts[i], max_new_tokens, texts[i])
    return texts


@torch.inference_mode()
def sample_turns(
    lm: LanguageModel,
    seqs: list[TokenSequence],
    logits: torch.Tensor,
    pick,
    end_ids: frozenset[int],
    max_new_tokens: int,
) -> list[list[int]]:
    """Continue each sequence (its own cache; ``logits`` ``(R, V)`` its next-token logits) with
    tokens chosen by ``pick(logits) -> list[int]`` until it writes one of ``end_ids`` or
    ``max_new_tokens`` tokens: ONE forward per token for the rows still writing (a
    :class:`LockstepBatch`). Every chosen token, the end token included, is appended to its
    sequence's ids and cache (it is part of the conversation). Returns each row's new tokens."""
    batch = LockstepBatch(lm, len(seqs))
    for row, seq in enumerate(seqs):
        batch.adopt(row, seq)
    new: list[list[int]] = [[] for _ in seqs]
    writing = list(range(len(seqs)))
    while writing and max_new_tokens > 0:
        tokens = pick(logits)
        for row in writing:
            new[row].append(tokens[row])
        _, logits = batch.advance(tokens, writing)
        writing = [
            row for row in writing if tokens[row] not in end_ids and len(new[row]) < max_new_tokens
        ]
    for row in range(len(seqs)):
        batch.release(row)
    return new
