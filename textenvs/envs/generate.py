"""Token-by-token text generation as a Gymnasium environment."""

from __future__ import annotations

import os
from typing import Any

import numpy as np
import torch
from gymnasium import spaces

from textenvs.checks import check_bool, check_positive_int, renamed_argument
from textenvs.envs.base import TextEnv, finite_observation, top_candidates
from textenvs.kvcache import TokenSequence
from textenvs.lm import CANDIDATE_FEATURES, TINY, LanguageModel

OBS_MODES = ("last", "mean", "context")
# numbers per candidate in a top-k candidate observation: CANDIDATE_FEATURES projected
# output-embedding numbers, then two copy flags (in the prompt, already written)
CANDIDATE_OBS_FEATURES = CANDIDATE_FEATURES + 2


class TextGenerationEnv(TextEnv):
    """Generate a text one token at a time; the reward is a summarization / translation metric.

    ## Description
    An episode draws one sample (source, references) of the task split, shows the language model
    the prompt (for example ``"Article: <document>\\nHeadline:"``) and lets the agent write the
    continuation token by token. Each step appends the chosen token and runs ONE incremental
    forward of the language model over its KV cache; the whole prefix is never recomputed.

    ## Action Space
    ``token_mode="vocab"``: ``Discrete(V)``, the token id (V = rows of the model's LM head).
    ``token_mode="topk"``: ``Discrete(k)``, action ``i`` is the LM's ``i``-th most likely next
    token at the current position (0 = greedy decoding). The candidates are exposed as
    ``env.unwrapped.candidates``. An action must be an integer (Python or NumPy, or a 0-d integer
    array) inside the space; anything else raises ``ValueError``.

    ## Observation Space
    ``Box(-inf, inf, (d,), float32)``, d the model's hidden size, taken from layer ``layer`` of the
    model's ``hidden_states`` (default -1: the final layer after its final norm).
    ``obs="last"``: the hidden state at the last position (the token just written, or the
    prompt's last token after reset). ``obs="mean"``: the mean over all positions, prompt included.

    ``obs="context"``: the hidden states of every position, ``(P d + 1 + k,)`` in top-k mode and
    ``(P d + 1,)`` in vocab mode, P = ``context_positions``: the ``(P, d)`` states of ``prompt +
    text`` row by row (position order, zeros after the last), then the number of positions filled
    (``len(sequence)``), then in top-k mode the k candidates' token ids (action order, exact as
    float32). The states come from the env's own forwards (the prompt's prefill, then each step's
    one new position), so nothing is rerun. With ``layer=-2`` this is the whole input of the
    model's last block: what :class:`agents.last_block.LastBlockPolicy` trains a copy of that block
    on.

    ``candidates_obs=True`` appends what the actions stand for, so an agent can act on the LM's
    own preferences (``agents.sb3.LMPriorPolicy`` starts from them). Top-k mode:
    ``(d + 11 k,)`` = the hidden state, then 10 numbers per candidate (action order): 8 from its
    output-embedding row, unit-normalised and projected by a fixed seeded Gaussian matrix
    (:meth:`~textenvs.lm.LanguageModel.token_features`), then 1.0 / 0.0 whether the token occurs
    in the prompt (a copy feature, as in pointer-generator summarisers) and whether the agent
    already wrote it in this episode; then the k candidates' log-probabilities under the LM
    (action order). Vocab mode: ``(d + V,)`` = the hidden state, then the LM's
    log-probabilities of every token. The last ``action_space.n`` entries are always the actions'
    log-probabilities. With ``obs="context"`` the same block follows the context part instead of
    the hidden state.

    ## Rewards
    The task metric (``reward``: ``rouge1``, ``rouge2``, ``rougeL``, ``rougeLsum``, ``bleu``,
    ``chrf``, ``ter`` or a callable, see :mod:`textenvs.rewards`; or the model-based
    ``bertscore`` and ``classifier`` and a :class:`~textenvs.model_rewards.BatchMetric`, see
    :mod:`textenvs.model_rewards`) of the generated text (the reply alone with a chat template)
    against the references, in [0, 1] for built-in metrics. ``dense=True`` pays the metric's
    change every step (the rewards of an episode sum to its final metric); ``dense=False`` pays it
    once at the end, and computes it only then: its steps before the last carry no
    ``info["metric"]``. The default (``dense=None``) is dense for the string metrics and terminal
    for the model-based ones. A batched vector env scores every sub-env that needs a model-based
    score at a step in one batched forward.
    Optional length / repetition guardrails subtract from the metric (off by default).

    ## Starting State
    A sample drawn uniformly from the split with ``self.np_random``; ``reset(options={"index": i})``
    picks sample ``i`` instead. The prompt is encoded and run once.

    ## Episode End
    Terminated when the agent writes the EOS token (any of the model's
    ``generation_config.eos_token_id``: an instruction-tuned model's end-of-turn tokens too) or
    after ``max_steps`` tokens
    (``info["stop"]`` says which: ``"eos"`` or ``"max_steps"``; ``""`` on the steps before, so the
    info of every step has the same keys and types and vectorising libraries can stack it). The
    token budget is part of the task: the text is final and scored and no reward can follow, so an
    agent must not bootstrap past it; ``truncated`` is never set by the env itself (an outer
    ``TimeLimit`` may set it).

    ## Arguments
    * ``model``: ``"textenvs/tiny"`` (built in), a local ``save_pretrained`` folder, a hub name,
      or a :class:`~textenvs.lm.LanguageModel` shared with the caller (token-level PPO).
    * ``task``: ``"summarize"``, ``"translate"``, a benchmark (``"cnn_dailymail"``, ``"xsum"``,
      ``"wmt16"``, ``"imdb"``, ``"common_gen"``: :mod:`textenvs.tasks.hub`) or a
      :class:`~textenvs.tasks.Task` (``textenvs/Generate-v0``; the other ids fix it).
    * ``dataset``, ``dataset_kwargs``: a ``.jsonl`` / ``.csv`` path, ``"hf:NAME"`` or a list of
      :class:`~textenvs.tasks.Sample`, instead of ``task`` (see
      :func:`textenvs.tasks.load_dataset`). For a benchmark task, ``dataset_kwargs`` configure it
      (:func:`textenvs.tasks.hub.benchmark_task`): ``data_files`` (local files in the hub
      dataset's schema, keyed by its split names), ``pair`` (WMT16: ``"de-en"``, ``"en-ro"``,
      ...), ``prompt_template``, ``revision``, ``cache_dir``.
    * ``split``: ``"train"``, ``"validation"`` or ``"test"``.
    * ``reward``: a metric name, a weighted sum of named metrics (``{"rougeL": 0.25,
      "classifier": 0.75}``) or a callable ``(hypothesis, references) -> float``; None uses the
      task's default (ROUGE-L for summarization, BLEU for translation and CommonGen, the
      sentiment classifier for IMDB).
    * ``reward_kwargs``: the settings of a model-based reward (``{"model": ..., "label": ...}``
      for ``classifier``, ``{"model": ..., "num_layers": ...}`` for ``bertscore``); see
      :mod:`textenvs.model_rewards`.
    * ``dense``: pay the metric's change every step (True), the metric once at the end (False),
      or None (dense for string metrics, terminal for model-based ones).
    * ``obs``: ``"last"``, ``"mean"`` or ``"context"`` (above); ``layer``: which hidden state is
      observed.
    * ``context_positions``: P of ``obs="context"`` (None: the model's context); every prompt of
      the split plus ``max_steps`` must fit in it (``too_long="skip"`` drops those that do not).
    * ``token_mode``: ``"vocab"`` or ``"topk"`` (above); ``k``: candidates in top-k mode.
    * ``max_steps``: tokens per episode at most.
    * ``candidates_obs``: append the candidates' features and log-probabilities (above).
    * ``device``, ``dtype``: where and in which precision the model runs.
    * ``render_mode``: None, ``"ansi"`` (``render()`` returns prompt and text) or
      ``"rgb_array"`` (a 450 x 800 frame: the source, the text so far and the reference under
      their headings, wrapped; for videos, e.g. gymnasium's ``RecordVideo``).
    * ``length_penalty``, ``repetition_penalty``: guardrail weights in [0, 1000]
      (:class:`textenvs.rewards.RewardShaper`).
    * ``text_infos``: True (default) reports the string info keys (``prompt``, ``text``,
      ``reference``, ``metric_name``, ``stop``); False leaves them out, for array-only clients.
    * ``too_long``: what a sample whose prompt plus ``max_steps`` exceeds the context gets:
      ``"error"`` (refused at construction), ``"skip"`` (left out, with a warning) or
      ``"truncate"`` (its source is cut, never the template or the budget; one warning says how
      many samples are; the default of ``CNNDailyMail-v0``, ``XSum-v0``, ``IMDBSentiment-v0``).
    * ``max_prompt_tokens``: with ``too_long="truncate"``, cut every prompt to at most this many
      tokens (RL4LMs' ``max_prompt_length``).
    * ``chat_template``: render each prompt as one user turn of the tokenizer's chat template
      followed by its generation prompt (an instruction-tuned model); a tokenizer without a
      template is refused.
    * ``action_mode``, ``max_new_tokens``: deprecated names of ``token_mode`` and ``max_steps``.

    ## Version History
    * v0: Initial version. The opt-in ``candidates_obs=True`` top-k block gained the two copy
      flags per candidate (8 -> 10 numbers); the opt-in ``obs="context"`` was added; the default
      observation is unchanged. The benchmark ids (``CNNDailyMail-v0``, ``XSum-v0``,
      ``WMT16-v0``, ``IMDBSentiment-v0``, ``CommonGen-v0``), model-based rewards,
      ``too_long="truncate"``, ``max_prompt_tokens`` and ``chat_template`` were added; the
      built-in ids' rewards and observations are unchanged (pinned).
    """

    obs_modes = OBS_MODES

    def __init__(
        self,
        model: str | os.PathLike | LanguageModel = TINY,
        *,
        obs: str = "last",
        token_mode: str = "vocab",
        max_steps: int = 32,
        candidates_obs: bool = False,
        context_positions: int | None = None,
        action_mode: str | None = None,
        max_new_tokens: int | None = None,
        **common: Any,
    ) -> None:
        token_mode = renamed_argument("token_mode", token_mode, "vocab", "action_mode", action_mode)
        max_steps = renamed_argument("max_steps", max_steps, 32, "max_new_tokens", max_new_tokens)
        super().__init__(model, obs=obs, token_mode=token_mode, max_steps=max_steps, **common)
        if obs != "context" and context_positions is not None:
            raise ValueError(
                f"context_positions={context_positions!r} applies to obs='context' only: drop it, "
                "or pass obs='context'."
            )
        self.context_positions = None
        if obs == "context":
            positions = self.lm.max_positions if context_positions is None else context_positions
            positions = check_positive_int("context_positions", positions)
            if positions > self.lm.max_positions:
                raise ValueError(
                    f"context_positions={positions} is more than the context of model "
                    f"{self.lm.name!r} ({self.lm.max_positions} positions): pass at most "
                    f"{self.lm.max_positions}."
                )
            self.context_positions = positions
        self._check_split_fits()
        self.action_space = spaces.Discrete(self.k if token_mode == "topk" else self.lm.vocab_size)
        self.candidates_obs = check_bool("candidates_obs", candidates_obs)
        size = self.lm.hidden_size
        if obs == "context":  # every position's state, their count, the candidates' ids
            size = self.context_positions * size + 1 + (self.k if token_mode == "topk" else 0)
            self._context = np.zeros((self.context_positions, self.lm.hidden_size), np.float32)
        if candidates_obs:  # + features and log-probs of the k candidates, or V log-probs
            size += (
                (CANDIDATE_OBS_FEATURES + 1) * self.k
                if token_mode == "topk"
                else self.lm.vocab_size
            )
        self.observation_space = spaces.Box(-np.inf, np.inf, (size,), np.float32)

    @property
    def action_mode(self) -> str:
        """Deprecated name of :attr:`token_mode`."""
        return self.token_mode

    @property
    def max_new_tokens(self) -> int:
        """Deprecated name of :attr:`max_steps`."""
        return self.max_steps

    def _position_limit(self) -> tuple[int, str, str]:
        if self.obs_mode != "context":
            return super()._position_limit()
        remedy = (
            f"raise context_positions (at most the model's {self.lm.max_positions})"
            if self.context_positions < self.lm.max_positions
            else "use a model with a longer context"  # context_positions is at its largest
        )
        return (
            self.context_positions,
            f"the observed context_positions={self.context_positions}",
            remedy,
        )

    # -- Gymnasium API ---------------------------------------------------------------------
    def reset(
        self, *, seed: int | None = None, options: dict | None = None
    ) -> tuple[np.ndarray, dict]:
        prompt_ids = self.begin_reset(seed=seed, options=options)
        return self.finish_reset(*self.lm.prefill(prompt_ids))

    # Reset is split in two like step (see textenvs.envs.base), so that a vector env runs the
    # prompt forwards of N envs as ONE batch: begin_reset says what to run, finish_reset takes it.
    def begin_reset(self, *, seed: int | None = None, options: dict | None = None) -> list[int]:
        """Seed, draw the episode's sample; the prompt's token ids, to prefill."""
        super().reset(seed=seed)
        return self._draw_episode(options or {})

    def finish_reset(
        self, seq: TokenSequence, hidden: torch.Tensor, logits: torch.Tensor
    ) -> tuple[np.ndarray, dict]:
        """Complete the reset from the prompt's prefill: hidden ``(T, d)``, next-token logits
        ``(V,)``.
        """
        self._sequence = seq
        self._prompt_len = len(seq)
        self._prompt_tokens = frozenset(seq.ids)  # for the candidates' copy flags
        # (d,) running sum of hidden states for obs="mean", kept on the host
        self._hidden_sum = hidden.sum(0).cpu() if self.obs_mode == "mean" else None
        if self.obs_mode == "context":  # (P, d) every position's state, zeros after the prompt
            self._context.fill(0.0)
            self._context[: len(seq)] = hidden.cpu().numpy()
        self.generated: list[int] = []
        self.text = ""
        self._done = False
        self._stop = ""
        scores = self.shaper.start(self.sample.references, prompt=self.prompt)
        return self._observe(hidden[-1], logits), self._info(scores)

    def begin_step(self, action: Any) -> list[int]:
        """Check the action; the tokens to append to :attr:`sequence` (one token)."""
        self._check_can_step()
        self._next_text = None
        self._next_token = self.token_for(action)
        return [self._next_token]

    def pending_score(self) -> tuple[str, tuple[str, ...], str] | None:
        """After :meth:`begin_step`: the ``(text, references, prompt)`` that :meth:`finish_step`
        will score (None: this step pays no score), so a vector env can score all its sub-envs
        in one batch."""
        token = self._next_token
        ends = token in self.lm.stop_token_ids or len(self.generated) + 1 >= self.max_steps
        if not (self.shaper.dense or ends):
            return None
        return (self._step_text(), self.sample.references, self.prompt)

    def _step_text(self) -> str:
        """The text once this step's token is written (the text as it was for a stop token),
        decoded once a step: by :meth:`pending_score` when a vector env asks, else by
        :meth:`finish_step`."""
        if self._next_text is None:
            token = self._next_token
            self._next_text = (
                self.text
                if token in self.lm.stop_token_ids
                else self.lm.decode([*self.generated, token]).strip()
            )
        return self._next_text

    def finish_step(
        self, hidden: torch.Tensor, logits: torch.Tensor, candidates: np.ndarray | None = None
    ) -> tuple[np.ndarray, float, bool, bool, dict]:
        """Complete the step from the forward of the new token: hidden ``(1, d)``, logits ``(1,
        V)``.

        ``candidates``: the top-k token ids of ``logits[-1]`` when the caller has them already (a
        vector env takes the top-k of all its rows at once).
        """
        token = self._sequence.ids[-1]
        if self.obs_mode == "mean":
            self._hidden_sum += hidden[-1].cpu()
        elif self.obs_mode == "context":
            self._context[len(self._sequence) - 1] = hidden[-1].cpu().numpy()
        eos = token in self.lm.stop_token_ids  # EOS, or an end-of-turn token of a chat model
        if not eos:
            self.text = self._step_text()
            self.generated.append(token)
        # The token budget is part of the task: the text is final and scored, and no reward can
        # follow, so this is termination (no bootstrapping), not a time-limit truncation
        # (Pardo et al. 2018, "Time Limits in Reinforcement Learning").
        terminated = eos or len(self.generated) >= self.max_steps
        self._done = terminated
        if self.shaper.dense or terminated:
            reward, scores = self.shaper.step(self.text, self._done)
        else:  # terminal reward: the metric is computed once, when the episode ends
            reward, scores = 0.0, None
        self._stop = "eos" if eos else ("max_steps" if terminated else "")
        info = self._info(scores)
        return (
            self._observe(hidden[-1], logits[-1], candidates),
            float(reward),
            terminated,
            False,
            info,
        )

    # -- helpers ---------------------------------------------------------------------------
    def token_for(self, action: Any) -> int:
        """The token id an action stands for; a clear error for an action outside the space."""
        if type(action) is int or isinstance(
            action, np.integer
        ):  # the common case, without the general path
            if 0 <= action < self.action_space.n:
                return int(self.candidates[action]) if self.token_mode == "topk" else int(action)
        index = int(self._checked_action(action))
        return int(self.candidates[index]) if self.token_mode == "topk" else index

    def _action_hint(self) -> str:
        what = "index into the top-k candidates" if self.token_mode == "topk" else "a token id"
        return f"an integer in [0, {self.action_space.n - 1}] ({what})"

    def _render_text(self) -> str:
        return f"{self.prompt} {self.text}" + (" <end>" if self._done else "")

    def _observe(
        self, last_hidden: torch.Tensor, logits: torch.Tensor, candidates: np.ndarray | None = None
    ) -> np.ndarray:
        self.logits = logits  # (V,) next-token logits, read by agents that share the forward
        if self.token_mode == "topk":
            self.candidates = (
                top_candidates(logits, self.k).cpu().numpy() if candidates is None else candidates
            )
        if self.obs_mode == "context":
            vec = torch.cat(
                [
                    torch.from_numpy(self._context).flatten(),  # a copy: the buffer stays ours
                    torch.tensor([float(len(self._sequence))]),
                    *(
                        [torch.from_numpy(self.candidates.astype(np.float32))]
                        if self.token_mode == "topk"
                        else []
                    ),
                ]
            )
        else:
            vec = last_hidden if self.obs_mode == "last" else self._hidden_sum / len(self._sequence)
            vec = vec.to("cpu", torch.float32)
        if self.candidates_obs:
            parts = [vec]
            if self.token_mode == "topk":  # (k * CANDIDATE_OBS_FEATURES,)
                flags = torch.tensor(
                    [
                        [float(t in self._prompt_tokens), float(t in self.generated)]
                        for t in self.candidates.tolist()
                    ]
                )
                embedded = self.lm.token_features(self.candidates).cpu()
                parts.append(torch.cat([embedded, flags], dim=1).flatten())
            vec = torch.cat([*parts, self._action_logprobs(logits).cpu()])
        return finite_observation(vec.numpy(), self.lm)

    def action_logprobs(self) -> np.ndarray:
        """``(action_space.n,)`` float32: the LM's log-probabilities of the actions at the current
        position (the top-k candidates in action order, or every token); an agent's LM prior."""
        return self._action_logprobs(self.logits).cpu().numpy()

    def _action_logprobs(self, logits: torch.Tensor) -> torch.Tensor:
        logprobs = torch.log_softmax(logits.float(), dim=-1)  # (V,)
        if self.token_mode == "topk":
            return logprobs[torch.as_tensor(self.candidates, device=logprobs.device)]  # (k,)
        return logprobs

    def _env_info(self) -> dict:
        return {"tokens": len(self.generated), "stop": self._stop}  # stop "": not ended
