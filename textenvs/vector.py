"""Batched vector environments: N sub-environments share ONE language-model forward per step.

``gym.make_vec("textenvs/Summarize-v0", num_envs=16)`` builds a :class:`GenerationVectorEnv`
(the ids register it as their ``vector_entry_point``); the edit ids build an
:class:`EditVectorEnv`. Each sub-environment is an ordinary single env (same class, same
keyword arguments, the same language model object). A vector step drives each sub-env through
the protocol of :mod:`textenvs.envs.base`: it asks every sub-env which tokens it appends
(``begin_step``), runs them all through one batched forward instead of each sub-env's
``forward``, and hands each sub-env its slice (``finish_step``). Edit sub-envs keep their own
KV caches and their tails run through :func:`textenvs.batching.extend_batch` (one padded, masked
batch, or a few grouped by tail length where padding would cost more than another forward);
generation sub-envs live in one :class:`textenvs.batching.LockstepBatch`. Generation sub-envs
that (re)start in the same call share one batched forward of their prompts (``begin_reset`` /
``finish_reset``). The vector env reads a sub-env's ``sequence`` and never writes its fields.
Sub-env ``i`` of ``reset(seed=s)`` is seeded ``s + i``, as in gymnasium's ``SyncVectorEnv``, so
it reproduces a single env seeded ``s + i`` exactly.

Autoreset: ``autoreset_mode="NextStep"`` (the default, gymnasium's own for its vector envs, so its
vector wrappers such as ``gymnasium.wrappers.vector.NormalizeObservation`` work unmodified): the
step that ends an episode returns its last observation and info, and the next ``step`` resets
that sub-env, ignoring its action and returning reward 0. ``autoreset_mode="SameStep"``: a
sub-env that ends is reset inside the same ``step``; the returned observation is the new
episode's first, and ``infos["final_obs"]`` / ``infos["final_info"]`` hold the last observation
and info of the episode that ended (masked by ``infos["_final_obs"]``).
``autoreset_mode="Disabled"``: an ended sub-env waits for ``reset(options={"reset_mask": m})``
and stepping it is an error. In every mode ``reset(options={"reset_mask": m})`` resets only the
sub-envs where ``m`` is True (gymnasium's partial reset), which is how :func:`as_sb3_vec_env`
gives Stable-Baselines3 its same-step semantics over any mode. A finished sub-env's cache is
dropped when it resets, so memory stays flat however long the run.

Infos: numbers and booleans only by default (``index``, ``metric``, ``score``, ``tokens``,
``edits``, ...), because TorchRL's ``GymWrapper`` and other array-based clients cannot stack
strings. ``text_infos=True`` adds the sub-envs' string keys (``prompt``, ``text``, ``reference``,
``metric_name``, ``stop``, ``op``), exactly as gymnasium's ``SyncVectorEnv`` over single envs
reports them; the current texts are also ``envs.get_attr("text")`` at any time.
"""

from __future__ import annotations

from typing import Any

import gymnasium as gym
import numpy as np
from gymnasium.vector import AutoresetMode, VectorEnv
from gymnasium.vector.utils import batch_space

from textenvs.batching import (
    RELEASE_AFTER_TOKENS,
    LockstepBatch,
    extend_batch,
    prefill_batch,
)
from textenvs.envs.base import TextEnv, invalid_rows, top_candidates
from textenvs.envs.dialogue import DialogueEnv
from textenvs.envs.edit import TextEditEnv
from textenvs.envs.generate import TextGenerationEnv
from textenvs.system import release_freed_memory


