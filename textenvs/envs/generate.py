"""Token-by-token text generation as a Gymnasium environment."""

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
from textenvs.rewards import RewardShaper
from textenvs.tasks import Sample, Task, builtin_task, load_dataset

OBS_MODES = ("last", "mean")
ACTION_MODES = ("vocab", "topk")


def resolve_task(task: str | Task | None, dataset: Any, dataset_kwargs: dict | None) -> Task:
    """The Task an environment runs: ``dataset=`` (file, ``hf:NAME``, samples) wins over ``task=``."""
    if dataset is not None:
        return load_dataset(dataset, **(dataset_kwargs or {}))
    if isinstance(task, Task):
        return task
    return builtin_task(task or "summarize")


def check_choice(name: str, value: Any, choices: Sequence[Any]) -> None:
    if value not in choices:
        raise ValueError(f"{name}={value!r} is not valid: choose one of {list(choices)}.")


def draw_episode(env: gym.Env, options: dict, budget_name: str, budget: int) -> list[int]:
    """Pick an episode's sample (``options["index"]`` or ``env.np_random``) and encode its prompt.

    Sets ``env.index``, ``env.sample`` and ``env.prompt``; checks that the prompt plus ``budget``
    more tokens fit the model's context. Shared by the generation and edit envs.
    """
    if "index" in options:
        index = int(options["index"])
        if not 0 <= index < len(env.samples):
            raise ValueError(f"options['index']={index} is out of range: the split has {len(env.samples)} samples.")
    else:
        index = int(env.np_random.integers(len(env.samples)))
    env.index, env.sample = index, env.samples[index]
    env.prompt = env.task.prompt(env.sample)
    prompt_ids = env.lm.encode(env.prompt)
    if len(prompt_ids) + budget > env.lm.max_positions:
        raise ValueError(
            f"Sample {index}: the prompt has {len(prompt_ids)} tokens and {budget_name}={budget}, more than the "
            f"model's context of {env.lm.max_positions}: shorten the source, lower {budget_name}, or use a model "
            "with a longer context."
        )
    return prompt_ids


def check_can_step(env: gym.Env) -> None:
    """The reset/step contract: a clear error for a step before reset or after the episode ended."""
    if env._seq is None:
        raise ResetNeeded("Cannot call step() before reset(): call env.reset() first.")
    if env._done:
        raise ResetNeeded("The episode has ended (terminated or truncated): call env.reset() before step().")


