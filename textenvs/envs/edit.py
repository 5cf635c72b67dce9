"""Token-level text editing (insert / delete / replace) as a Gymnasium environment."""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from typing import Any

import gymnasium as gym
import numpy as np
import torch
from gymnasium import spaces
from gymnasium.error import ResetNeeded

from textenvs import lm as lm_backend
from textenvs.envs.generate import check_can_step, check_choice, draw_episode, resolve_task
from textenvs.rewards import RewardShaper
from textenvs.tasks import Sample, Task

INSERT, DELETE, REPLACE, STOP = 0, 1, 2, 3
OP_NAMES = ("insert", "delete", "replace", "stop")
START_MODES = ("source", "draft", "empty")
OBS_MODES = ("positions", "pooled")
TOKEN_MODES = ("vocab", "topk")


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
                dist[i - 1, j] + 1, dist[i, j - 1] + 1, dist[i - 1, j - 1] + (source[i - 1] != target[j - 1])
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


class TextEditEnv(gym.Env):
    """Edit a text token by token (insert, delete, replace) to raise a summarization / translation metric.

    ## Description
    The language model reads ``prompt + text`` (for example ``"Article: <document>\\nHeadline:"``
    followed by the current headline) and the agent edits the text. A causal LM's keys and values
    before an edit stay valid, so an edit at text position ``p`` keeps the cache of everything
    before it and recomputes only positions ``>= p`` in one forward (the observation equals a full
    recompute of the new text).

    ## Action Space
    ``MultiDiscrete([4, max_len + 1, n_tokens])``: ``(op, position, token)`` with op
    0 = insert ``token`` before text token ``position`` (``position == len`` appends), 1 = delete
    the token at ``position``, 2 = replace the token at ``position`` by ``token``, 3 = stop (position
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
    ``Discrete`` space with an exact mask.

    ## Observation Space
    ``obs="positions"``: ``Box(-inf, inf, (max_len + 1, d), float32)``. Row ``j`` is the hidden
    state (layer ``layer``) of the position just before text token ``j``, i.e. the state that
    predicts token ``j``: row 0 is the prompt's last token, row ``j`` the text's token ``j - 1``,
    row ``len`` the end of the text. So row ``j`` describes the gap where an insert at ``j`` lands
    and the token a replace at ``j`` overwrites. Rows past ``len`` are zero; ``info["length"]``
    gives ``len``. ``obs="pooled"``: ``Box(-inf, inf, (2 d,), float32)``, the mean of the valid
    rows followed by row ``len`` (the end of the text).

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
    truncated after ``max_edits`` steps (the env truncates itself).

    ## Arguments
    ``gym.make("textenvs/EditSummary-v0", model="textenvs/tiny", split="train", reward=None,
    dense=True, start=..., max_len=32, max_edits=32, token_mode="topk", k=8, obs="pooled",
    layer=-1, edit_cost=0.0, invalid_penalty=0.01, device="cpu", dtype=None, render_mode=None,
    length_penalty=0.0, repetition_penalty=0.0)``; ``textenvs/Edit-v0`` also takes ``task`` or
    ``dataset`` / ``dataset_kwargs`` as the generation envs do.

    ## Version History
    * v0: Initial version.
    """

    metadata = {"render_modes": ["ansi"], "render_fps": 4}

    def __init__(
        self,
        model: str | os.PathLike | lm_backend.LanguageModel = lm_backend.TINY,
        task: str | Task | None = "summarize",
        dataset: str | os.PathLike | Sequence[Sample] | Task | None = None,
        dataset_kwargs: dict | None = None,
        split: str = "train",
        reward: str | Callable[[str, Sequence[str]], float] | None = None,
        dense: bool = True,
        start: str = "draft",
        max_len: int = 32,
        max_edits: int = 32,
        token_mode: str = "topk",
        k: int = 8,
        obs: str = "pooled",
        layer: int = -1,
        edit_cost: float = 0.0,
        invalid_penalty: float = 0.01,
        device: str = "cpu",
        dtype: torch.dtype | None = None,
        render_mode: str | None = None,
        length_penalty: float = 0.0,
        repetition_penalty: float = 0.0,
    ) -> None:
        check_choice("start", start, START_MODES)
        check_choice("obs", obs, OBS_MODES)
        check_choice("token_mode", token_mode, TOKEN_MODES)
        check_choice("render_mode", render_mode, [None, *self.metadata["render_modes"]])
        for name, value in (("max_len", max_len), ("max_edits", max_edits)):
            if not (isinstance(value, (int, np.integer)) and value >= 1):
                raise ValueError(f"{name} must be an int >= 1, got {value!r}.")
        for name, value in (("edit_cost", edit_cost), ("invalid_penalty", invalid_penalty)):
            if not (isinstance(value, (int, float)) and np.isfinite(value) and value >= 0):
                raise ValueError(f"{name} must be a finite number >= 0, got {value!r}.")
        self.task = resolve_task(task, dataset, dataset_kwargs)
        self.samples = self.task.split(split)
        self.lm = lm_backend.load(model, device, dtype, layer)
        if token_mode == "topk" and not (isinstance(k, (int, np.integer)) and 1 <= k < self.lm.vocab_size):
            raise ValueError(f"k must be an int in [1, {self.lm.vocab_size - 1}] for token_mode='topk', got {k!r}.")
        self.shaper = RewardShaper(
            reward if reward is not None else self.task.default_reward, dense, length_penalty, repetition_penalty
        )
        self.start_mode, self.obs_mode, self.token_mode = start, obs, token_mode
        self.max_len, self.max_edits, self.k = int(max_len), int(max_edits), int(k)
        self.edit_cost, self.invalid_penalty = float(edit_cost), float(invalid_penalty)
        self.render_mode = render_mode
        self.n_tokens = self.k if token_mode == "topk" else self.lm.vocab_size
        self.special_ids = sorted(set(self.lm.tokenizer.all_special_ids) | {self.lm.eos_token_id})
        self.action_space = spaces.MultiDiscrete([4, self.max_len + 1, self.n_tokens])
        d = self.lm.hidden_size
        shape = (self.max_len + 1, d) if obs == "positions" else (2 * d,)
        self.observation_space = spaces.Box(-np.inf, np.inf, shape, np.float32)
        self._seq: lm_backend.Sequence | None = None
        self._done = True

    # -- Gymnasium API ---------------------------------------------------------------------
    def reset(self, *, seed: int | None = None, options: dict | None = None) -> tuple[np.ndarray, dict]:
        super().reset(seed=seed)
        options = options or {}
        prompt_ids = draw_episode(self, options, "max_len", self.max_len)
        self._prompt_len = len(prompt_ids)
        self._seq, hidden, logits = self.lm.prefill(prompt_ids)
        self._rows = hidden[-1:]  # (1, d): row 0, the prompt's last position
        self._row_logits = logits[None]  # (1, V)
        text_ids = self._start_ids(options)
        self.start_truncated = len(text_ids) > self.max_len
        if text_ids:
            self._append(*self.lm.extend(self._seq, text_ids[: self.max_len]))
        self.text = self.lm.decode(self.text_ids).strip()
        self.edits, self.valid, self.op = 0, True, None
        self._done = False
        self.start_text = self.text
        scores = self.shaper.start(self.sample.references, self.text)
        return self._observe(), self._info(scores)

    def step(self, action: Any) -> tuple[np.ndarray, float, bool, bool, dict]:
        tail = self.begin_step(action)
        hidden, logits = self.lm.extend(self._seq, tail) if tail else (None, None)
        return self.finish_step(hidden, logits)

    # Split in two like TextGenerationEnv.step, so a vector env batches the forwards of N envs.
    def begin_step(self, action: Any) -> list[int]:
        """Check and apply the action up to the forward: crop the cache at the edit position.

        Returns the tokens to append to ``self._seq`` (the new text from the edit position on;
        empty for stop, an invalid edit, or a delete of the last token).
        """
        check_can_step(self)
        op, pos, token_index = self._parse(action)
        self.edits += 1
        self.op = OP_NAMES[op]
        token = self._token(pos, token_index) if op in (INSERT, REPLACE) else None
        self.valid = self._is_valid(op, pos, token)
        self._edit_pos = None
        if not self.valid or op == STOP:
            return []
        ids = self.text_ids
        new = {INSERT: ids[:pos] + [token] + ids[pos:], DELETE: ids[:pos] + ids[pos + 1 :],
               REPLACE: ids[:pos] + [token] + ids[pos + 1 :]}[op]
        self._edit_pos = pos
        self._crop(pos)
        return new[pos:]

    def finish_step(
        self, hidden: torch.Tensor | None, logits: torch.Tensor | None
    ) -> tuple[np.ndarray, float, bool, bool, dict]:
        """Complete the step from the forward of the new tail (``None`` when nothing was run)."""
        if hidden is not None:
            self._append(hidden, logits)
        if self._edit_pos is not None:
            self.text = self.lm.decode(self.text_ids).strip()
        stop = self.op == "stop"
        scores = self.shaper.score(self.text)
        terminated = stop or scores[self.shaper.name] >= 1.0
        truncated = not terminated and self.edits >= self.max_edits
        self._done = terminated or truncated
        reward, scores = self.shaper.step(self.text, self._done, scores)
        if not stop:
            reward -= self.edit_cost if self.valid else self.invalid_penalty
        return self._observe(), float(reward), terminated, truncated, self._info(scores)

    def action_masks(self) -> np.ndarray:
        """Per-dimension masks, concatenated (sb3-contrib's MultiDiscrete convention): op, position, token."""
        if self._seq is None:
            raise ResetNeeded("Cannot compute action masks before reset(): call env.reset() first.")
        n = len(self.text_ids)
        can_insert, can_change = n < self.max_len, n > 0
        ops = np.array([can_insert, can_change, can_change, True])
        positions = np.zeros(self.max_len + 1, dtype=bool)
        positions[: n + 1 if can_insert else n] = True
        if not can_insert and not can_change:
            positions[:] = True  # only stop is possible; its position is ignored
        tokens = np.ones(self.n_tokens, dtype=bool)
        if self.token_mode == "vocab":
            tokens[self.special_ids] = False
        return np.concatenate([ops, positions, tokens])

    def valid_actions(self) -> list[tuple[int, int, int]]:
        """Every (op, position, token) that changes the text or stops: the exact joint mask as a list."""
        n = len(self.text_ids)
        tokens = [t for t in range(self.n_tokens) if self.token_mode == "topk" or t not in self.special_ids]
        acts = [(STOP, 0, 0)]
        if n < self.max_len:
            acts += [(INSERT, p, t) for p in range(n + 1) for t in tokens]
        acts += [(DELETE, p, 0) for p in range(n)]
        acts += [(REPLACE, p, t) for p in range(n) for t in tokens]
        return acts

    def render(self) -> str | None:
        if self.render_mode != "ansi":
            return None
        if self._seq is None:
            return "(call reset() first)"
        return f"[{self.edits} edits, last {self.op}{'' if self.valid else ' (invalid)'}] {self.text}"

    # -- helpers ---------------------------------------------------------------------------
    @property
    def text_ids(self) -> list[int]:
        return self._seq.ids[self._prompt_len :]

    def _start_ids(self, options: dict) -> list[int]:
        if "text" in options:
            text = options["text"]
            if not isinstance(text, str):
                raise TypeError(f"options['text'] must be a string, got {type(text).__name__}.")
        elif self.start_mode == "source":
            text = self.sample.source
        elif self.start_mode == "draft":
            text = self.lm.greedy(self._seq.ids, self.max_len)
        else:
            text = ""
        return self.lm.encode(" " + text.strip()) if text.strip() else []

    def _crop(self, pos: int) -> None:
        """Drop the cache and observation rows from text position ``pos`` on (rows 0..pos stay valid)."""
        self.lm.crop(self._seq, self._prompt_len + pos)
        self._rows, self._row_logits = self._rows[: pos + 1], self._row_logits[: pos + 1]

    def _append(self, hidden: torch.Tensor, logits: torch.Tensor) -> None:
        """Add the rows of newly run text tokens: hidden ``(n, d)``, logits ``(n, V)``."""
        self._rows = torch.cat([self._rows, hidden])  # (len + 1, d)
        self._row_logits = torch.cat([self._row_logits, logits])  # (len + 1, V)

    def _parse(self, action: Any) -> tuple[int, int, int]:
        try:
            arr = np.asarray(action)
            valid = (
                arr.shape == (3,) and np.issubdtype(arr.dtype, np.number) and np.all(arr == np.floor(arr))
                and self.action_space.contains(arr.astype(np.int64))
            )
        except (TypeError, ValueError, OverflowError):
            valid = False
        if not valid:
            raise ValueError(
                f"Action {action!r} is not in the action space {self.action_space}: give (op, position, token) "
                f"integers with op in 0..3 (insert, delete, replace, stop), position in 0..{self.max_len}, "
                f"token in 0..{self.n_tokens - 1}."
            )
        op, pos, tok = (int(x) for x in arr)
        return op, pos, tok

    def _token(self, pos: int, token_index: int) -> int:
        if self.token_mode == "vocab" or pos >= len(self._row_logits):
            return token_index
        logits = self._row_logits[pos].clone()
        logits[self.special_ids] = -torch.inf
        return int(logits.topk(self.k).indices[token_index])

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
        rows = self._rows  # (len + 1, d)
        if self.obs_mode == "positions":
            out = torch.zeros(self.max_len + 1, rows.shape[1])
            out[: len(rows)] = rows
        else:
            out = torch.cat([rows.mean(0), rows[-1]])
        return out.cpu().numpy().astype(np.float32)

    def _info(self, scores: dict[str, float]) -> dict:
        return {
            "prompt": self.prompt,
            "text": self.text,
            "start_text": self.start_text,
            "references": list(self.sample.references),
            "metrics": scores,
            "length": len(self.text_ids),
            "edits": self.edits,
            "valid": self.valid,
            "op": self.op,
            "index": self.index,
            "start_truncated": self.start_truncated,
        }