class BatchedTextVectorEnv(VectorEnv):
    """N text environments of one class stepped with one batched LM forward.

    Args:
        num_envs: Number of sub-environments.
        autoreset_mode: ``"NextStep"`` (default), ``"SameStep"`` or ``"Disabled"`` (or a
            ``gymnasium.vector.AutoresetMode``), see the module docstring.
        text_infos: Also report the string-valued info keys (see the module docstring).
        **env_kwargs: Keyword arguments of every sub-environment (``model``, ``task``, ...).
    """

    env_class: type[TextEnv] = TextGenerationEnv

    def __init__(
        self,
        num_envs: int = 1,
        autoreset_mode: str | AutoresetMode = AutoresetMode.NEXT_STEP,
        text_infos: bool = False,
        **env_kwargs: Any,
    ) -> None:
        if not (isinstance(num_envs, (int, np.integer)) and num_envs >= 1):
            raise ValueError(f"num_envs must be an int >= 1, got {num_envs!r}.")
        try:
            mode = AutoresetMode(autoreset_mode)
        except ValueError as e:
            choices = [m.value for m in AutoresetMode]
            raise ValueError(
                f"autoreset_mode={autoreset_mode!r} is not valid: choose one of {choices} (or "
                "a gymnasium.vector.AutoresetMode)."
            ) from e
        self.envs = [self.env_class(text_infos=text_infos, **env_kwargs) for _ in range(num_envs)]
        self.lm = self.envs[0].lm  # shared_model() gives the sub-envs one model object
        self.num_envs = int(num_envs)
        self.metadata = {**self.env_class.metadata, "autoreset_mode": mode}
        self.render_mode = self.envs[0].render_mode
        self.single_observation_space = self.envs[0].observation_space
        self.single_action_space = self.envs[0].action_space
        self.observation_space = batch_space(self.single_observation_space, self.num_envs)
        self.action_space = batch_space(self.single_action_space, self.num_envs)
        self._needs_reset = np.zeros(self.num_envs, dtype=bool)
        self._was_reset = False

    # -- Gymnasium vector API ----------------------------------------------------------------
    def reset(self, *, seed: int | list[int | None] | None = None, options: dict | None = None):
        seeds = self._seeds(seed)
        options = dict(options or {})
        mask = options.pop("reset_mask", None)
        mask = np.ones(self.num_envs, dtype=bool) if mask is None else np.asarray(mask, dtype=bool)
        if mask.shape != (self.num_envs,):
            raise ValueError(
                f"options['reset_mask'] must have shape ({self.num_envs},), got {mask.shape}."
            )
        if not self._was_reset and not mask.all():
            raise ValueError(
                "The first reset() must reset every sub-env: drop options['reset_mask']."
            )
        if not self._was_reset:
            self._obs = np.zeros(self.observation_space.shape, dtype=self.observation_space.dtype)
        indices = np.flatnonzero(mask).tolist()
        per_env = self._per_env_options(options)
        items = []
        for i, (obs, info) in zip(
            indices,
            self._reset_envs(
                indices,
                [seeds[i] for i in indices],
                [per_env[i] for i in indices],
                afresh=bool(mask.all()),
            ),
        ):
            self._obs[i] = obs
            items.append((i, info))
        self._needs_reset[mask] = False
        self._was_reset = True
        return self._obs.copy(), batch_infos(self.num_envs, items)

    def step(self, actions: Any):
        return self._step(actions, restart=True)

    def step_unfinished(self, actions: Any):
        """:meth:`step` for the sub-envs whose episode has not ended; in any autoreset mode, a
        sub-env whose episode ended sits the step out: its action is ignored, it is not reset,
        its reward is 0, ``terminated`` / ``truncated`` are False, its observation is its last
        and the infos hold nothing for it (their ``_key`` masks are False). A sub-env that ends in
        this step returns its last observation and info, as under NextStep, in every mode.

        For a caller that collects one episode per sub-env (``agents.token_ppo``'s rollouts):
        otherwise each ended sub-env would prefill a new episode, only for it to be dropped.
        Ended sub-envs wait for their reset: ``reset(options={"reset_mask": m})`` or, except in
        Disabled mode, the next :meth:`step`.
        """
        return self._step(actions, restart=False)

    def _step(self, actions: Any, restart: bool):
        if not self._was_reset:
            raise gym.error.ResetNeeded(
                "Cannot call step() before reset(): call envs.reset() first."
            )
        actions = self._check_actions(actions)
        rewards = np.zeros(self.num_envs, dtype=np.float64)
        terminated = np.zeros(self.num_envs, dtype=bool)
        truncated = np.zeros(self.num_envs, dtype=bool)
        items = []
        stepping = [i for i in range(self.num_envs) if not self._needs_reset[i]]
        waiting = np.flatnonzero(self._needs_reset).tolist()  # NextStep: this step is their reset
        if restart and waiting:
            if self.metadata["autoreset_mode"] == AutoresetMode.DISABLED:
                raise ValueError(
                    f"Sub-envs {waiting} ended and autoreset is disabled: reset them first with "
                    "envs.reset(options={'reset_mask': mask}) (mask True where a sub-env ended); "
                    "no sub-env was stepped."
                )
            for i, (obs, info) in zip(waiting, self._reset_envs(waiting)):
                self._obs[i] = obs
                items.append((i, info))
            self._needs_reset[:] = False
        # All actions were checked above, so no sub-env is half-stepped when begin_step runs.
        tails = [self.envs[i].begin_step(actions[i]) for i in stepping]
        self._prefetch_scores(stepping)
        results = self._forward(stepping, tails) if stepping else []
        ended = []  # SameStep: (index, last obs, last info) of the episodes to restart in this step
        for i, result in zip(stepping, results):
            obs, rewards[i], terminated[i], truncated[i], info = self.envs[i].finish_step(
                *(result if result is not None else (None, None))
            )
            if terminated[i] or truncated[i]:
                if restart and self.metadata["autoreset_mode"] == AutoresetMode.SAME_STEP:
                    ended.append((i, obs, info))
                    continue
                self._needs_reset[i] = True
            self._obs[i] = obs
            items.append((i, info))
        restarted = self._reset_envs([i for i, _, _ in ended])
        for (i, final_obs, final_info), (obs, info) in zip(ended, restarted):
            info["final_obs"], info["final_info"] = final_obs, final_info
            self._obs[i] = obs
            items.append((i, info))
        infos = batch_infos(self.num_envs, items)
        return self._obs.copy(), rewards, terminated, truncated, infos

    @property
    def autoreset_mode(self) -> AutoresetMode:
        """The autoreset mode (also in ``metadata``), an attribute of gymnasium 1.x vector envs."""
        return self.metadata["autoreset_mode"]

    def render(self) -> tuple | None:
        return tuple(env.render() for env in self.envs)

    def call(self, name: str, *args: Any, **kwargs: Any) -> tuple:
        """Call a method (or read an attribute) of every sub-env, as gymnasium's SyncVectorEnv."""
        out = []
        for env in self.envs:
            attr = getattr(env, name)
            out.append(attr(*args, **kwargs) if callable(attr) else attr)
        return tuple(out)

    def get_attr(self, name: str) -> tuple:
        return tuple(getattr(env, name) for env in self.envs)

    def set_attr(self, name: str, values: Any) -> None:
        values = values if isinstance(values, (list, tuple)) else [values] * self.num_envs
        for env, value in zip(self.envs, values):
            setattr(env, name, value)

    def action_masks(self) -> np.ndarray:
        """The sub-envs' action masks stacked ``(num_envs, ...)`` (edit envs)."""
        return np.stack(self.call("action_masks"))

    # -- helpers -----------------------------------------------------------------------------
    def _per_env_options(self, options: dict) -> list[dict | None]:
        """Each sub-env's reset options: ``options`` for all, except that ``options["index"]``
        may give one sample index per sub-env (a sequence of ``num_envs``: several sub-envs on one
        sample, as a group estimator draws them, in ONE batched reset)."""
        index = options.get("index")
        if index is None or isinstance(index, (int, np.integer)):
            return [options or None] * self.num_envs
        index = list(index)
        if len(index) != self.num_envs:
            raise ValueError(
                f"options['index'] holds {len(index)} indices for {self.num_envs} sub-envs: give "
                "one int for every reset sub-env, or one per sub-env."
            )
        return [{**options, "index": j} for j in index]

    def _reset_envs(
        self,
        indices: list[int],
        seeds: list[int | None] | None = None,
        options: list[dict | None] | None = None,
        afresh: bool = False,
    ) -> list[tuple[np.ndarray, dict]]:
        """Reset the sub-envs ``indices`` (seeded by ``seeds``, with their ``options``); their
        ``(obs, info)`` in order.

        ``afresh``: an explicit ``reset()`` of every sub-env, after which nothing of the history
        may change a float (a batched env then starts its shared state anew).
        """
        seeds = seeds or [None] * len(indices)
        options = options or [None] * len(indices)
        return [
            self.envs[i].reset(seed=seed, options=option)
            for i, seed, option in zip(indices, seeds, options)
        ]

    def _forward(self, stepping: list[int], tails: list[list[int]]) -> list:
        """Run the sub-envs' new tokens: one batched forward over their own caches."""
        return extend_batch(self.lm, [self.envs[i].sequence for i in stepping], tails)

    def _prefetch_scores(self, stepping: list[int]) -> None:
        """A model-based metric scores every stepping sub-env's new text in ONE batched call; the
        sub-envs' finish_step then read their values (the same numbers as scored alone)."""
        shaper = self.envs[0].shaper
        if not shaper.batched or not stepping:
            return
        items = [self.envs[i].pending_score() for i in stepping]
        shaper.metric.prefetch([item for item in items if item is not None])

    def _seeds(self, seed: int | list[int | None] | None) -> list[int | None]:
        if seed is None:
            return [None] * self.num_envs
        if isinstance(seed, (int, np.integer)):
            return [int(seed) + i for i in range(self.num_envs)]
        seeds = list(seed)
        if len(seeds) != self.num_envs:
            raise ValueError(
                f"Got {len(seeds)} seeds for {self.num_envs} sub-envs: give one int or one seed "
                "per sub-env."
            )
        return seeds

    def _check_actions(self, actions: Any) -> np.ndarray:
        arr = np.asarray(actions)
        expected = self.action_space.shape
        if arr.shape != expected:
            raise ValueError(
                f"Expected an action array of shape {expected} (one action of "
                f"{self.single_action_space} per sub-env), got shape {arr.shape}; no sub-env was "
                "stepped."
            )
        if not np.issubdtype(arr.dtype, np.integer):
            shown = np.array2string(arr.ravel()[:4], separator=", ")
            raise ValueError(
                f"Actions must be integers, got dtype {arr.dtype} ({shown}...): cast them with "
                "np.asarray(actions, dtype=np.int64) after checking they are whole; no sub-env "
                "was stepped."
            )
        # Every row, a sub-env about to be reset included: its action is ignored, but an action
        # outside the space is a caller's bug that must not pass silently.
        for i in invalid_rows(self.single_action_space, arr):
            raise ValueError(
                f"Action {arr[i]!r} of sub-env {i} is not in the action space "
                f"{self.single_action_space}; no sub-env was stepped."
            )
        return arr


