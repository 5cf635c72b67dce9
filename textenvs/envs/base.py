"""What every textenvs environment shares: its arguments, the episode draw, the reset/step contract.

:class:`TextEnv` is the base of :class:`~textenvs.envs.generate.TextGenerationEnv` and
:class:`~textenvs.envs.edit.TextEditEnv`; it is not registered itself. A subclass says what an
action does to the text and what the agent observes; the base owns everything else.

The protocol a batched vector env (:mod:`textenvs.vector`) drives, the same one ``step`` runs::

    tokens = env.begin_step(action)          # check the action, apply it up to the forward
    hidden, logits = env.forward(tokens)     # the LM over the new tokens, on env.sequence
    obs, reward, terminated, truncated, info = env.finish_step(hidden, logits)

A vector env runs the forwards of all its sub-envs as one batch instead of calling
:meth:`TextEnv.forward`, reading each sub-env's :attr:`TextEnv.sequence`; it never writes an
env's fields. Generation envs split ``reset`` the same way (``begin_reset`` / ``finish_reset``).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from typing import Any

import gymnasium as gym
import numpy as np
import torch
from gymnasium import spaces
from gymnasium.error import ResetNeeded

from textenvs.checks import check_bool, check_choice, check_positive_int
from textenvs.envs.prompts import PromptFitting
from textenvs.kvcache import TokenSequence
from textenvs.lm import TINY, LanguageModel, shared_model
from textenvs.rewards import RewardShaper
from textenvs.tasks import Sample, Task, resolve_task

TOKEN_MODES = ("vocab", "topk")
TOO_LONG_MODES = ("error", "skip", "truncate")


def invalid_rows(space: spaces.Discrete | spaces.MultiDiscrete, actions: np.ndarray) -> np.ndarray:
    """Indices of the rows of ``actions`` ``(N, *space.shape)`` (integers) outside ``space``."""
    if isinstance(space, spaces.Discrete):
        return np.flatnonzero((actions < space.start) | (actions >= space.start + space.n))
    outside = (actions < space.start) | (actions >= space.start + space.nvec)
    return np.flatnonzero(outside.reshape(len(actions), -1).any(axis=1))


def finite_observation(obs: np.ndarray, lm: LanguageModel) -> np.ndarray:
    """``obs`` if every entry is finite; a clear error instead of a NaN or infinity for an agent."""
    if not np.isfinite(obs).all():
        raise FloatingPointError(
            f"The hidden state of model {lm.name!r} (dtype {lm.model.dtype}) holds NaN or infinite "
            "values: run it in float32 (dtype=None or 'float32'), or check its weights."
        )
    return obs


FRAME_SIZE = (800, 450)
"""The ``rgb_array`` frame's ``(width, height)``: the same on every step (video recorders need a
fixed size), 16:9, its text in a 15-pixel font."""


def _wrap(draw_font, text: str, width: float) -> list[str]:
    """``text`` broken into lines no wider than ``width`` pixels in ``draw_font``, at spaces (a
    word wider than the line is cut), keeping its own line breaks."""
    lines = []
    for paragraph in text.split("\n"):
        line = ""
        for word in paragraph.split(" "):
            candidate = f"{line} {word}" if line else word
            if draw_font.getlength(candidate) <= width:
                line = candidate
                continue
            if line:
                lines.append(line)
            while draw_font.getlength(word) > width:  # one word wider than the frame
                cut = max(1, int(len(word) * width / draw_font.getlength(word)) - 1)
                lines.append(word[:cut])
                word = word[cut:]
            line = word
        lines.append(line)
    return lines


def frame_image(sections: Sequence[tuple[str, str, str]], size: tuple[int, int] = FRAME_SIZE):
    """Headed sections drawn on white, each body wrapped to the width: an ``(H, W, 3)`` uint8
    array. A section is ``(title, body, keep)``; where the bodies do not fit the height, the
    longest is shortened first, keeping its ``"start"`` or its ``"end"`` (a conversation's latest
    turns), with an ellipsis where text was left out."""
    from PIL import Image, ImageDraw, ImageFont

    width, height = size
    body_font, title_font = ImageFont.load_default(size=15), ImageFont.load_default(size=13)
    line_h, title_h, margin, gap = 19, 17, 10, 6
    wrapped = [_wrap(body_font, body or " ", width - 2 * margin) for _, body, _ in sections]
    room = (height - 2 * margin - len(sections) * (title_h + gap)) // line_h
    while sum(map(len, wrapped)) > room:
        longest = max(range(len(wrapped)), key=lambda i: len(wrapped[i]))
        lines = wrapped[longest]
        if len(lines) <= 1:
            break
        cut = sum(map(len, wrapped)) - room
        keep = max(1, len(lines) - cut)  # lines kept, the "..." included
        if keep == 1:
            wrapped[longest] = ["..."]
        elif sections[longest][2] == "end":  # a conversation: its latest lines
            wrapped[longest] = ["..."] + lines[-(keep - 1) :]
        else:
            wrapped[longest] = lines[: keep - 1] + ["..."]
    image = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(image)
    y = margin
    for (title, _, _), lines in zip(sections, wrapped):
        draw.text((margin, y), title.upper(), fill=(90, 90, 160), font=title_font)
        y += title_h
        for line in lines:
            if y + line_h > height - margin:
                break
            draw.text((margin, y), line, fill="black", font=body_font)
            y += line_h
        y += gap
    return np.asarray(image, dtype=np.uint8)


def top_candidates(logits: torch.Tensor, k: int, exclude: Sequence[int] = ()) -> torch.Tensor:
    """The ``k`` most likely token ids of ``logits`` ``(..., V)``, most likely first; ``exclude``
    never proposed.
    """
    if len(exclude):
        logits = logits.clone()
        logits[..., list(exclude)] = -torch.inf
    return logits.topk(k).indices


class TextEnv(PromptFitting, gym.Env):
    """Base of the textenvs environments: an LM reads ``prompt + text``, an agent acts on the text.

    Subclasses set the spaces and implement :meth:`begin_step`, :meth:`finish_step`, ``reset`` and
    :meth:`_render_text`. Documented attributes an agent may read: ``lm`` (the
    :class:`~textenvs.lm.LanguageModel`), ``task``, ``samples`` (the split), ``token_mode``, ``k``,
    ``max_steps``, ``sample`` / ``index`` / ``prompt`` (of the current episode), ``sequence`` and
    :meth:`prompt_lengths`.

    Every info carries ``prompt``, ``text``, ``reference`` (the sample's first reference; all of
    them are ``sample.references``), ``index`` and, whenever the metric was computed (every step in
    dense mode, the last step in terminal mode), ``metric`` (the task metric of ``text``, a float),
    ``metric_name``, ``score`` (the metric less the guardrail penalties) and the guardrail terms
    that are on (``length_mismatch``, ``repeated_ngrams``). Info values are numbers, booleans or
    strings, flat, of one type per key on every step and never None, so vectorising libraries
    (gymnasium, TorchRL, Tianshou, RLlib) can stack them. ``text_infos=False`` leaves the
    string keys out (``prompt``, ``text``, ``reference``, ``metric_name`` and the env's own), for
    array-only clients such as TorchRL's ``GymWrapper`` over a vector env; the batched vector envs
    default to it.
    """

    metadata = {"render_modes": ["ansi", "rgb_array"], "render_fps": 4}
    obs_modes: tuple[str, ...] = ()

    def __init__(
        self,
        model: str | os.PathLike | LanguageModel = TINY,
        *,
        task: str | Task | None = "summarize",
        dataset: str | os.PathLike | Sequence[Sample] | Task | None = None,
        dataset_kwargs: dict | None = None,
        split: str = "train",
        reward: str | Callable[[str, Sequence[str]], float] | None = None,
        dense: bool | None = None,
        obs: str,
        layer: int = -1,
        token_mode: str,
        k: int = 8,
        max_steps: int = 32,
        device: str = "cpu",
        dtype: torch.dtype | None = None,
        render_mode: str | None = None,
        length_penalty: float = 0.0,
        repetition_penalty: float = 0.0,
        text_infos: bool = True,
        too_long: str = "error",
        reward_kwargs: dict | None = None,
        chat_template: bool = False,
        max_prompt_tokens: int | None = None,
    ) -> None:
        check_choice("obs", obs, self.obs_modes)
        self.text_infos = check_bool("text_infos", text_infos)
        self.chat_template = check_bool("chat_template", chat_template)
        check_choice("too_long", too_long, TOO_LONG_MODES)
        self.too_long = too_long
        if max_prompt_tokens is not None:
            max_prompt_tokens = check_positive_int("max_prompt_tokens", max_prompt_tokens)
            if too_long != "truncate":
                raise ValueError(
                    f"max_prompt_tokens={max_prompt_tokens} cuts sources: pass "
                    "too_long='truncate' with it, or drop it."
                )
        self.max_prompt_tokens = max_prompt_tokens
        check_choice("token_mode", token_mode, TOKEN_MODES)
        check_choice("render_mode", render_mode, [None, *self.metadata["render_modes"]])
        self.max_steps = check_positive_int("max_steps", max_steps)
        if not isinstance(layer, (int, np.integer)) or isinstance(layer, (bool, np.bool_)):
            raise ValueError(f"layer must be an int (an index into hidden_states), got {layer!r}.")
        check_positive_int("k", k)  # a wrong type is refused in vocab mode too, where k is unused
        self.task = resolve_task(task, dataset, dataset_kwargs)
        self.split, self.samples = split, self.task.split(split)
        self.lm = shared_model(model, device, dtype, layer)
        if self.chat_template:
            self.lm.check_chat_template()
        if reward is None or reward == self.task.default_reward:  # the task's metric settings
            reward_kwargs = {**self.task.reward_kwargs, **(reward_kwargs or {})}
        reward_kwargs = self._lm_score_default(reward, reward_kwargs)
        self.shaper = RewardShaper(
            reward if reward is not None else self.task.default_reward,
            dense,
            length_penalty,
            repetition_penalty,
            reward_kwargs=reward_kwargs,
            device=str(self.lm.device),
        )
        self.obs_mode, self.token_mode, self.render_mode = obs, token_mode, render_mode
        largest = self._largest_k()
        if token_mode == "topk" and not (isinstance(k, (int, np.integer)) and 1 <= k <= largest):
            raise ValueError(
                f"k must be an int in [1, {largest}] for token_mode='topk', got {k!r}."
            )
        self.k = int(k) if token_mode == "topk" else k
        self._sequence: TokenSequence | None = None
        self._done = True

    def _largest_k(self) -> int:
        """The most candidates top-k mode can propose (the rows of the LM head)."""
        return self.lm.vocab_size

    # -- the protocol with textenvs.vector ---------------------------------------------------
    @property
    def sequence(self) -> TokenSequence | None:
        """``prompt + text`` as the LM holds it (ids and KV cache); None before the first reset."""
        return self._sequence

    def begin_step(self, action: Any) -> list[int]:
        """Check ``action``, apply it up to the forward; the tokens to run on :attr:`sequence`."""
        raise NotImplementedError

    def pending_score(self) -> tuple[str, tuple[str, ...], str] | None:
        """After :meth:`begin_step`: the ``(text, references, prompt)`` that :meth:`finish_step`
        will score, or None; what a batched vector env hands a model-based metric for all its
        sub-envs at once (:meth:`textenvs.model_rewards.BatchedMetric.prefetch`)."""
        raise NotImplementedError

    def forward(self, tokens: list[int]) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """Run the LM over ``tokens`` appended to :attr:`sequence`: hidden ``(n, d)``, logits ``(n,
        V)``.

        ``(None, None)`` when there is nothing to run. Overridden by benchmarks' baselines (a full
        recompute); a vector env runs all sub-envs' tokens in one batch instead.
        """
        if not tokens:
            return None, None
        return self.lm.extend(self._sequence, tokens)

    def finish_step(
        self,
        hidden: torch.Tensor | None,
        logits: torch.Tensor | None,
        candidates: np.ndarray | None = None,
    ) -> tuple[np.ndarray, float, bool, bool, dict]:
        """Complete the step from the forward's outputs (``candidates``: top-k ids of the last
        logits).
        """
        raise NotImplementedError

    # -- Gymnasium API ---------------------------------------------------------------------
    def step(self, action: Any) -> tuple[np.ndarray, float, bool, bool, dict]:
        return self.finish_step(*self.forward(self.begin_step(action)))

    def render(self) -> str | np.ndarray | None:
        """``"ansi"``: the text; ``"rgb_array"``: a ``(450, 800, 3)`` uint8 frame (video
        recorders, SB3's ``make_vec_env``) with the source, the text so far and the reference,
        each under its heading, wrapped and legible; None without a render mode."""
        if self.render_mode is None:
            return None
        if self.render_mode == "ansi":
            return "(call reset() first)" if self._sequence is None else self._render_text()
        if self._sequence is None:
            return frame_image([("textenvs", "(call reset() first)", "start")])
        return frame_image(self._render_sections())

    def _render_text(self) -> str:
        raise NotImplementedError

    def _lm_score_default(self, reward, reward_kwargs: dict | None) -> dict | None:
        """``reward="lm_score"`` (alone or in a weighted sum) without a ``model``: the env's own
        model, by name (the metric loads a separate frozen copy: the policy may train this one)."""
        own = {"model": self.lm.name}
        if reward == "lm_score" and "model" not in (reward_kwargs or {}):
            return {**own, **(reward_kwargs or {})}
        if isinstance(reward, dict) and "lm_score" in reward:
            parts = dict(reward_kwargs or {})
            if "model" not in parts.get("lm_score", {}):
                parts["lm_score"] = {**own, **parts.get("lm_score", {})}
            return parts
        return reward_kwargs

    def _render_sections(self) -> list[tuple[str, str, str]]:
        """The ``rgb_array`` frame's ``(title, body, keep)`` sections: the source, the text so far
        (its heading says how far the episode is: :meth:`_render_progress`) and the first
        reference."""
        return [
            ("source", self.sample.source, "start"),
            (f"text, {self._render_progress()}", self.text, "end"),
            ("reference", self.sample.references[0], "start"),
        ]

    def _render_progress(self) -> str:
        """How far the episode is, for the frame's text heading: the tokens written."""
        ended = " (ended)" if getattr(self, "_done", False) else ""
        return f"{len(self._sequence.ids) - self._prompt_len} of {self.max_steps} steps{ended}"

    # -- shared pieces -----------------------------------------------------------------------

    def _draw_episode(self, options: dict) -> list[int]:
        """Pick the episode's sample (``options["index"]`` or ``self.np_random``); its prompt's ids.

        Sets ``index``, ``sample`` and ``prompt``, and checks that the prompt plus the longest text
        the episode can reach fit the model's context.
        """
        if "index" in options:
            index = int(options["index"])
            if not 0 <= index < len(self.samples):
                raise ValueError(
                    f"options['index']={index} is out of range: the split has {len(self.samples)} "
                    "samples."
                )
        else:
            index = int(self.np_random.integers(len(self.samples)))
        self.index, self.sample = index, self.samples[index]
        self.prompt, prompt_ids = self.prompt_ids_of(self.sample)
        budget_name, budget = self._context_budget()
        limit, where, remedy = self._prompt_limit()
        if len(prompt_ids) + budget > limit:
            raise ValueError(
                f"Sample {index}: the prompt has {len(prompt_ids)} tokens and "
                f"{budget_name}={budget}, more than {where}: shorten the source, lower "
                f"{budget_name}, or {remedy}."
            )
        return prompt_ids

    def _check_can_step(self) -> None:
        """The reset/step contract: a clear error for a step before reset or after the episode
        ended.
        """
        if self._sequence is None:
            raise ResetNeeded("Cannot call step() before reset(): call env.reset() first.")
        if self._done:
            raise ResetNeeded(
                "The episode has ended (terminated or truncated): call env.reset() before step()."
            )

    def _checked_action(self, action: Any) -> np.ndarray:
        """``action`` as an int64 array of the action space's shape; a clear error for anything
        else.

        Exactly what the space contains: Python and NumPy integers and integer arrays (not bools,
        floats, strings or objects), each inside the space's bounds.
        """
        space = self.action_space
        try:
            arr = np.asarray(action)
            valid = (
                arr.shape == space.shape
                and np.issubdtype(arr.dtype, np.integer)
                and not len(invalid_rows(space, arr[None]))
            )
        except (TypeError, ValueError, OverflowError):
            valid = False
        if not valid:
            raise ValueError(
                f"Action {action!r} is not in the action space {space}: give {self._action_hint()}."
            )
        return arr.astype(np.int64)

    def _action_hint(self) -> str:
        return "an action inside the space"

    def _info(self, scores: dict[str, float] | None) -> dict:
        """The info of a reset or step: the keys every env reports, the metric keys where
        ``scores`` were computed, the subclass's keys; no strings with ``text_infos=False``.
        """
        info = {
            "prompt": self.prompt,
            "text": self.text,
            "reference": self.sample.references[0],
            "index": self.index,
        }
        if scores is not None:
            info["metric"] = scores[self.shaper.name]
            info["metric_name"] = self.shaper.name
            # the shaped score and the guardrail terms, flat: nested dicts do not stack
            info.update((key, value) for key, value in scores.items() if key != self.shaper.name)
        info.update(self._env_info())
        if not self.text_infos:
            return {key: value for key, value in info.items() if not isinstance(value, str)}
        return info

    def _env_info(self) -> dict:
        """Info keys of this env kind, added to every info."""
        return {}
