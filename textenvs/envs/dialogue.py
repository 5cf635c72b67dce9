"""Multi-turn dialogue as a Gymnasium environment: the agent writes its turns token by token, the
other party answers between them, and the KV cache and token ids are kept across turns."""

from __future__ import annotations

import math
import os
import weakref
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch

from textenvs.chat import turn_format
from textenvs.checks import check_positive_int
from textenvs.envs.generate import TextGenerationEnv
from textenvs.kvcache import TokenSequence
from textenvs.lm import TINY, LanguageModel
from textenvs.responders import Conversation, checked_reply, make_responder
from textenvs.rewards import get_metric, metric_name
from textenvs.tasks.dialogue import Dialogue, DialogueTask, resolve_dialogue_task
from textenvs.tasks.loaders import SampleSubset

STOPS = ("responder", "max_turns", "max_steps", "context")
TURN_ENDS = ("eos", "max_turn_tokens", "max_steps")
_OPENING_LENGTHS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


class DialogueEnv(TextGenerationEnv):
    """A conversation: the agent speaks one role, token by token; the other party answers.

    ## Description
    An episode draws one recorded conversation (a :class:`~textenvs.tasks.dialogue.Dialogue`) and
    opens it: the messages before the agent's first turn (a system message, the user's first
    question), rendered through the model's chat template (``chat_template=True``) or as plain
    lines ``"User: ...\\n"`` (:mod:`textenvs.chat`), followed by the agent's header. The agent then
    writes its turn one token per step, each step ONE incremental forward over the KV cache, as in
    :class:`~textenvs.envs.generate.TextGenerationEnv`. When its turn ends (it writes an
    end-of-turn token, or the turn reaches ``max_turn_tokens``), the other party (``responder``)
    answers, and the step appends the closing of the agent's turn, the answer and the agent's next
    header with the agent's last token in ONE forward over those new tokens only. The history is
    never re-encoded or re-tokenized: the ids are the tokens the agent wrote and the template's
    tokens of what the other party said.

    ## Action Space
    As the generation env: ``Discrete(V)`` (``token_mode="vocab"``) or ``Discrete(k)``
    (``token_mode="topk"``, the LM's k most likely next tokens).

    ## Observation Space
    As the generation env (``obs="last"``, ``"mean"``, ``"context"``; ``candidates_obs``), over the
    whole conversation so far: after a turn ends, the observation is the hidden state at the
    agent's next header, with the other party's answer in the context. The copy flags of
    ``candidates_obs`` mark tokens of the opening and of the other party's turns.

    ## Rewards
    * Per agent turn: the task metric (``reward``, any metric of the generation env, or a weighted
      sum of named ones, ``{"rougeL": 0.25, "classifier": 0.75}``) of the turn's text against that
      turn's recorded reference, dense within the turn (its rewards sum to the turn's metric) or
      once at its end (``dense=False``); a turn without a recorded reference (past the
      recording) pays none.
    * The responder's own reward (:class:`~textenvs.responders.Reply`'s ``reward``), at the step
      that ended the turn it judges.
    * Per conversation, ``conversation_reward``: a callable ``(Conversation) -> float`` or a
      metric name (the agent's turns joined by newlines against its recorded turns joined), paid at
      the last step.

    A step's reward is their sum; every part is a finite number (else a clear error).

    ## Starting State
    A conversation drawn uniformly from the split with ``self.np_random`` (``options["index"]``
    picks one); its opening is encoded and run once.

    ## Episode End
    Terminated when the other party ends the conversation (the recording has no turn left for the
    agent, or a responder returns ``Reply(..., end=True)``): ``info["stop"] == "responder"``; when
    the agent has played ``max_turns`` turns: ``"max_turns"``; when it has written ``max_steps``
    tokens in all: ``"max_steps"``; or when the context is full: ``"context"``. The context
    rule: the other party's turn is appended only if, after it, the agent's next turn of
    ``max_turn_tokens`` still fits (the model's context, or ``context_positions``); otherwise
    the conversation ends before that turn, which is not appended (an LM responder whose own
    model has no room ends it the same way). A turn in progress therefore always fits.

    ## Arguments
    * ``model``, ``device``, ``dtype``, ``layer``, ``obs``, ``token_mode``, ``k``,
      ``candidates_obs``, ``context_positions``, ``render_mode``, ``text_infos``,
      ``reward_kwargs``, ``length_penalty``, ``repetition_penalty``: as the generation env.
    * ``task``: ``"briefing"`` (built in), ``"daily_dialog"`` (DailyDialog from the hub, or local
      files in its schema through ``dataset_kwargs={"data_files": ...}``; ``"context": 5`` gives
      RL4LMs' one-turn setting: :func:`~textenvs.tasks.dialogue.daily_dialog_task`) or a
      :class:`~textenvs.tasks.dialogue.DialogueTask`;
      ``dataset``: a JSON Lines file of ``{"messages": [...]}`` conversations, a list of
      ``Dialogue``, or a dict of those per split, instead (``dataset_kwargs``:
      ``split_fractions``, ``split_seed``, ``default_reward``); ``agent_role``: the role the
      agent plays in a file's conversations (default ``"assistant"``; a line's ``"agent_role"``
      wins).
    * ``split``: ``"train"``, ``"validation"`` or ``"test"``.
    * ``responder``: ``"data"`` (default), ``"lm"`` or a callable / Responder
      (:mod:`textenvs.responders`); ``responder_kwargs``: the arguments of ``"lm"``
      (:class:`~textenvs.responders.LMResponder`).
    * ``max_turns``: the agent's turns at most (default 8); ``max_turn_tokens``: tokens per agent
      turn at most (default 24); ``max_steps``: the agent's tokens in all its turns at most
      (default ``max_turns * max_turn_tokens``, no cap of its own).
    * ``reward``, ``dense``: the per-turn metric (default: the task's, ROUGE-L) and its shaping;
      ``conversation_reward``: above.
    * ``chat_template``: render the turns through the tokenizer's chat template (the agent is its
      ``assistant``); a template that rewrites earlier turns is refused
      (:class:`~textenvs.chat.TemplateRewriteError`). False: the plain line format.
    * ``too_long``: ``"error"`` (default) or ``"skip"`` for conversations whose opening plus one
      turn does not fit the context (cutting conversations is not supported).

    ## Info
    Besides the generation env's keys (``prompt``: the opening as text, ``text``: the agent's
    current turn, or the turn that this step ended; ``reference``: that turn's reference, ``""``
    without one; ``index``; the metric keys whenever a turn's metric is computed, where
    ``metric`` is the conversation's so far, the mean over the agent's scored turns with the
    current one at its current value, so the last step's is the episode's task metric, and
    ``turn_metric`` the current turn's): ``turn`` (the index of the agent's
    turn that the step's token belongs to), ``turns`` (agent turns finished), ``tokens`` (tokens
    of the current turn), ``turn_end`` (``"eos"``, ``"max_turn_tokens"``, ``"max_steps"`` or
    ``""``), ``reply``
    (the other party's turn appended at this step, or ``""``), ``speaker`` (whose turn it is
    after the step: the agent's role, or ``""`` once the conversation ended), ``stop``
    (``"responder"``, ``"max_turns"``, ``"max_steps"``, ``"context"`` or ``""``),
    ``responder_reward`` and
    ``conversation_reward`` (0.0 where none was paid).

    ## For trainers
    ``env.unwrapped.sequence.ids`` is the conversation's token ids and
    ``env.unwrapped.agent_mask()`` marks with True the tokens the agent chose (its actions, end
    of turn included): what TRL's and verl's multi-turn rollouts call the response or loss mask;
    the template's tokens and the other party's are False. ``env.unwrapped.conversation`` is the
    finished messages, as chat ``{"role", "content"}`` dicts.

    ## Version History
    * v0: Initial version.
    """

    def __init__(
        self,
        model: str | os.PathLike | LanguageModel = TINY,
        *,
        task: str | DialogueTask | None = "briefing",
        dataset: str | os.PathLike | Sequence[Dialogue] | dict | None = None,
        dataset_kwargs: dict | None = None,
        agent_role: str = "assistant",
        responder: Any = "data",
        responder_kwargs: dict | None = None,
        max_turns: int = 8,
        max_turn_tokens: int = 24,
        max_steps: int | None = None,
        conversation_reward: str | Callable[[Conversation], float] | None = None,
        too_long: str = "error",
        **common: Any,
    ) -> None:
        for name in ("max_new_tokens", "max_prompt_tokens", "action_mode"):
            if name in common:
                raise ValueError(
                    f"{name}= is not an argument of the dialogue envs: a turn's length is "
                    "max_turn_tokens=, a conversation's is max_turns= (and max_steps=, the "
                    "agent's tokens in all its turns)."
                )
        if too_long == "truncate":
            raise ValueError(
                "too_long='truncate' cuts a single source; a conversation is not cut: pass "
                "too_long='skip' (conversations that do not fit are left out) or 'error'."
            )
        self.max_turns = check_positive_int("max_turns", max_turns)
        self.max_turn_tokens = check_positive_int("max_turn_tokens", max_turn_tokens)
        self._formats: dict[str, Any] = {}
        resolved = resolve_dialogue_task(task, dataset, dataset_kwargs, agent_role)
        if max_steps is None:
            max_steps = self.max_turns * self.max_turn_tokens
        super().__init__(model, task=resolved, max_steps=max_steps, too_long=too_long, **common)
        self.other_role = "user"
        self.responder = make_responder(responder, responder_kwargs)
        self.responder.bind(self)
        if conversation_reward is None or callable(conversation_reward):
            self._conversation_metric = None
        else:
            self._conversation_metric = get_metric(conversation_reward)
        self.conversation_reward = conversation_reward

    # -- formats and openings ---------------------------------------------------------------
    def format_for(self, role: str):
        """The turn format (:mod:`textenvs.chat`) in which the agent writes as ``role``."""
        if role not in self._formats:
            self._formats[role] = turn_format(self.lm, role, self.chat_template)
        return self._formats[role]

    def opening_ids(self, sample: Dialogue) -> list[int]:
        """The ids an episode of ``sample`` starts from: its opening and the agent's header."""
        return self.format_for(sample.agent_role).opening_ids(sample.opening)

    def prompt_ids_of(self, sample: Dialogue) -> tuple[str, list[int]]:
        return sample.source, self.opening_ids(sample)

    def _context_budget(self) -> tuple[str, int]:
        return "max_turn_tokens", self.max_turn_tokens

    def _check_split_fits(self) -> None:
        """Refuse (or skip, ``too_long="skip"``) conversations whose opening and one agent turn do
        not fit the context; the openings are encoded once per process per split."""
        budget_name, budget = self._context_budget()
        limit, where, remedy = self._prompt_limit()
        if budget >= limit:
            raise ValueError(
                f"{budget_name}={budget} leaves no room for a conversation in {where}: lower it."
            )
        per_task = _OPENING_LENGTHS.setdefault(self.task, {})
        key = (self.split, self.lm.name, self.chat_template)
        if key not in per_task:
            per_task[key] = np.asarray([len(self.opening_ids(s)) for s in self.samples], np.int32)
        lengths = per_task[key]
        fits = lengths + budget <= limit
        self._prompt_lengths = lengths[fits]
        over = np.flatnonzero(~fits)
        if not len(over):
            return
        what = (
            f"{len(over)} of the {len(lengths)} conversations of split {self.split!r} (first "
            f"{over[:5].tolist()}; the longest opening has {int(lengths.max())} tokens) do not "
            f"fit {where} with {budget_name}={budget}"
        )
        if self.too_long == "error" or len(over) == len(lengths):
            raise ValueError(
                f"{what}: shorten them, pass too_long='skip', lower {budget_name}, or {remedy}."
            )
        import warnings

        warnings.warn(f"{what}; skipped (too_long='skip').", UserWarning, stacklevel=4)
        self.samples = SampleSubset(self.samples, np.flatnonzero(fits))

    # -- reset ------------------------------------------------------------------------------
    def finish_reset(
        self, seq: TokenSequence, hidden: torch.Tensor, logits: torch.Tensor
    ) -> tuple[np.ndarray, dict]:
        """Complete the reset from the opening's prefill: hidden ``(T, d)``, logits ``(V,)``."""
        self._sequence = seq
        self._prompt_len = len(seq)
        self._prompt_tokens = set(seq.ids)  # grows with the other party's turns (copy flags)
        self._hidden_sum = hidden.sum(0).cpu() if self.obs_mode == "mean" else None
        if self.obs_mode == "context":
            self._context.fill(0.0)
            self._context[: len(seq)] = hidden.cpu().numpy()
        self.format = self.format_for(self.sample.agent_role)
        self.agent_role = self.sample.agent_role
        self._messages: list[tuple[str, str]] = list(self.sample.opening)
        self._mask = [False] * len(seq)
        self.generated: list[int] = []  # every agent token of the episode (copy flags)
        self._turn_ids: list[int] = []
        self.turn = 0
        self.text = ""
        self._done = False
        self._stop = ""
        self._turn_end, self._reply_text = "", ""
        self._responder_reward = self._conversation_reward = 0.0
        self._turn_metrics: list[float] = []  # each scored turn's final metric
        self._responder_state: dict = {}
        self.responder.start(self._responder_state, self.np_random)
        scores = self._start_turn()
        return self._observe(hidden[-1], logits), self._info(scores)

    def _start_turn(self) -> dict | None:
        """Begin the agent's turn ``self.turn``: the shaper against its reference, if any."""
        self._turn_ids = []
        self.text = ""
        references = self.turn_references()
        if not references:
            return None
        return self.shaper.start(references, prompt=self._transcript())

    def turn_references(self) -> tuple[str, ...]:
        """The recorded reference of the agent's current turn (empty past the recording)."""
        refs = self.sample.references
        return (refs[self.turn],) if self.turn < len(refs) else ()

    # -- step -------------------------------------------------------------------------------
    def step(self, action: Any) -> tuple[np.ndarray, float, bool, bool, dict]:
        tokens = self.begin_step(action)
        if self.awaits_reply():
            conversation = self.conversation_for_reply()
            reply = self.responder.reply_batch([conversation])[0]
            tokens = tokens + self.take_reply(reply, conversation)
        return self.finish_step(*self.forward(tokens))

    def begin_step(self, action: Any) -> list[int]:
        """Check the action; the agent's token (the other party's turn is added by
        :meth:`take_reply` when :meth:`awaits_reply`)."""
        self._check_can_step()
        self._next_token = self.token_for(action)
        self._next_text = None
        self._pending: tuple | None = None
        if self._next_token in self.format.end_token_ids:
            self._ending = "eos"
        elif len(self._turn_ids) + 1 >= self.max_turn_tokens:
            self._ending = "max_turn_tokens"
        elif len(self.generated) + 1 >= self.max_steps:
            self._ending = "max_steps"
        else:
            self._ending = ""
        return [self._next_token]

    def awaits_reply(self) -> bool:
        """After :meth:`begin_step`: whether this step ends the agent's turn with the conversation
        going on, so the other party must answer."""
        return (
            bool(self._ending)
            and self.turn + 1 < self.max_turns
            and len(self.generated) + 1 < self.max_steps
        )

    def _step_text(self) -> str:
        """The agent's turn once this step's token is written."""
        if self._next_text is None:
            self._next_text = self.format.content_of([*self._turn_ids, self._next_token])
        return self._next_text

    def conversation_for_reply(self) -> Conversation:
        """What the responder sees: the finished messages, the agent's turn just ended last."""
        messages = [*self._messages, (self.agent_role, self._step_text())]
        return Conversation(
            messages=[{"role": role, "content": content} for role, content in messages],
            agent_role=self.agent_role,
            other_role=self.other_role,
            turn=self.turn + 1,
            sample=self.sample,
            index=self.index,
            state=self._responder_state,
        )

    def take_reply(self, reply: Any, conversation: Conversation) -> list[int]:
        """Check the responder's reply to the turn ending at this step; the tokens to append after
        the agent's token (the closing of its turn, the reply, its next header), or ``[]`` when
        the conversation ends here. Nothing is changed before :meth:`finish_step`."""
        reply = checked_reply(self.responder.name, reply, conversation)
        if reply.text is None:
            self._pending = (reply, [], reply.stop)
            return []
        messages = [(reply.role or self.other_role, reply.text), *reply.more]
        end_token = self._next_token if self._ending == "eos" else None
        tail = self.format.tail_ids(self._messages, self._step_text(), end_token, messages)
        limit = self._prompt_limit()[0]
        if len(self._sequence) + 1 + len(tail) + self.max_turn_tokens > limit:
            self._pending = (reply, [], "context")  # the turn is not appended
            return []
        self._pending = (reply, messages, "responder" if reply.end else "")
        return tail

    def pending_score(self) -> tuple[str, tuple[str, ...], str] | None:
        references = self.turn_references()
        if not references or not (self.shaper.dense or self._ending):
            return None
        return (self._step_text(), references, self._transcript())

    def finish_step(
        self, hidden: torch.Tensor, logits: torch.Tensor, candidates: np.ndarray | None = None
    ) -> tuple[np.ndarray, float, bool, bool, dict]:
        """Complete the step from the forward of its new tokens (the agent's token, then the other
        party's turn if one was taken): hidden ``(n, d)``, logits ``(n, V)``."""
        n = hidden.shape[0]
        if self.obs_mode == "mean":
            self._hidden_sum += hidden.sum(0).cpu()
        elif self.obs_mode == "context":
            self._context[len(self._sequence) - n : len(self._sequence)] = hidden.cpu().numpy()
        self._mask += [True] + [False] * (n - 1)
        self._prompt_tokens.update(self._sequence.ids[len(self._sequence) - n + 1 :])
        token = self._next_token
        self.text = self._step_text()
        self._turn_ids.append(token)
        self.generated.append(token)
        references = self.turn_references()
        reward, scores = 0.0, None
        if references and (self.shaper.dense or self._ending):
            reward, scores = self.shaper.step(self.text, bool(self._ending))
        metric = None if scores is None else self._mean_metric(scores[self.shaper.name])
        self._turn_end, self._reply_text = self._ending, ""
        self._responder_reward = self._conversation_reward = 0.0
        step_turn = self.turn
        if self._ending:
            if scores is not None:
                self._turn_metrics.append(scores[self.shaper.name])
            self._messages.append((self.agent_role, self.text))
            self.turn += 1
            if self.turn >= self.max_turns:
                self._stop = "max_turns"
            elif len(self.generated) >= self.max_steps:
                self._stop = "max_steps"
            else:
                self._stop = ""
            if self._pending is not None:
                reply, messages, stop = self._pending
                self._responder_reward = float(reply.reward)
                self._messages += messages
                self._reply_text = "\n".join(content for _, content in messages)
                self._stop = self._stop or stop
            self._done = bool(self._stop)
        reward += self._responder_reward
        if self._done:
            self._conversation_reward = self._score_conversation()
            reward += self._conversation_reward
        if not math.isfinite(reward):
            raise FloatingPointError(f"The step's reward is {reward}: scale the rewards.")
        info = self._info(scores, step_turn, metric)
        if self._ending and not self._done:
            self._start_turn()
        obs = self._observe(hidden[-1], logits[-1], candidates)
        return obs, float(reward), self._done, False, info

    def _mean_metric(self, current: float) -> float:
        """The mean metric of the agent's scored turns: the finished ones and the current one at
        ``current``."""
        return float(np.mean([*self._turn_metrics, current]))

    def _score_conversation(self) -> float:
        """``conversation_reward`` of the finished conversation (0.0 without one)."""
        if self.conversation_reward is None:
            return 0.0
        played = self._messages[len(self.sample.opening) :]
        agent = [content for role, content in played if role == self.agent_role]
        if self._conversation_metric is not None:
            reference = "\n".join(self.sample.references[: self.turn])
            value = self._conversation_metric("\n".join(agent), [reference])
        else:
            value = self.conversation_reward(self.conversation_view())
        name = metric_name(self.conversation_reward)
        ok = isinstance(value, (int, float, np.floating)) and not isinstance(value, bool)
        if not (ok and math.isfinite(value)):
            raise ValueError(
                f"conversation_reward {name!r} returned {value!r}: it must return a finite number."
            )
        return float(value)

    # -- what agents and trainers read ------------------------------------------------------
    @property
    def conversation(self) -> list[dict[str, str]]:
        """The finished messages of the episode, ``{"role": ..., "content": ...}`` dicts (a
        copy)."""
        return [{"role": role, "content": content} for role, content in self._messages]

    def conversation_view(self) -> Conversation:
        """The episode as a :class:`~textenvs.responders.Conversation` (a copy)."""
        return Conversation(
            messages=self.conversation,
            agent_role=self.agent_role,
            other_role=self.other_role,
            turn=self.turn,
            sample=self.sample,
            index=self.index,
        )

    def agent_mask(self) -> np.ndarray:
        """``(len(sequence),)`` bool: True at the tokens the agent chose (the loss mask)."""
        return np.asarray(self._mask, dtype=bool)

    def _transcript(self) -> str:
        return "\n".join(f"{role}: {content}" for role, content in self._messages)

    def _info(
        self, scores: dict | None, turn: int | None = None, metric: float | None = None
    ) -> dict:
        references = (
            self.turn_references()
            if turn is None
            else ((self.sample.references[turn],) if turn < len(self.sample.references) else ())
        )
        info = {
            "prompt": self.prompt,
            "text": self.text,
            "reference": references[0] if references else "",
            "index": self.index,
        }
        if scores is not None:
            # the conversation's metric so far (the episode's task metric, which agents evaluate
            # on) and the turn's own
            info["metric"] = scores[self.shaper.name] if metric is None else metric
            info["turn_metric"] = scores[self.shaper.name]
            info["metric_name"] = self.shaper.name
            info.update((key, value) for key, value in scores.items() if key != self.shaper.name)
        info.update(
            turn=self.turn if turn is None else turn,
            turns=self.turn,
            tokens=len(self._turn_ids),
            turn_end=self._turn_end,
            reply=self._reply_text,
            speaker="" if self._done else self.agent_role,
            stop=self._stop,
            responder_reward=self._responder_reward,
            conversation_reward=self._conversation_reward,
        )
        if not self.text_infos:
            return {key: value for key, value in info.items() if not isinstance(value, str)}
        return info

    def _render_text(self) -> str:
        lines = [f"{role}: {content}" for role, content in self._messages]
        if not self._done:
            lines.append(f"{self.agent_role}: {self.text}")
        return "\n".join(lines) + (" <end>" if self._done else "")

    def _render_sections(self) -> list[tuple[str, str, str]]:
        history = "\n".join(f"{role}: {content}" for role, content in self._messages)
        reference = self.turn_references()
        state = "ended" if self._done else f"turn {self.turn + 1} of at most {self.max_turns}"
        return [
            ("conversation", history, "end"),
            (f"{self.agent_role}, {state}", "" if self._done else self.text, "end"),
            ("reference of this turn", reference[0] if reference else "(none)", "start"),
        ]