def batch_infos(num_envs: int, items: list[tuple[int, dict]]) -> dict:
    """The vector ``infos`` of several sub-envs' infos, built in one pass.

    The layout is exactly what gymnasium's ``VectorEnv._add_info`` builds one sub-env at a time
    (one array per key with a ``_key`` mask, nested dicts recursively, ``final_obs`` an object
    array), but every array is created once per step instead of being probed once per sub-env.

    Args:
        num_envs: Length of every array.
        items: ``(sub-env index, info)`` pairs.
    """
    by_key: dict[str, list[tuple[int, Any]]] = {}
    for i, info in items:
        for key, value in info.items():
            by_key.setdefault(key, []).append((i, value))
    out: dict[str, Any] = {}
    for key, entries in by_key.items():
        first = entries[0][1]
        if isinstance(first, dict) and key != "final_obs":
            out[key] = batch_infos(num_envs, entries)
        else:
            if key == "final_obs" or not (
                type(first) in (int, float, bool) or isinstance(first, (np.number, np.ndarray))
            ):
                array = np.full(num_envs, fill_value=None, dtype=object)
            elif isinstance(first, np.ndarray):
                array = np.zeros((num_envs, *first.shape), dtype=first.dtype)
            else:
                array = np.zeros(num_envs, dtype=type(first))
            for i, value in entries:
                array[i] = value
            out[key] = array
        mask = np.zeros(num_envs, dtype=np.bool_)
        mask[[i for i, _ in entries]] = True
        out[f"_{key}"] = mask
    return out