class TextGenerationEnv(gym.Env):
    """Generate a text one token at a time; the reward is a summarization / translation metric.

    ## Description
    An episode draws one sample (source, references) of the task split, shows the language model
    the prompt (for example ``"Article: <document>\\nHeadline:"``) and lets the agent write the
    continuation token by token. Each step appends the chosen token and runs ONE incremental
    forward of the language model over its KV cache; the whole prefix is never recomputed.

    ## Action Space
    ``action_mode="vocab"``: ``Discrete(V)``, the token id (V = rows of the model's LM head).
    ``action_mode="topk"``: ``Discrete(k)``, action ``i`` is the LM's ``i``-th most likely next
    token at the current position (0 = greedy decoding). The candidates are exposed as
    ``env.unwrapped.candidates``.

    ## Observation Space
    ``Box(-inf, inf, (d,), float32)``, d the model's hidden size, taken from layer ``layer`` of the
    model's ``hidden_states`` (default -1: the final layer after its final norm).
    ``obs="last"``: the hidden state at the last position (the token just written, or the
    prompt's last token after reset). ``obs="mean"``: the mean over all positions, prompt included.

    ## Rewards
    The task metric (``reward``: ``rouge1``, ``rouge2``, ``rougeL``, ``rougeLsum``, ``bleu``,
    ``chrf``, ``ter`` or a callable, see :mod:`textenvs.rewards`) of the generated text against the
    references, in [0, 1] for built-in metrics. ``dense=True`` pays the metric's change every step
    (the rewards of an episode sum to its final metric); ``dense=False`` pays it once at the end,
    and computes it only then: its steps before the last carry no ``info["metrics"]``.
    Optional length / repetition guardrails subtract from the metric (off by default).

    ## Starting State
    A sample drawn uniformly from the split with ``self.np_random``; ``reset(options={"index": i})``
    picks sample ``i`` instead. The prompt is encoded and run once.

    ## Episode End
    Terminated when the agent writes the EOS token or after ``max_new_tokens`` tokens
    (``info["stop"]`` says which). The token budget is part of the task: the text is final and
    scored and no reward can follow, so an agent must not bootstrap past it; ``truncated`` is
    never set by the env itself (an outer ``TimeLimit`` may set it).

    ## Arguments
    ``gym.make("textenvs/Summarize-v0", model="textenvs/tiny", split="train", reward=None,
    dense=True, obs="last", layer=-1, action_mode="vocab", k=8, max_new_tokens=32, device="cpu",
    dtype=None, render_mode=None, length_penalty=0.0, repetition_penalty=0.0)``.
    ``textenvs/Generate-v0`` also takes ``task`` (``"summarize"``, ``"translate"`` or a
    :class:`~textenvs.tasks.Task`) or ``dataset`` (a ``.jsonl`` / ``.csv`` path, ``"hf:NAME"``, a
    list of :class:`~textenvs.tasks.Sample`) with ``dataset_kwargs``. ``reward=None`` uses the
    task's default (ROUGE-L for summarization, BLEU for translation). ``model`` may also be a
    :class:`~textenvs.lm.LanguageModel` instance, shared with the caller (token-level PPO).

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
        obs: str = "last",
        layer: int = -1,
        action_mode: str = "vocab",
        k: int = 8,
        max_new_tokens: int = 32,
        device: str = "cpu",
        dtype: torch.dtype | None = None,
        render_mode: str | None = None,
        length_penalty: float = 0.0,
        repetition_penalty: float = 0.0,
    ) -> None:
        check_choice("obs", obs, OBS_MODES)
        check_choice("action_mode", action_mode, ACTION_MODES)
        check_choice("render_mode", render_mode, [None, *self.metadata["render_modes"]])
        if not (isinstance(max_new_tokens, (int, np.integer)) and max_new_tokens >= 1):
            raise ValueError(f"max_new_tokens must be an int >= 1, got {max_new_tokens!r}.")
        self.task = resolve_task(task, dataset, dataset_kwargs)
        self.samples = self.task.split(split)
        self.lm = lm_backend.load(model, device, dtype, layer)
        if action_mode == "topk" and not (isinstance(k, (int, np.integer)) and 1 <= k <= self.lm.vocab_size):
            raise ValueError(f"k must be an int in [1, {self.lm.vocab_size}] for action_mode='topk', got {k!r}.")
        self.shaper = RewardShaper(
            reward if reward is not None else self.task.default_reward, dense, length_penalty, repetition_penalty
        )
        self.obs_mode, self.action_mode, self.k = obs, action_mode, int(k)
        self.max_new_tokens = int(max_new_tokens)
        self.render_mode = render_mode
        self.action_space = spaces.Discrete(self.k if action_mode == "topk" else self.lm.vocab_size)
        self.observation_space = spaces.Box(-np.inf, np.inf, (self.lm.hidden_size,), np.float32)
        self._seq: lm_backend.Sequence | None = None
        self._done = True

    # -- Gymnasium API ---------------------------------------------------------------------
    def reset(self, *, seed: int | None = None, options: dict | None = None) -> tuple[np.ndarray, dict]:
        prompt_ids = self.begin_reset(seed=seed, options=options)
        return self.finish_reset(*self.lm.prefill(prompt_ids))

    # Reset and step are each split in two so that a vector env can run the forwards of N envs
    # as ONE batch (textenvs.vector): begin_* says what to run, finish_* consumes its output.
    def begin_reset(self, *, seed: int | None = None, options: dict | None = None) -> list[int]:
        """Seed, draw the episode's sample; the prompt's token ids, to prefill."""
        super().reset(seed=seed)
        return draw_episode(self, options or {}, "max_new_tokens", self.max_new_tokens)

    def finish_reset(self, seq: lm_backend.Sequence, hidden: torch.Tensor, logits: torch.Tensor) -> tuple[np.ndarray, dict]:
        """Complete the reset from the prompt's prefill: hidden ``(T, d)``, next-token logits ``(V,)``."""
        self._seq = seq
        self._prompt_len = len(seq)
        # (d,) running sum of hidden states for obs="mean", kept on the host
        self._hidden_sum = hidden.sum(0).cpu() if self.obs_mode == "mean" else None
        self.generated: list[int] = []
        self.text = ""
        self._done = False
        scores = self.shaper.start(self.sample.references)
        return self._observe(hidden[-1], logits), self._info(scores)

    def step(self, action: Any) -> tuple[np.ndarray, float, bool, bool, dict]:
        tokens = self.begin_step(action)
        hidden, logits = self.lm.extend(self._seq, tokens)
        return self.finish_step(hidden, logits)

    def begin_step(self, action: Any) -> list[int]:
        """Check the action; the tokens to append to ``self._seq`` (one token)."""
        check_can_step(self)
        return [self.token_for(action)]

    def finish_step(self, hidden: torch.Tensor, logits: torch.Tensor,
                    candidates: np.ndarray | None = None) -> tuple[np.ndarray, float, bool, bool, dict]:
        """Complete the step from the forward of the new token: hidden ``(1, d)``, logits ``(1, V)``.

        ``candidates``: the top-k token ids of ``logits[-1]`` when the caller has them already (a
        vector env takes the top-k of all its rows at once).
        """
        token = self._seq.ids[-1]
        if self.obs_mode == "mean":
            self._hidden_sum += hidden[-1].cpu()
        eos = token == self.lm.eos_token_id
        if not eos:
            self.generated.append(token)
            self.text = self.lm.decode(self.generated).strip()
        # The token budget is part of the task: the text is final and scored, and no reward can
        # follow, so this is termination (no bootstrapping), not a time-limit truncation
        # (Pardo et al. 2018, "Time Limits in Reinforcement Learning").
        terminated = eos or len(self.generated) >= self.max_new_tokens
        self._done = terminated
        if self.shaper.dense or terminated:
            reward, scores = self.shaper.step(self.text, self._done)
        else:  # terminal reward: the metric is computed once, when the episode ends
            reward, scores = 0.0, None
        info = self._info(scores)
        info["stop"] = "eos" if eos else ("max_new_tokens" if terminated else None)
        return self._observe(hidden[-1], logits[-1], candidates), float(reward), terminated, False, info

    def render(self) -> str | None:
        if self.render_mode != "ansi":
            return None
        if self._seq is None:
            return "(call reset() first)"
        return f"{self.prompt} {self.text}" + (" <end>" if self._done else "")

    # -- helpers ---------------------------------------------------------------------------
    def token_for(self, action: Any) -> int:
        """The token id an action stands for; a clear error for an action outside the space."""
        if isinstance(action, (int, np.integer)) and not isinstance(action, (bool, np.bool_)):
            if 0 <= action < self.action_space.n:  # the common case, checked without the general path
                return int(self.candidates[action]) if self.action_mode == "topk" else int(action)
        try:
            valid = np.ndim(action) == 0 and self.action_space.contains(np.int64(action)) and float(action) == int(action)
        except (TypeError, ValueError, OverflowError):
            valid = False
        if not valid:
            raise ValueError(
                f"Action {action!r} is not in the action space {self.action_space}: give an integer in "
                f"[0, {self.action_space.n - 1}]"
                + (" (index into the top-k candidates)." if self.action_mode == "topk" else " (a token id).")
            )
        action = int(action)
        return int(self.candidates[action]) if self.action_mode == "topk" else action

    def _observe(self, last_hidden: torch.Tensor, logits: torch.Tensor, candidates: np.ndarray | None = None) -> np.ndarray:
        self.logits = logits  # (V,) next-token logits, read by agents that share the forward
        if self.action_mode == "topk":
            self.candidates = logits.topk(self.k).indices.cpu().numpy() if candidates is None else candidates
        vec = last_hidden if self.obs_mode == "last" else self._hidden_sum / len(self._seq)
        return vec.to("cpu", torch.float32).numpy()

    def _info(self, scores: dict[str, float] | None) -> dict:
        info = {
            "prompt": self.prompt,
            "text": self.text,
            "references": list(self.sample.references),
            "index": self.index,
            "tokens": len(self.generated),
        }
        if scores is not None:  # terminal-reward steps before the last compute no metric
            info["metrics"] = scores
        return info
