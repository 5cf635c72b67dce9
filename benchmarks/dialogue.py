"""Multi-turn conversations: appending each turn to the KV cache against re-encoding the history.

``python -m benchmarks.dialogue`` prints one JSON object. For each model (``--models``: the
built-in ``tiny`` and ``small``, a random GPT-2 of the 124M layout saved to a temp folder, 50,257
head rows, 1,024 positions) and each conversation length (``--turns``: numbers, and ``max``, as
many turns as the context holds), it plays the same conversation twice through
``textenvs/Chat-v0`` with the data responder (the agent's tokens forced to the recorded turns,
``--agent-tokens`` a turn; the other party's turns ``--other-tokens`` long):

* ``ours``: the env as it is: each agent token one incremental forward, and the turn that ends
  appends its closing, the other party's turn and the next header in ONE forward over those new
  tokens;
* ``reencode``: the same env, except that when a turn ends the whole conversation is rendered
  and tokenized again and run through the model from scratch (what text-in / text-out env APIs
  do: they hand the policy the history as text each turn).

Per side: the tokens the model is given in all (``tokens_forwarded``), the time between two agent
turns (the step that ends a turn: the other party's turn appended; mean over the conversation
and at its last turn) and the conversation's wall time; then the ratios reencode / ours, measured
in this run. Everything else (observations, rewards, the agent's own token steps) is the same
code on both sides. Both sides play the same number of agent turns: the requested number, or
fewer where the context holds fewer (the run says so in ``turns``). After one warm-up
conversation, ``--repeats`` plays each conversation that many times and keeps the fastest.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import numpy as np
import torch

import textenvs
from textenvs.cli import CommandLineError, int_arg, run_cli
from textenvs.envs.dialogue import DialogueEnv
from textenvs.lm import LanguageModel
from textenvs.tasks.dialogue import Dialogue

WORDS = "the red house near the old river road is where every small boat waits today".split()


def conversation(lm: LanguageModel, turns: int, other_tokens: int, agent_tokens: int) -> Dialogue:
    """A recorded conversation of ``turns`` agent turns: user turns of about ``other_tokens``
    tokens, agent turns of exactly ``agent_tokens`` tokens of text."""

    def text_of(n: int, offset: int) -> str:
        words = []
        while len(lm.encode(" ".join(words))) < n:
            words.append(WORDS[(offset + len(words)) % len(WORDS)])
        ids = lm.encode(" ".join(words))[:n]
        return lm.decode(ids).strip()

    messages = [("system", "Answer briefly.")]
    for t in range(turns):
        user, agent = text_of(other_tokens, t), text_of(agent_tokens, 3 * t)
        messages += [("user", user), ("assistant", agent)]
    return Dialogue(tuple(messages))


class ReencodingDialogueEnv(DialogueEnv):
    """The baseline: when a turn ends, the conversation so far is rendered, tokenized and run
    from scratch (a new cache), instead of appending the new turn to the cache."""

    def forward(self, tokens: list[int]):
        if len(tokens) == 1:
            return super().forward(tokens)
        _, messages, _ = self._pending
        history = [*self._messages, (self.agent_role, self._step_text()), *messages]
        ids = self.format.opening_ids(history)  # the whole history, re-encoded
        seq, hidden, logits = self.lm.prefill(ids)
        self._sequence = seq
        n = len(tokens)
        self._mask = self._mask[: len(ids) - n]  # keeps finish_step's bookkeeping aligned
        return hidden[-n:], logits[None].expand(n, -1)


def count_tokens(lm: LanguageModel) -> dict:
    counted = {"tokens": 0}
    original = lm.model.forward

    def forward(*args, **kwargs):
        counted["tokens"] += int(kwargs["input_ids"].numel())
        return original(*args, **kwargs)

    lm.model.forward = forward
    return counted


def play(env: DialogueEnv, counted: dict) -> dict:
    """One conversation with the recorded agent turns forced; its measurements."""
    counted["tokens"] = 0
    start = time.perf_counter()
    env.reset(seed=0, options={"index": 0})
    end = env.lm.encode("\n")[0]  # the plain format's end of turn
    handoffs, terminated = [], False
    while not terminated:
        reference = env.turn_references()[0]
        tokens = [*env.lm.encode(reference), end]
        for token in tokens[:-1]:
            env.step(token)
        step = time.perf_counter()
        _, _, terminated, _, info = env.step(tokens[-1])
        if not terminated:
            handoffs.append(time.perf_counter() - step)
    return {
        "turns": env.turn,
        "stop": info["stop"],
        "final_tokens": len(env.sequence),
        "tokens_forwarded": counted["tokens"],
        "between_turns_ms_mean": round(1000 * float(np.mean(handoffs)), 2) if handoffs else None,
        "between_turns_ms_last": round(1000 * handoffs[-1], 2) if handoffs else None,
        "wall_s": round(time.perf_counter() - start, 3),
    }


def measure(model: str, turns: int | None, args) -> dict:
    lm = LanguageModel(model, device=args.device)  # its own: counted, nothing memoised
    counted = count_tokens(lm)
    budget = args.agent_tokens + 1
    many = turns or lm.max_positions // (args.other_tokens + budget)
    dialogue = conversation(lm, many, args.other_tokens, args.agent_tokens)
    kwargs = dict(model=lm, dataset=[dialogue], max_turn_tokens=budget)
    # a first conversation warms the model up and says how many turns fit: both sides then play
    # exactly that many (re-tokenized text may be a few tokens shorter than the produced ids)
    fits = play(DialogueEnv(**kwargs, max_turns=many), counted)["turns"]
    kwargs["max_turns"] = fits
    sides = {}
    for name, cls in (("ours", DialogueEnv), ("reencode", ReencodingDialogueEnv)):
        env = cls(**kwargs)
        play(env, counted)  # warm-up
        runs = [play(env, counted) for _ in range(args.repeats)]
        best = min(runs, key=lambda r: r["wall_s"])
        for key in ("between_turns_ms_mean", "between_turns_ms_last"):
            values = [r[key] for r in runs if r[key] is not None]
            best[key] = min(values) if values else None
        sides[name] = best
    ours, base = sides["ours"], sides["reencode"]

    def ratio(key):
        return round(base[key] / ours[key], 2) if ours[key] and base[key] else None

    return {
        **sides,
        "reencode_over_ours": {
            "tokens_forwarded": ratio("tokens_forwarded"),
            "between_turns_mean": ratio("between_turns_ms_mean"),
            "between_turns_last": ratio("between_turns_ms_last"),
            "wall": ratio("wall_s"),
        },
    }


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default="tiny,small", help="tiny and/or small (124M layout)")
    parser.add_argument("--turns", default="4,16,max", help="agent turns per conversation")
    parser.add_argument("--other-tokens", type=int_arg(1), default=15)
    parser.add_argument("--agent-tokens", type=int_arg(1), default=8)
    parser.add_argument("--repeats", type=int_arg(1), default=2)
    parser.add_argument("--threads", type=int_arg(1), default=None, help="torch threads")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    turns = []
    for part in args.turns.split(","):
        if part != "max" and not part.isdigit():
            raise CommandLineError(f"--turns takes numbers and 'max', got {part!r}.")
        turns.append(None if part == "max" else int(part))
    models = {}
    for name in args.models.split(","):
        if name == "tiny":
            models[name] = textenvs.TINY
        elif name == "small":
            from benchmarks.throughput import random_gpt2

            models[name] = random_gpt2("small", vocab_size=50257)
        else:
            raise CommandLineError(f"--models takes tiny and small, got {name!r}.")
    out = {
        "command": " ".join(
            ["python -m benchmarks.dialogue", *(sys.argv[1:] if argv is None else argv)]
        ),
        "threads": torch.get_num_threads(),
        "other_tokens": args.other_tokens,
        "agent_tokens": args.agent_tokens,
    }
    for name, path in models.items():
        out[name] = {("max" if t is None else str(t)): measure(path, t, args) for t in turns}
    print(json.dumps(out, indent=1))
    return out


if __name__ == "__main__":
    run_cli(main)
