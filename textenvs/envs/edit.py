"""Token-level text editing (insert / delete / replace) as a Gymnasium environment."""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from gymnasium import spaces
from gymnasium.error import ResetNeeded

from textenvs.batching import greedy_batch
from textenvs.checks import check_bool, check_choice, check_positive_int, renamed_argument
from textenvs.envs.base import TextEnv, finite_observation, top_candidates
from textenvs.lm import TINY, LanguageModel
from textenvs.rewards import check_weight

INSERT, DELETE, REPLACE, STOP = 0, 1, 2, 3
OP_NAMES = ("insert", "delete", "replace", "stop")
START_MODES = ("source", "draft", "empty")
OBS_MODES = ("positions", "pooled")
# a shared model drafts this many consecutive split samples in one batched decoding (see _draft)
DRAFT_CHUNK = 32
# candidates_obs=True: numbers per row j = 0..max_len of the candidate block. For each of the k
# token choices at j: in the prompt, in the text, its LM log-probability at j; then the text's
# token j: present, in the prompt, elsewhere in the text, its LM log-probability at j.
CANDIDATE_NUMBERS, CURRENT_NUMBERS = 3, 4


def candidate_row_size(k: int) -> int:
    """Numbers per row of an edit env's candidate block (``candidates_obs=True``, top-k mode)."""
    return CANDIDATE_NUMBERS * k + CURRENT_NUMBERS


class EditActionCodec:
    """The distinct edits of a ``MultiDiscrete([4, L + 1, K])`` edit space as one index each.

    Only distinct edits are enumerated (delete needs no token, stop no position or token)::

        0                                  stop
        1 + p * K + t                      insert token t before position p   (p in 0..L)
        1 + (L + 1) K + p                  delete position p                  (p in 0..L-1)
        1 + (L + 1) K + L + p * K + t      replace position p by token t      (p in 0..L-1)

    so ``n = 1 + (L + 1) K + L + L K``.
    """

    def __init__(self, max_len: int, n_tokens: int) -> None:
        self.max_len, self.n_tokens = max_len, n_tokens
        L, K = max_len, n_tokens
        self._delete0 = 1 + (L + 1) * K
        self._replace0 = self._delete0 + L
        self.n = self._replace0 + L * K

    def unflatten(self, a: int) -> tuple[int, int, int]:
        K = self.n_tokens
        if a == 0:
            return STOP, 0, 0
        if a < self._delete0:
            return INSERT, (a - 1) // K, (a - 1) % K
        if a < self._replace0:
            return DELETE, a - self._delete0, 0
        return REPLACE, (a - self._replace0) // K, (a - self._replace0) % K

    def flatten(self, op: int, position: int, token: int) -> int:
        K = self.n_tokens
        if op == STOP:
            return 0
        if op == INSERT:
            return 1 + position * K + token
        if op == DELETE:
            return self._delete0 + position
        return self._replace0 + position * K + token

    def mask(self, length: int, tokens: np.ndarray) -> np.ndarray:
        """The exact mask ``(n,)`` for a text of ``length`` tokens; ``tokens``: ``(K,)``, which
        tokens may be written (the same at every position)."""
        K = self.n_tokens
        mask = np.zeros(self.n, dtype=bool)
        mask[0] = True
        if length < self.max_len:
            mask[1 : 1 + (length + 1) * K] = np.tile(tokens, length + 1)
        mask[self._delete0 : self._delete0 + length] = True
        mask[self._replace0 : self._replace0 + length * K] = np.tile(tokens, length)
        return mask


def edit_script(source: Sequence[int], target: Sequence[int]) -> list[tuple[int, int, int]]:
    """A minimal (Levenshtein) edit script turning ``source`` into ``target``.

    Returns ``(op, position, token)`` triples to apply in order; they run from the end of the
    sequence to its start, so each position refers to the text as it is when the edit is applied.
    Delete ignores its token (given as 0).
    """
    n, m = len(source), len(target)
    dist = np.zeros((n + 1, m + 1), dtype=np.int64)
    dist[:, 0] = np.arange(n + 1)
    dist[0, :] = np.arange(m + 1)
    for i in range(1, n + 1):
        for j in range(1, m + 1):
            dist[i, j] = min(
                dist[i - 1, j] + 1,
                dist[i, j - 1] + 1,
                dist[i - 1, j - 1] + (source[i - 1] != target[j - 1]),
            )
    script, i, j = [], n, m
    while i > 0 or j > 0:
        if i > 0 and j > 0 and source[i - 1] == target[j - 1] and dist[i, j] == dist[i - 1, j - 1]:
            i, j = i - 1, j - 1
        elif i > 0 and j > 0 and dist[i, j] == dist[i - 1, j - 1] + 1:
            script.append((REPLACE, i - 1, int(target[j - 1])))
            i, j = i - 1, j - 1
        elif i > 0 and dist[i, j] == dist[i - 1, j] + 1:
            script.append((DELETE, i - 1, 0))
            i -= 1
        else:
            script.append((INSERT, i, int(target[j - 1])))
            j -= 1
    return script