class GenerationVectorEnv(BatchedTextVectorEnv):
    """Batched :class:`~textenvs.envs.generate.TextGenerationEnv` (``vector_entry_point`` of the
    generation ids).

    Every sub-env appends exactly one token per step, so the sub-envs live in one persistent
    batch cache (:class:`~textenvs.batching.LockstepBatch`): a step is one forward with no per-step
    copying of caches; a sub-env's cache moves into its row when it resets. A sub-env waiting for
    its NextStep reset sits the step out: its row is masked, its sequence unchanged.
    """

    env_class = TextGenerationEnv

    def __init__(self, *args: Any, **kwargs: Any) -> None:  # the arguments of the base class
        super().__init__(*args, **kwargs)
        self.batch = LockstepBatch(self.lm, self.num_envs)

    def _reset_envs(
        self,
        indices: list[int],
        seeds: list[int | None] | None = None,
        options: list[dict | None] | None = None,
        afresh: bool = False,
    ) -> list[tuple[np.ndarray, dict]]:
        """Reset sub-envs with ONE batched prefill of their prompts, then move them into the batch
        cache (a new one when ``afresh``).
        """
        if not indices:
            return []
        seeds = seeds or [None] * len(indices)
        options = options or [None] * len(indices)
        prompts = [
            self.envs[i].begin_reset(seed=seed, options=option)
            for i, seed, option in zip(indices, seeds, options)
        ]
        prefilled = prefill_batch(self.lm, prompts)
        if afresh:  # a new batch cache: the floats that follow do not depend on the history
            self.batch = LockstepBatch(self.lm, self.num_envs)
        out = []
        for i, (seq, hidden, logits) in zip(indices, prefilled):
            out.append(self.envs[i].finish_reset(seq, hidden, logits))
            self.batch.adopt(i, seq)
        del prefilled, seq, hidden, logits  # the prefill's batch cache: its rows are adopted
        if sum(map(len, prompts)) >= RELEASE_AFTER_TOKENS and self.lm.device.type == "cpu":
            release_freed_memory()  # the prefill's working memory, not kept resident
        return out

    @property
    def logits(self):
        """Next-token logits of every sub-env ``(N, V)``, from the forward of the last step or
        reset.

        An agent whose policy is the language model itself samples from these, so a generated token
        costs the env's one forward and no second one (``agents.token_ppo``).
        """
        import torch

        return torch.stack([env.logits for env in self.envs])

    def _forward(self, stepping: list[int], tails: list[list[int]]) -> list:
        # A sub-env reset on its own (SB3's env_method("reset", indices=...)) holds a sequence the
        # batch has not adopted yet: take it in before the step.
        for i in stepping:
            if self.batch.rows[i] is not self.envs[i].sequence:
                self.batch.adopt(i, self.envs[i].sequence)
        # rows that sit the step out (NextStep resets) run a masked token
        tokens = [0] * self.num_envs
        for i, tail in zip(stepping, tails):
            tokens[i] = tail[0]
        hidden, logits = self.batch.advance(tokens, stepping)
        hidden = hidden.cpu()  # one device-to-host copy for the whole batch
        rows = list(
            zip(hidden[:, None].unbind(), logits[:, None].unbind())
        )  # (1, d), (1, V) views, made at once
        first = self.envs[0]
        if (
            first.token_mode == "topk"
        ):  # every row's candidates from one top-k and one copy to the host
            candidates = top_candidates(logits, first.k).cpu().numpy()
            return [(*rows[i], candidates[i]) for i in stepping]
        return [rows[i] for i in stepping]


