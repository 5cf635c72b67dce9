"""The other party of a conversation: the ``responder=`` of the dialogue envs.

One interface, three kinds. A responder answers a batch of conversations at once
(:meth:`Responder.reply_batch`): a batched vector env hands it every sub-env whose agent turn
ended at a step, so a language model answers all of them in one batched generation.

* :class:`DataResponder` (``responder="data"``, the default): the recorded conversation's next
  messages; it ends the conversation when the recording has no turn left for the agent.
* :class:`LMResponder` (``responder="lm"``, or an instance): a causal language model as a user
  simulator, the env's own model by default or any other, with its own system prompt, sampling
  settings and seed, generating with its own KV cache (only the new turns are ever run through
  it, never the history again).
* :class:`CallableResponder` (``responder=fn``): a Python callable ``fn(conversation) -> str |
  Reply`` (a scripted user, a tool, a judge). A :class:`Reply` may pay a reward and end the
  conversation.

A responder that raises, returns something that is neither text nor a :class:`Reply`, or an empty
turn is stopped with :class:`ResponderError` naming it; the env is left exactly as it was before
the step (the conversation so far, its ids and cache), so the step can be retried.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from textenvs.checks import check_bool, check_float, check_int
from textenvs.tasks.dialogue import Dialogue


class ResponderError(RuntimeError):
    """A responder failed or answered with something that is not a turn; the message names it."""


@dataclass(frozen=True)
class Reply:
    """The other party's answer to one agent turn.

    Attributes:
        text: The new turn's text (non-empty); None only with ``end=True`` (the other party ends
            the conversation without a word).
        reward: A reward the responder pays the agent for its last turn (a judge's score), added
            to the reward of the step that ended that turn; a finite number.
        end: The other party ends the conversation; ``text``, if any, is appended first.
        role: The role of the new turn (None: the dialogue's other party).
        more: Further messages ``(role, content)`` after ``text`` before the agent's next turn
            (a recorded conversation's several speakers).
        stop: What an ``end`` is reported as in ``info["stop"]``: ``"responder"``, or
            ``"context"`` when the responder's own model has no room for another turn.
    """

    text: str | None
    reward: float = 0.0
    end: bool = False
    role: str | None = None
    more: tuple[tuple[str, str], ...] = ()
    stop: str = "responder"


@dataclass
class Conversation:
    """What a responder sees of one conversation (a copy: changing it changes nothing).

    Attributes:
        messages: Every finished turn so far, ``{"role": ..., "content": ...}`` dicts (the last
            is the agent's turn just ended).
        agent_role: The role the agent plays; ``other_role``: the role the responder answers as.
        turn: How many agent turns have ended (the one just ended included).
        sample: The recorded :class:`~textenvs.tasks.dialogue.Dialogue` of the episode.
        index: The sample's index in the split.
    """

    messages: list[dict[str, str]]
    agent_role: str
    other_role: str
    turn: int
    sample: Dialogue
    index: int
    state: dict = field(default_factory=dict, repr=False)  # the responder's own, per episode


class Responder:
    """Base of the responders: :meth:`bind` once to an env, :meth:`start` per episode,
    :meth:`reply_batch` per handoff."""

    name = "responder"

    def bind(self, env: Any) -> None:
        """Called by each env that uses this responder, once, at construction."""

    def start(self, state: dict, rng: np.random.Generator) -> None:
        """A new episode: ``state`` is this conversation's private dict; ``rng`` the env's
        episode generator (draw from it for any randomness, so a seed fixes the trajectory)."""

    def reply_batch(self, conversations: list[Conversation]) -> list[Reply]:
        """One reply per conversation, in order."""
        raise NotImplementedError


def checked_reply(responder: str, raw: object, conversation: Conversation) -> Reply:
    """``raw`` as a valid :class:`Reply`, or :class:`ResponderError` saying what is wrong."""
    where = f"Responder {responder} (conversation {conversation.index}, turn {conversation.turn})"
    reply = Reply(raw) if isinstance(raw, str) else raw
    if not isinstance(reply, Reply):
        raise ResponderError(
            f"{where} returned {type(raw).__name__} {raw!r:.80}: return the other party's turn "
            "as a str, or a textenvs.responders.Reply(text, reward=..., end=...)."
        )
    if reply.text is None and not reply.end:
        raise ResponderError(f"{where} returned Reply(text=None) without end=True: give a text.")
    if reply.text is not None and (not isinstance(reply.text, str) or not reply.text.strip()):
        raise ResponderError(
            f"{where} returned an empty turn {reply.text!r}: a turn must hold some text; return "
            "Reply(None, end=True) to end the conversation instead."
        )
    ok = isinstance(reply.reward, (int, float)) and not isinstance(reply.reward, bool)
    if not (ok and math.isfinite(reply.reward)):
        raise ResponderError(f"{where} paid reward {reply.reward!r}: give a finite number.")
    if reply.role is not None and not (isinstance(reply.role, str) and reply.role.strip()):
        raise ResponderError(f"{where} gave role {reply.role!r}: give a non-empty str or None.")
    for message in reply.more:
        if not (
            isinstance(message, tuple)
            and len(message) == 2
            and all(isinstance(part, str) and part.strip() for part in message)
        ):
            raise ResponderError(
                f"{where} gave more={reply.more!r:.80}: give (role, content) pairs of non-empty "
                "strings."
            )
    return reply


class DataResponder(Responder):
    """The recorded conversation's next messages: the agent plays one speaker of a recorded
    dialogue; after its turn ``k`` the other speakers' recorded messages up to the agent's turn
    ``k + 1`` are appended; after the agent's last recorded turn the conversation ends."""

    name = "'data'"

    def reply_batch(self, conversations: list[Conversation]) -> list[Reply]:
        out = []
        for conversation in conversations:
            recorded = conversation.sample.replies_after(conversation.turn - 1)
            if recorded is None:
                out.append(Reply(None, end=True))
                continue
            (role, text), *more = recorded
            out.append(Reply(text, role=role, more=tuple(more)))
        return out


class CallableResponder(Responder):
    """A Python callable ``fn(conversation: Conversation) -> str | Reply`` as the other party."""

    def __init__(self, fn: Callable[[Conversation], str | Reply]) -> None:
        self.fn = fn
        self.name = repr(getattr(fn, "__qualname__", None) or type(fn).__name__)

    def reply_batch(self, conversations: list[Conversation]) -> list[Reply]:
        out = []
        for conversation in conversations:
            try:
                raw = self.fn(conversation)
            except Exception as e:
                raise ResponderError(
                    f"Responder {self.name} raised {type(e).__name__}: {e} (conversation "
                    f"{conversation.index}, turn {conversation.turn}). Nothing was appended: the "
                    "conversation so far is kept, and the step can be retried once the responder "
                    "is fixed."
                ) from e
            out.append(checked_reply(self.name, raw, conversation))
        return out


class LMResponder(Responder):
    """A causal language model as the other party (a user simulator).

    It keeps its own view of each conversation as token ids with a KV cache: the first reply
    prefills its system prompt and the conversation so far; each later reply appends only what is
    new (its last turn's closing, the agent's turn, its own header) and samples its turn. In a
    batched vector env the turns of every conversation that needs one at a step are run and
    sampled as one batch. Its turn ends at its format's end tokens (the model's stop tokens; with
    the plain format also a newline) or after ``max_new_tokens``; a turn with no text (it ends at
    once) ends the conversation, and so does a turn that would not fit its model's context
    (reported as ``stop="context"``).

    Args:
        model: None (the env's own model, shared: no second copy of the weights), a model name or
            folder, or a :class:`~textenvs.lm.LanguageModel`.
        system: Its own system prompt (the agent's system message is never shown to it).
        chat_template: Render its view through its tokenizer's chat template (None: as the env
            does when ``model`` is None, else whenever its tokenizer has one).
        temperature: Sampling temperature (> 0); ``top_p``: nucleus mass in (0, 1].
        max_new_tokens: Tokens per turn at most.
        seed: Combined with the env's episode seed, so a seeded env replays the same replies.
        device, dtype: Where and in which precision ``model`` (a name) runs (None: the env's).
    """

    def __init__(
        self,
        model: str | os.PathLike | Any | None = None,
        *,
        system: str | None = None,
        chat_template: bool | None = None,
        temperature: float = 1.0,
        top_p: float = 1.0,
        max_new_tokens: int = 24,
        seed: int = 0,
        device: str | None = None,
        dtype: Any = None,
    ) -> None:
        if system is not None and not (isinstance(system, str) and system.strip()):
            raise ValueError(f"system must be None or a non-empty str, got {system!r}.")
        self.model, self.system = model, system
        self.chat_template = (
            None if chat_template is None else check_bool("chat_template", chat_template)
        )
        self.temperature = check_float("temperature", temperature, 1e-6, 100.0)
        self.top_p = check_float("top_p", top_p, 1e-6, 1.0)
        self.max_new_tokens = check_int("max_new_tokens", max_new_tokens, 1)
        self.seed = check_int("seed", seed, 0)
        self.device, self.dtype = device, dtype
        self.lm = None
        named = isinstance(model, (str, os.PathLike))
        self.name = f"LMResponder({os.fspath(model) if named else 'the env model'})"

    def bind(self, env: Any) -> None:
        from textenvs.chat import turn_format
        from textenvs.lm import shared_model

        if self.lm is not None:
            return
        if self.model is None:
            self.lm = env.lm
            chat = env.chat_template if self.chat_template is None else self.chat_template
        else:
            device = self.device or str(env.lm.device)
            self.lm = shared_model(self.model, device, self.dtype)
            has_template = bool(getattr(self.lm.tokenizer, "chat_template", None))
            chat = has_template if self.chat_template is None else self.chat_template
        self.role = env.other_role
        self.format = turn_format(self.lm, self.role, chat)

    def start(self, state: dict, rng: np.random.Generator) -> None:
        entropy = int(rng.integers(2**63))
        generator = torch.Generator(device=self.lm.device)
        seed = np.random.SeedSequence([self.seed, entropy]).generate_state(1)[0]
        generator.manual_seed(int(seed))
        state.update(seq=None, seen=0, generator=generator, view=[], own=None)

    def _view(self, conversation: Conversation) -> list[tuple[str, str]]:
        """Its messages: its own system prompt, then the conversation without system messages."""
        head = [("system", self.system)] if self.system else []
        rest = [(m["role"], m["content"]) for m in conversation.messages if m["role"] != "system"]
        return head + rest

    @torch.inference_mode()
    def reply_batch(self, conversations: list[Conversation]) -> list[Reply]:
        from textenvs.batching import extend_batch, prefill_batch, sample_turns

        lm, fmt = self.lm, self.format
        replies: list[Reply | None] = [None] * len(conversations)
        fresh, fresh_ids, going, going_tails = [], [], [], []
        for i, conversation in enumerate(conversations):
            state = conversation.state
            view = self._view(conversation)
            if state["seq"] is None:
                ids = fmt.opening_ids(view)
                if len(ids) + self.max_new_tokens > lm.max_positions:
                    replies[i] = Reply(None, end=True, stop="context")
                    continue
                fresh.append(i)
                fresh_ids.append(ids)
            else:
                context, content, end_token = state["own"]
                tail = fmt.tail_ids(context, content, end_token, view[state["seen"] :])
                if len(state["seq"]) + len(tail) + self.max_new_tokens > lm.max_positions:
                    replies[i] = Reply(None, end=True, stop="context")
                    continue
                going.append(i)
                going_tails.append(tail)
            state["view"] = view
        rows, logits = [], []
        for i, (seq, _, last) in zip(fresh, prefill_batch(lm, fresh_ids) if fresh else []):
            conversations[i].state["seq"] = seq
            rows.append(i)
            logits.append(last)
        seqs = [conversations[i].state["seq"] for i in going]
        for i, out in zip(going, extend_batch(lm, seqs, going_tails)):
            rows.append(i)
            logits.append(out[1][-1])
        if not rows:
            return replies
        generators = [conversations[i].state["generator"] for i in rows]
        new = sample_turns(
            lm,
            [conversations[i].state["seq"] for i in rows],
            torch.stack(logits),
            lambda step_logits: self._pick(step_logits, generators),
            fmt.end_token_ids,
            self.max_new_tokens,
        )
        for i, tokens in zip(rows, new):
            state = conversations[i].state
            end = tokens[-1] if tokens and tokens[-1] in fmt.end_token_ids else None
            text = fmt.content_of(tokens[:-1] if end is not None else tokens)
            state["own"] = (state["view"], text, end)
            state["seen"] = len(state["view"]) + 1  # its reply becomes the next message
            replies[i] = Reply(text) if text else Reply(None, end=True)
        return replies

    def _pick(self, logits: torch.Tensor, generators: list[torch.Generator]) -> list[int]:
        """One sampled token per row of ``logits`` ``(R, V)``, each from its row's generator."""
        probs = torch.softmax(logits.float() / self.temperature, dim=-1)  # (R, V)
        if self.top_p < 1.0:
            sorted_probs, order = probs.sort(dim=-1, descending=True)
            outside = sorted_probs.cumsum(-1) - sorted_probs > self.top_p  # keep the first over
            sorted_probs[outside] = 0.0
            probs = torch.zeros_like(probs).scatter(-1, order, sorted_probs)
        return [
            int(torch.multinomial(row, 1, generator=generator))
            for row, generator in zip(probs, generators)
        ]


def make_responder(
    responder: str | Responder | Callable, responder_kwargs: dict | None
) -> Responder:
    """The :class:`Responder` an env argument names: ``"data"``, ``"lm"`` (with
    ``responder_kwargs``, the arguments of :class:`LMResponder`), a :class:`Responder` instance,
    or a callable."""
    kwargs = dict(responder_kwargs or {})
    if responder_kwargs is not None and not isinstance(responder_kwargs, dict):
        raise ValueError(f"responder_kwargs must be a dict, got {responder_kwargs!r}.")
    if responder == "lm":
        try:
            return LMResponder(**kwargs)
        except TypeError as e:
            raise ValueError(f"responder_kwargs {sorted(kwargs)}: {e}.") from e
    if kwargs:
        raise ValueError(
            f"responder_kwargs={kwargs!r} configure responder='lm' only: drop them, or pass "
            "responder='lm'."
        )
    if responder == "data":
        return DataResponder()
    if isinstance(responder, Responder):
        return responder
    if callable(responder):
        return CallableResponder(responder)
    raise ValueError(
        f"responder={responder!r} is not a responder: pass 'data' (the recorded conversation), "
        "'lm' (a language model, configured by responder_kwargs), a textenvs.responders."
        "Responder, or a callable (conversation) -> str | Reply."
    )


def conversation_messages(messages: Sequence[tuple[str, str]]) -> list[dict[str, str]]:
    """``(role, content)`` pairs as the ``{"role": ..., "content": ...}`` dicts of chat APIs."""
    return [{"role": role, "content": content} for role, content in messages]
