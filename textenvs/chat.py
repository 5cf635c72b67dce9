"""How a conversation becomes token ids, one turn at a time: the two turn formats of the dialogue
envs.

A dialogue env never re-renders or re-tokenizes its history. It holds the ids of the conversation
so far (the tokens the agent produced are kept as produced) and, when a speaker's turn ends,
appends only the ids of what is new: the rest of that turn's closing (say ChatML's ``\\n`` after
the ``<|im_end|>`` the speaker wrote), the other party's messages, and the header of the speaker's
next turn. Both formats compute that tail from a short window of the conversation, never from the
whole of it.

* :class:`ChatTemplateFormat` (``chat_template=True``): the tokenizer's chat template. The tail is
  the template's rendering of ``window + new messages`` (with the generation prompt) less its
  rendering of ``window`` alone, where the window is the system message (if any), the message
  before the finished turn and the finished turn itself. That is exact, turn after turn, for
  templates whose rendering of a conversation is a prefix of the rendering of any continuation of
  it (ChatML, Llama 3, Qwen 2.5, ...): the env's ids then equal ``apply_chat_template`` of the
  whole conversation whenever the speaker's tokens are the tokenizer's own encoding of its text.
  A template that rewrites earlier turns (one that drops the reasoning of earlier assistant turns)
  has no such delta: it is refused at construction (:func:`check_prefix_template`) and, should a
  conversation still break the rule, at the turn that does, with :class:`TemplateRewriteError`,
  before anything is appended.
* :class:`PlainTurnFormat` (no chat template): each message is one line ``"{Name}: {content}\\n"``
  (a system message is its content alone), and a turn opens with ``"{Name}:"``; ``Name`` is the
  role with its first letter upper-cased (``user`` -> ``User``). A turn ends at the model's stop
  tokens or at any token whose text holds a newline.
"""

from __future__ import annotations

from collections.abc import Sequence

from textenvs.lm import LanguageModel

Message = tuple[str, str]  # (role, content)


class TemplateRewriteError(ValueError):
    """A chat template whose rendering of a conversation is not a prefix of the rendering of its
    continuation (it rewrites earlier turns), so no turn can be appended without re-encoding."""


class ChatTemplateFormat:
    """Turns through the tokenizer's chat template, for the speaker ``speaker_role``.

    The speaker is rendered as the template's ``"assistant"`` (its generation prompt is the
    speaker's header), ``"system"`` stays system, and every other role is rendered as ``"user"``.

    Args:
        lm: The language model whose tokenizer holds the template.
        speaker_role: The role whose turns the model writes in this format.
    """

    def __init__(self, lm: LanguageModel, speaker_role: str) -> None:
        lm.check_chat_template()
        self.lm, self.tokenizer, self.speaker_role = lm, lm.tokenizer, speaker_role
        self.end_token_ids = lm.stop_token_ids
        check_prefix_template(self)

    def template_role(self, role: str) -> str:
        if role == self.speaker_role:
            return "assistant"
        return "system" if role == "system" else "user"

    def render(self, messages: Sequence[Message], generation_prompt: bool) -> str:
        """The template's text of ``messages`` (data roles), optionally with the speaker's
        header."""
        return self.tokenizer.apply_chat_template(
            [{"role": self.template_role(r), "content": c} for r, c in messages],
            tokenize=False,
            add_generation_prompt=generation_prompt,
        )

    def ids(self, text: str) -> list[int]:
        """Template text to ids as ``apply_chat_template(tokenize=True)`` does (the template's
        special tokens parsed, nothing added)."""
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def opening_ids(self, messages: Sequence[Message]) -> list[int]:
        """The ids of ``messages`` followed by the speaker's header."""
        return self.ids(self.render(messages, generation_prompt=True))

    def tail_ids(
        self,
        context: Sequence[Message],
        content: str,
        end_token: int | None,
        new: Sequence[Message],
    ) -> list[int]:
        """The ids to append once the speaker's turn (``content``, after ``context``) ended.

        ``end_token``: the stop token the speaker wrote to end its turn, already in the ids (None
        when the turn was cut by its budget). Returns the rest of the turn's closing, ``new``
        rendered, and the speaker's next header.

        Raises:
            TemplateRewriteError: the template renders the continuation with other text before
                the new messages (it rewrote an earlier turn); nothing is appended.
        """
        window = [m for m in context[:1] if m[0] == "system"] + list(context[-1:])
        if context[:1] == context[-1:]:
            window = list(context[-1:])
        turn = (self.speaker_role, content)
        before = self.render([*window, turn], generation_prompt=False)
        after = self.render([*window, turn, *new], generation_prompt=True)
        if not after.startswith(before):
            raise TemplateRewriteError(
                "The chat template of model "
                f"{self.lm.name!r} rendered the conversation's earlier turns differently once "
                "another turn followed (it rewrites earlier turns, as templates that drop "
                "earlier reasoning do), so the new turn cannot be appended to the tokens "
                "already produced; the conversation is left as it was. Use a template whose "
                "rendering of a conversation is a prefix of its continuation, or "
                "chat_template=False."
            )
        return self.ids(self._closing(window, end_token) + after[len(before) :])

    def _closing(self, window: list[Message], end_token: int | None) -> str:
        """The template's text after the speaker's content in its turn (ChatML:
        ``"<|im_end|>\\n"``), less the end token the speaker wrote."""
        sentinel = "\x00"
        rendered = self.render([*window, (self.speaker_role, sentinel)], generation_prompt=False)
        closing = rendered[rendered.rindex(sentinel) + 1 :]
        if end_token is not None:
            written = self.tokenizer.decode([end_token], skip_special_tokens=False)
            if closing.startswith(written):
                closing = closing[len(written) :]
        return closing

    def content_of(self, ids: Sequence[int]) -> str:
        """The text of a speaker's turn from its tokens (special tokens left out)."""
        return self.lm.decode(list(ids)).strip()