class TextEditEnv(TextEnv):
    """Edit a text token by token (insert, delete, replace) to raise a summarization / translation
    metric.

    ## Description
    The language model reads ``prompt + text`` (for example ``"Article: <document>\\nHeadline:"``
    followed by the current headline) and the agent edits the text. A causal LM's keys and values
    before an edit stay valid, so an edit at text position ``p`` keeps the cache of everything
    before it and recomputes only positions ``>= p`` in one forward (the observation equals a full
    recompute of the new text).

    ## Action Space
    ``MultiDiscrete([4, max_len + 1, n_tokens])``: ``(op, position, token)`` integers with op
    0 = insert ``token`` before text token ``position`` (``position == len`` appends), 1 = delete
    the token at ``position``, 2 = replace the token at ``position`` by ``token``, 3 = stop
    (position
    and token ignored). ``token_mode="vocab"``: ``token`` is a token id (n_tokens = V).
    ``token_mode="topk"``: ``token`` is ``i``, the LM's ``i``-th most likely token at that position
    (n_tokens = k; special tokens are never proposed).

    An action inside the space but impossible for the current text (delete or replace at
    ``position >= len``, insert at ``position > len`` or when the text already has ``max_len``
    tokens, a special token such as EOS in vocab mode) is a **no-op** that costs
    ``invalid_penalty``; the text is never changed by it and ``info["valid"]`` is False.
    ``action_masks()`` marks these as invalid, following sb3-contrib: for this MultiDiscrete space
    the concatenation of one mask per dimension (``4 + max_len + 1 + n_tokens`` booleans), which
    cannot express every joint constraint; :class:`textenvs.wrappers.FlattenEditActions` gives a
    ``Discrete`` space with an exact mask. An action outside the space (a wrong shape, a value out
    of bounds, floats or bools) raises ``ValueError``.

    ``flat_actions=True``: ``Discrete(n)`` instead, one index per distinct edit
    (:class:`EditActionCodec`: ``n = 1 + (L + 1) K + L + L K``), with an exact ``action_masks()``
    of ``n`` booleans. It works in the batched vector env too
    (``gym.make_vec(id, num_envs=N, flat_actions=True)``: ``action_masks()`` is ``(N, n)``, what
    MaskablePPO reads), where gymnasium refuses wrappers such as
    :class:`textenvs.wrappers.FlattenEditActions`.

    ## Observation Space
    ``obs="positions"``: ``Box(-inf, inf, (max_len + 1, d), float32)``. Row ``j`` is the hidden
    state (layer ``layer``) of the position just before text token ``j``, i.e. the state that
    predicts token ``j``: row 0 is the prompt's last token, row ``j`` the text's token ``j - 1``,
    row ``len`` the end of the text. So row ``j`` describes the gap where an insert at ``j`` lands
    and the token a replace at ``j`` overwrites. Rows past ``len`` are zero; ``info["length"]``
    gives ``len``. ``obs="pooled"``: ``Box(-inf, inf, (2 d,), float32)``, the mean of the valid
    rows followed by row ``len`` (the end of the text).

    ``candidates_obs=True`` (top-k mode) adds what the token choices stand for, a block of
    ``c = 3 k + 4`` numbers per row ``j = 0..max_len``: for each of the k choices at ``j`` (action
    order) 1.0 / 0.0 whether the token occurs in the prompt (a copy feature), whether it occurs in
    the text, and its LM log-probability at ``j``; then for the text's token ``j``: 1.0 if there is
    one, whether it occurs in the prompt, whether it occurs elsewhere in the text, and its LM
    log-probability at ``j`` (rows past ``len`` are zero, row ``len`` has no token). ``positions``:
    the block is appended to each row, ``(max_len + 1, d + c)``; ``pooled``: flattened after the
    pooled vector, ``(2 d + (max_len + 1) c,)``. ``agents.lm_prior.EditPriorPolicy`` reads it.

    ## Rewards
    ``dense=True`` (default): each edit pays the change of the score (the task metric minus the
    optional guardrails, see :mod:`textenvs.rewards`) minus ``edit_cost``, so the rewards of an
    episode sum to ``final score - start score - costs``. ``dense=False``: the final score once, at
    the end. Invalid actions pay ``-invalid_penalty``; stop pays 0.

    ## Starting State
    A sample drawn with ``self.np_random`` (``options={"index": i}`` picks one). The text starts as
    ``start``: ``"source"`` (the source text), ``"draft"`` (the LM's greedy continuation of the
    prompt), ``"empty"``, or ``reset(options={"text": "..."})``. A start text longer than
    ``max_len`` tokens is cut to its first ``max_len`` tokens (``info["start_truncated"]``).

    ## Episode End
    Terminated on the stop action or when the metric reaches 1.0 (a reference is matched);
    truncated after ``max_steps`` edits (the env truncates itself: more edits could still raise the
    metric, so an agent may bootstrap past it).

    ## Arguments
    * ``model``, ``task``, ``dataset``, ``dataset_kwargs``, ``split``, ``reward``,
      ``reward_kwargs``, ``dense``, ``layer``, ``device``, ``dtype``, ``length_penalty``,
      ``repetition_penalty``, ``too_long``, ``max_prompt_tokens``, ``chat_template`` (the drafts
      are the chat model's replies), ``text_infos``
      (also leaves out ``start_text`` and ``op``): as in
      :class:`~textenvs.envs.generate.TextGenerationEnv` (``task`` / ``dataset`` for
      ``textenvs/Edit-v0``; the other ids fix the task).
    * ``start``: the starting text, ``"source"``, ``"draft"`` or ``"empty"`` (above).
    * ``max_len``: the longest text in tokens (the position dimension of the space).
    * ``max_steps``: edits per episode at most.
    * ``token_mode``: ``"topk"`` or ``"vocab"`` (above); ``k``: candidates in top-k mode.
    * ``obs``: ``"pooled"`` or ``"positions"`` (above).
    * ``flat_actions``: one ``Discrete`` action per distinct edit with an exact mask (above).
    * ``candidates_obs``: add the token choices' copy flags and log-probabilities (above).
    * ``edit_cost``: subtracted from the reward of every valid edit (a number in [0, 1000]).
    * ``invalid_penalty``: the cost of an impossible edit (a number in [0, 1000]).
    * ``render_mode``: None, ``"ansi"`` (``render()`` returns the edit count and the text) or
      ``"rgb_array"`` (a 450 x 800 frame: the source, the text with its edit count and the
      reference under their headings, wrapped).
    * ``max_edits``: deprecated name of ``max_steps``.

    ## Version History
    * v0: Initial version.
    """

    obs_modes = OBS_MODES

    def __init__(
        self,
        model: str | os.PathLike | LanguageModel = TINY,
        *,
        start: str = "draft",
        max_len: int = 32,
        max_steps: int = 32,
        token_mode: str = "topk",
        obs: str = "pooled",
        edit_cost: float = 0.0,
        invalid_penalty: float = 0.01,
        flat_actions: bool = False,
        candidates_obs: bool = False,
        max_edits: int | None = None,
        **common: Any,
    ) -> None:
        check_choice("start", start, START_MODES)
        flat_actions = check_bool("flat_actions", flat_actions)
        candidates_obs = check_bool("candidates_obs", candidates_obs)
        self.max_len = check_positive_int("max_len", max_len)
        edit_cost, invalid_penalty = (
            check_weight("edit_cost", edit_cost),
            check_weight("invalid_penalty", invalid_penalty),
        )
        max_steps = renamed_argument("max_steps", max_steps, 32, "max_edits", max_edits)
        super().__init__(model, obs=obs, token_mode=token_mode, max_steps=max_steps, **common)
        self._check_split_fits()
        self.start_mode = start
        self.edit_cost, self.invalid_penalty = float(edit_cost), float(invalid_penalty)
        self.n_tokens = self.k if token_mode == "topk" else self.lm.vocab_size
        self.special_ids = sorted(set(self.lm.tokenizer.all_special_ids) | self.lm.stop_token_ids)
        self.codec = EditActionCodec(self.max_len, self.n_tokens)
        self.flat_actions = flat_actions
        self.action_space = (
            spaces.Discrete(self.codec.n)
            if flat_actions
            else spaces.MultiDiscrete([4, self.max_len + 1, self.n_tokens])
        )
        if candidates_obs and token_mode != "topk":
            raise ValueError(
                "candidates_obs=True describes the k token choices of top-k mode: use "
                "token_mode='topk' (in vocab mode every token is a choice)."
            )
        self.candidates_obs = candidates_obs
        d, c = self.lm.hidden_size, candidate_row_size(self.k) if candidates_obs else 0
        rows = self.max_len + 1
        shape = (rows, d + c) if obs == "positions" else (2 * d + rows * c,)
        self.observation_space = spaces.Box(-np.inf, np.inf, shape, np.float32)

    @property
    def max_edits(self) -> int:
        """Deprecated name of :attr:`max_steps`."""
        return self.max_steps

    # -- Gymnasium API ---------------------------------------------------------------------
    def reset(
        self, *, seed: int | None = None, options: dict | None = None
    ) -> tuple[np.ndarray, dict]:
        super().reset(seed=seed)
        options = options or {}
        prompt_ids = self._draw_episode(options)
        self._prompt_len = len(prompt_ids)
        self._prompt_tokens = torch.tensor(prompt_ids)  # the candidate block's copy flags
        self._sequence, hidden, logits = self.lm.prefill(prompt_ids)
        self._rows = hidden[-1:]  # (1, d): row 0, the prompt's last position
        self._row_logits = logits[None]  # (1, V)
        self._row_candidates: torch.Tensor | None = None  # (len + 1, k), on first use
        text_ids = self._start_ids(options)
        self.start_truncated = len(text_ids) > self.max_len
        if text_ids:
            self._append(*self.lm.extend(self._sequence, text_ids[: self.max_len]))
        self.text = self.lm.decode(self.text_ids).strip()
        self.edits, self.valid, self.op = 0, True, None
        self._done = False
        self.start_text = self.text
        scores = self.shaper.start(self.sample.references, self.text, self.prompt)
        return self._observe(), self._info(scores)

    # step() is begin_step, forward, finish_step (textenvs.envs.base);
    # a vector env runs the forwards of all its sub-envs as one batch.
    def begin_step(self, action: Any) -> list[int]:
        """Check and apply the action up to the forward: crop the cache at the edit position.

        Returns the tokens to append to :attr:`sequence` (the new text from the edit position on;
        empty for stop, an invalid edit, or a delete of the last token).
        """
        self._check_can_step()
        if self.flat_actions:
            op, pos, token_index = self.codec.unflatten(int(self._checked_action(action)))
        else:
            op, pos, token_index = (int(x) for x in self._checked_action(action))
        self.edits += 1
        self.op = OP_NAMES[op]
        token = self._token(pos, token_index) if op in (INSERT, REPLACE) else None
        self.valid = self._is_valid(op, pos, token)
        self._edit_pos = None
        self._next_text = self.text
        if not self.valid or op == STOP:
            return []
        ids = self.text_ids
        new = {
            INSERT: ids[:pos] + [token] + ids[pos:],
            DELETE: ids[:pos] + ids[pos + 1 :],
            REPLACE: ids[:pos] + [token] + ids[pos + 1 :],
        }[op]
        self._edit_pos = pos
        self._next_text = self.lm.decode(new).strip()
        self._crop(pos)
        return new[pos:]

    def pending_score(self) -> tuple[str, tuple[str, ...], str] | None:
        """After :meth:`begin_step`: the ``(text, references, prompt)`` that :meth:`finish_step`
        will score (every edit is scored), so a vector env can score all its sub-envs at once."""
        return (self._next_text, self.sample.references, self.prompt)

    def finish_step(
        self,
        hidden: torch.Tensor | None,
        logits: torch.Tensor | None,
        candidates: np.ndarray | None = None,
    ) -> tuple[np.ndarray, float, bool, bool, dict]:
        """Complete the step from the forward of the new tail (``None`` when nothing was run)."""
        if hidden is not None:
            self._append(hidden, logits)
        if self._edit_pos is not None:
            self.text = self._next_text  # the decoded new text, from begin_step
        stop = self.op == "stop"
        scores = self.shaper.score(self.text)
        terminated = stop or scores[self.shaper.name] >= 1.0
        truncated = not terminated and self.edits >= self.max_steps
        self._done = terminated or truncated
        reward, scores = self.shaper.step(self.text, self._done, scores)
        if not stop:
            reward -= self.edit_cost if self.valid else self.invalid_penalty
        return self._observe(), float(reward), terminated, truncated, self._info(scores)

    def action_masks(self) -> np.ndarray:
        """Per-dimension masks, concatenated (sb3-contrib's MultiDiscrete convention): op, position,
        token; with ``flat_actions=True`` the exact mask of the ``Discrete`` space.
        """
        if self._sequence is None:
            raise ResetNeeded("Cannot compute action masks before reset(): call env.reset() first.")
        n = len(self.text_ids)
        if self.flat_actions:
            return self.codec.mask(n, self._writable_tokens())
        can_insert, can_change = n < self.max_len, n > 0
        ops = np.array([can_insert, can_change, can_change, True])
        positions = np.zeros(self.max_len + 1, dtype=bool)
        positions[: n + 1 if can_insert else n] = True
        if not can_insert and not can_change:
            positions[:] = True  # only stop is possible; its position is ignored
        return np.concatenate([ops, positions, self._writable_tokens()])

    def _writable_tokens(self) -> np.ndarray:
        """``(n_tokens,)``: the token choices an insert or replace may write (any position)."""
        tokens = np.ones(self.n_tokens, dtype=bool)
        if self.token_mode == "vocab":
            tokens[self.special_ids] = False
        return tokens

    def valid_actions(self) -> list[tuple[int, int, int]]:
        """Every (op, position, token) that changes the text or stops: the exact joint mask as a
        list.
        """
        n = len(self.text_ids)
        tokens = [
            t
            for t in range(self.n_tokens)
            if self.token_mode == "topk" or t not in self.special_ids
        ]
        acts = [(STOP, 0, 0)]
        if n < self.max_len:
            acts += [(INSERT, p, t) for p in range(n + 1) for t in tokens]
        acts += [(DELETE, p, 0) for p in range(n)]
        acts += [(REPLACE, p, t) for p in range(n) for t in tokens]
        return acts

    def _render_text(self) -> str:
        return (
            f"[{self.edits} edits, last {self.op}{'' if self.valid else ' (invalid)'}] {self.text}"
        )

    def _render_progress(self) -> str:
        last = f", last {self.op}{'' if self.valid else ' (invalid)'}" if self.edits else ""
        return f"{self.edits} of {self.max_steps} edits{last}"

    # -- helpers ---------------------------------------------------------------------------
    @property
    def text_ids(self) -> list[int]:
        """The current text's token ids (the sequence after the prompt)."""
        return self._sequence.ids[self._prompt_len :]

    def _start_ids(self, options: dict) -> list[int]:
        if "text" in options:
            text = options["text"]
            if not isinstance(text, str):
                raise TypeError(f"options['text'] must be a string, got {type(text).__name__}.")
        elif self.start_mode == "source":
            text = self.sample.source
        elif self.start_mode == "draft":
            text = self._draft()
        else:
            text = ""
        return self.lm.encode(" " + text.strip()) if text.strip() else []

    def _draft(self) -> str:
        """The LM's greedy continuation of the prompt (at most ``max_len`` tokens).

        A shared model remembers its drafts, so on its first miss in a chunk of ``DRAFT_CHUNK``
        consecutive split samples it decodes the whole chunk in one batch (:func:`greedy_batch`):
        an env that draws many samples, as training and evaluation do, pays about one batched
        decoding per chunk instead of one decoding per sample. A model the caller passed in (and
        may train) decodes this prompt alone, every time.
        """
        prompt = self._sequence.ids  # the prompt's ids: reset() has prefilled it, no text yet
        if not self.lm.remembers_greedy:
            return self.lm.greedy(prompt, self.max_len)
        text = self.lm.recall_greedy(prompt, self.max_len)
        if text is not None:
            return text
        first = self.index - self.index % DRAFT_CHUNK
        chunk = range(first, min(first + DRAFT_CHUNK, len(self.samples)))
        prompts = [
            prompt if j == self.index else self.prompt_ids_of(self.samples[j])[1] for j in chunk
        ]
        return greedy_batch(self.lm, prompts, self.max_len)[self.index - first]

    def _crop(self, pos: int) -> None:
        """Drop the cache and observation rows from text position ``pos`` on (rows 0..pos stay
        valid).
        """
        self.lm.crop(self._sequence, self._prompt_len + pos)
        self._rows, self._row_logits = self._rows[: pos + 1], self._row_logits[: pos + 1]
        self._row_candidates = None

    def _append(self, hidden: torch.Tensor, logits: torch.Tensor) -> None:
        """Add the rows of newly run text tokens: hidden ``(n, d)``, logits ``(n, V)``."""
        self._rows = torch.cat([self._rows, hidden])  # (len + 1, d)
        self._row_logits = torch.cat([self._row_logits, logits])  # (len + 1, V)
        self._row_candidates = None

    def _action_hint(self) -> str:
        if self.flat_actions:
            return f"an integer edit index in [0, {self.codec.n - 1}] (flat_actions=True)"
        return (
            "(op, position, token) integers with op in 0..3 (insert, delete, replace, stop), "
            f"position in 0..{self.max_len}, token in 0..{self.n_tokens - 1}"
        )

    def _context_budget(self) -> tuple[str, int]:
        return "max_len", self.max_len

    def _largest_k(self) -> int:
        return self.lm.vocab_size - 1  # special tokens are never proposed, EOS at least

    def _token(self, pos: int, token_index: int) -> int:
        if self.token_mode == "vocab" or pos >= len(self._row_logits):
            return token_index
        return int(self.row_candidates()[pos, token_index])

    def row_candidates(self) -> torch.Tensor:
        """``(len + 1, k)``: the token choices of top-k mode at every text position (row ``j``:
        what an insert or replace at ``j`` may write), most likely first, no special tokens."""
        if self._row_candidates is None:  # computed once per text, for all rows at once
            self._row_candidates = top_candidates(self._row_logits, self.k, self.special_ids)
        return self._row_candidates

    def _is_valid(self, op: int, pos: int, token: int | None) -> bool:
        n = len(self.text_ids)
        if op == STOP:
            return True
        if op == INSERT:
            ok = pos <= n and n < self.max_len
        else:
            ok = pos < n
        return ok and (token is None or token not in self.special_ids)

    def _observe(self) -> np.ndarray:
        rows = self._rows.float().cpu()  # (len + 1, d)
        if self.obs_mode == "positions":
            out = torch.zeros(self.max_len + 1, rows.shape[1])
            out[: len(rows)] = rows
        else:
            out = torch.cat([rows.mean(0), rows[-1]])
        if self.candidates_obs:
            block = self._candidate_block()  # (max_len + 1, c)
            if self.obs_mode == "positions":
                out = torch.cat([out, block], 1)
            else:
                out = torch.cat([out, block.flatten()])
        return finite_observation(out.numpy().astype(np.float32), self.lm)

    def _candidate_block(self) -> torch.Tensor:
        """``(max_len + 1, 3 k + 4)``: the rows of the candidate observation (class docstring)."""
        text = torch.tensor(self.text_ids, dtype=torch.long)
        n, k = len(text), self.k
        logprobs = torch.log_softmax(self._row_logits.float(), -1).cpu()  # (n + 1, V)
        candidates = self.row_candidates().cpu()  # (n + 1, k)
        block = torch.zeros(self.max_len + 1, candidate_row_size(k))
        block[: n + 1, 0 : 3 * k : 3] = torch.isin(candidates, self._prompt_tokens).float()
        block[: n + 1, 1 : 3 * k : 3] = torch.isin(candidates, text).float()
        block[: n + 1, 2 : 3 * k : 3] = logprobs.gather(1, candidates)
        block[:n, 3 * k] = 1.0
        block[:n, 3 * k + 1] = torch.isin(text, self._prompt_tokens).float()
        block[:n, 3 * k + 2] = ((text[:, None] == text[None, :]).sum(1) > 1).float()
        block[:n, 3 * k + 3] = logprobs[:n].gather(1, text[:, None])[:, 0]
        return block

    def _env_info(self) -> dict:
        return {
            "start_text": self.start_text,
            "length": len(self.text_ids),
            "edits": self.edits,
            "valid": self.valid,
            "op": self.op or "",  # "" at reset: no edit yet
            "start_truncated": self.start_truncated,
        }