class DialogueVectorEnv(GenerationVectorEnv):
    """Batched :class:`~textenvs.envs.dialogue.DialogueEnv` (``vector_entry_point`` of the
    dialogue ids).

    A step asks the responder for the turns of every sub-env whose agent turn ends at it in ONE
    :meth:`~textenvs.responders.Responder.reply_batch` (an LM responder generates them as one
    batch), then runs the sub-envs that append one token in the persistent batch cache and those
    that append a turn (their last token, the other party's turn and their next header) in one
    padded, masked forward over their own caches (taken out of the batch and put back).
    """

    env_class = DialogueEnv

    def _forward(self, stepping: list[int], tails: list[list[int]]) -> list:
        envs = self.envs
        handoffs = [k for k, i in enumerate(stepping) if envs[i].awaits_reply()]
        tails = list(tails)
        if handoffs:
            conversations = [envs[stepping[k]].conversation_for_reply() for k in handoffs]
            replies = envs[0].responder.reply_batch(conversations)
            if len(replies) != len(conversations):
                raise ValueError(
                    f"Responder {envs[0].responder.name} returned {len(replies)} replies for "
                    f"{len(conversations)} conversations: return one per conversation."
                )
            for k, conversation, reply in zip(handoffs, conversations, replies):
                tails[k] = tails[k] + envs[stepping[k]].take_reply(reply, conversation)
        results: list = [None] * len(stepping)
        single = [k for k, tail in enumerate(tails) if len(tail) == 1]
        if single:
            rows = super()._forward([stepping[k] for k in single], [tails[k] for k in single])
            for k, result in zip(single, rows):
                results[k] = result
        turns = [k for k, tail in enumerate(tails) if len(tail) > 1]
        if turns:
            rows = [stepping[k] for k in turns]
            for i in rows:  # a sub-env reset on its own is not in the batch yet
                if self.batch.rows[i] is not envs[i].sequence:
                    self.batch.adopt(i, envs[i].sequence)
            for k, out in zip(turns, self.batch.extend_rows(rows, [tails[k] for k in turns])):
                results[k] = out
        return results


class EditVectorEnv(BatchedTextVectorEnv):
    """Batched :class:`~textenvs.envs.edit.TextEditEnv` (``vector_entry_point`` of the edit ids)."""

    env_class = TextEditEnv


def as_sb3_vec_env(envs: VectorEnv):
    """A Stable-Baselines3 ``VecEnv`` over a gymnasium vector env in any autoreset mode.

    SB3 expects an ended sub-env to restart inside the step that ended it. ``SameStep`` envs do
    that themselves; over ``NextStep`` (the default of ``gym.make_vec``) or ``Disabled`` envs the
    adapter resets the ended sub-envs at once with ``reset(options={"reset_mask": dones})``, which
    the batched envs and gymnasium's sync / async vector envs support, so the same vector env (with
    gymnasium's vector wrappers around it, if any) serves SB3 and gymnasium clients unmodified.
    """
    from textenvs._sb3 import SB3VecEnvAdapter

    return SB3VecEnvAdapter(envs)