def check_prefix_template(fmt: ChatTemplateFormat) -> None:
    """Refuse a chat template that rewrites earlier turns, found on a probe conversation whose
    assistant turns carry reasoning (``<think>...</think>``), which such templates drop."""
    party, speaker = "\x00other", fmt.speaker_role  # any role but the speaker's renders as user
    probe = [
        ("system", "Be brief."),
        (party, "Hello there."),
        (speaker, "<think>Greet back.</think>Hi."),
        (party, "How are you?"),
        (speaker, "<think>Answer.</think>Well, thanks."),
        (party, "Bye."),
    ]
    for k in range(2, len(probe)):
        shorter = probe[:k]
        generation = shorter[-1][0] != fmt.speaker_role
        try:
            head = fmt.render(shorter, generation_prompt=generation)
            whole = fmt.render(probe[: k + 1], generation_prompt=False)
        except Exception as e:  # noqa: BLE001 - a template's own error, reported with its text
            raise ValueError(
                f"The chat template of model {fmt.lm.name!r} cannot render a system / user / "
                f"assistant conversation ({type(e).__name__}: {e}): dialogue envs need one that "
                "can, or chat_template=False."
            ) from e
        if not whole.startswith(head):
            raise TemplateRewriteError(
                f"The chat template of model {fmt.lm.name!r} rewrites earlier turns: its "
                f"rendering of the first {k} messages of a conversation is not a prefix of the "
                f"rendering of the first {k + 1}. A dialogue env appends each turn to the tokens "
                "already produced and never re-encodes them, so it refuses such a template: "
                "use a model whose template keeps earlier turns as they were (ChatML, Llama 3, "
                "Qwen 2.5, ...), set tokenizer.chat_template to one, or pass chat_template=False."
            )


class PlainTurnFormat:
    """Turns as plain lines ``"{Name}: {content}\\n"``, for the speaker ``speaker_role``.

    Args:
        lm: The language model (its tokenizer encodes the lines as plain text: a special token's
            string in a message is split like any text).
        speaker_role: The role whose turns the model writes in this format.
    """

    def __init__(self, lm: LanguageModel, speaker_role: str) -> None:
        self.lm, self.speaker_role = lm, speaker_role
        texts = lm.tokenizer.batch_decode([[i] for i in range(len(lm.tokenizer))])
        newline = {i for i, text in enumerate(texts) if "\n" in text}
        self.end_token_ids = frozenset(lm.stop_token_ids | newline)

    @staticmethod
    def name(role: str) -> str:
        return role[:1].upper() + role[1:]

    def line(self, message: Message) -> str:
        role, content = message
        return f"{content}\n" if role == "system" else f"{self.name(role)}: {content}\n"

    def header(self) -> str:
        return f"{self.name(self.speaker_role)}:"

    def opening_ids(self, messages: Sequence[Message]) -> list[int]:
        return self.lm.encode("".join(map(self.line, messages)) + self.header())

    def tail_ids(
        self,
        context: Sequence[Message],
        content: str,
        end_token: int | None,
        new: Sequence[Message],
    ) -> list[int]:
        """The ids to append once the speaker's turn ended: a newline unless the speaker's last
        token wrote one, the new lines, the speaker's next header."""
        ended_line = end_token is not None and end_token not in self.lm.stop_token_ids
        closing = "" if ended_line else "\n"
        return self.lm.encode(closing + "".join(map(self.line, new)) + self.header())

    def content_of(self, ids: Sequence[int]) -> str:
        return self.lm.decode(list(ids)).strip()


def turn_format(lm: LanguageModel, speaker_role: str, chat_template: bool):
    """The format in which ``lm`` writes the turns of ``speaker_role``."""
    if chat_template:
        return ChatTemplateFormat(lm, speaker_role)
    return PlainTurnFormat(lm, speaker_role)
