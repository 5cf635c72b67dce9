"""Make the built-in chat model ``textenvs/tiny-chat`` from ``textenvs/tiny``, on CPU, in minutes.

Run ``python -m textenvs.models.train_tiny_chat`` (``--out`` to write elsewhere). It gives the
tiny model's tokenizer ChatML's two special tokens (``<|im_start|>``, ``<|im_end|>``) and its
chat template, makes ``<|im_end|>`` an end-of-turn token (``generation_config.eos_token_id``),
and trains on, mixed:

* the tiny model's own corpus (unpaired domain text and a few pairs,
  :func:`textenvs.models.train_tiny.build_corpus`), so it keeps its languages;
* conversations of the ``briefing`` domain (a user asks about an article, the assistant answers)
  rendered through the chat template, drawn from a generator disjoint from the task's splits.
  Most have their answers shuffled between conversations (**unpaired**: the model learns the
  format, the questions and the kind of answer each asks for, but not to read them off the
  article); a share ``--pair-share`` are true. So the right words are often among its top
  candidates while greedy answers stay far from the references: reinforcement learning has
  headroom, and chat templates are exercised offline.

It trains on blocks of 256 tokens (``textenvs/tiny`` saw 128): a conversation of four turns
reaches past position 128, which a model never trained there handles badly (at the start of a
later turn the first version wrote another ``<|im_start|>``).

At the end it prints one JSON line with the greedy mean per-turn ROUGE-L on the ``briefing``
test split (the data responder) and the teacher-forced top-8 rate of the reference tokens.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import numpy as np
import torch

from textenvs.cli import float_arg, int_arg, run_cli

CHATML = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}"
    "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
DEFAULT_OUT = Path(__file__).parent / "tiny-chat"


def chat_corpus(tokenizer, n: int, pair_share: float, seed: int) -> list[str]:
    """``n`` briefing conversations as chat-template text, disjoint from the task's splits; all
    but a ``pair_share`` of them with answers taken from other conversations."""
    from textenvs.tasks.dialogue import _briefing_dialogue, briefing_task

    used = {d.messages[1] for split in briefing_task().splits.values() for d in split}
    rng = np.random.default_rng(seed)
    dialogues = []
    while len(dialogues) < n:
        dialogue = _briefing_dialogue(rng)
        if dialogue.messages[1] not in used:
            dialogues.append(dialogue)
    donors = rng.permutation(n)
    docs = []
    for i, dialogue in enumerate(dialogues):
        messages = list(dialogue.messages)
        if rng.random() >= pair_share:  # unpaired: each answer another article's, same question
            donor = dialogues[int(donors[i])].messages
            answers = {q: a for (_, q), (_, a) in zip(donor[1::2], donor[2::2])}
            answers[messages[1][1]] = donor[2][1]  # the headline question (its article differs)
            for j in range(2, len(messages), 2):
                question = messages[j - 1][1]
                if question in answers:
                    messages[j] = ("assistant", answers[question])
        chat = [{"role": r, "content": c} for r, c in messages]
        docs.append(tokenizer.apply_chat_template(chat, tokenize=False) + tokenizer.eos_token)
    return docs


def train(args: argparse.Namespace) -> dict:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from textenvs.lm import BUILTIN_MODELS, TINY, quiet_loading
    from textenvs.models.train_tiny import build_corpus, train_on_blocks

    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    t0 = time.time()
    source = BUILTIN_MODELS[TINY]
    with quiet_loading():
        tokenizer = AutoTokenizer.from_pretrained(source)
        model = AutoModelForCausalLM.from_pretrained(source, use_safetensors=True)
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    tokenizer.chat_template = CHATML
    model.resize_token_embeddings(len(tokenizer))
    end_of_turn = tokenizer.convert_tokens_to_ids("<|im_end|>")
    model.generation_config.eos_token_id = [tokenizer.eos_token_id, end_of_turn]
    docs = build_corpus(args.n_unpaired, {"summarize": 0.03, "translate": 0.16}, args.seed)
    docs += chat_corpus(tokenizer, args.n_chats, args.pair_share, args.seed + 1)
    np.random.default_rng(args.seed).shuffle(docs)
    ids = np.concatenate([tokenizer(d)["input_ids"] for d in docs]).astype(np.int64)
    train_on_blocks(model, ids, args, warmup=50, report_every=100, t0=t0)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    with quiet_loading():
        model.save_pretrained(out, safe_serialization=True)
        tokenizer.save_pretrained(out)
    report = {"train_seconds": round(time.time() - t0, 1), "tokens": int(len(ids))}
    report.update(evaluate(str(out), args.eval_samples))
    (out / "training_report.json").write_text(
        json.dumps({**report, "args": vars(args) | {"out": None}}, indent=1)
    )
    return report


@torch.no_grad()
def evaluate(model_path: str, n: int) -> dict:
    """Greedy mean per-turn ROUGE-L on ``n`` briefing test conversations (the data responder),
    and the teacher-forced top-8 rate of the reference turns' tokens."""
    import gymnasium as gym

    from textenvs.lm import LanguageModel

    env = gym.make(
        "textenvs/Dialogue-v0",
        model=LanguageModel(model_path),
        chat_template=True,
        split="test",
        max_turn_tokens=16,
    ).unwrapped
    scores, hits, total = [], 0, 0
    for index in range(min(n, len(env.samples))):
        env.reset(seed=0, options={"index": index})
        terminated, starting = False, True
        while not terminated:
            if starting:  # the first token of the reference turn among the model's top 8
                first = env.lm.encode(env.turn_references()[0])[0]
                hits += first in env.logits.topk(8).indices.tolist()
                total += 1
            _, _, terminated, _, info = env.step(int(env.logits.argmax()))
            starting = bool(info["turn_end"])
            if starting:
                scores.append(info["metric"])
    return {
        "briefing_greedy_turn_rougeL": round(float(np.mean(scores)), 4),
        "briefing_first_token_top8_rate": round(hits / total, 4),
    }


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=str(DEFAULT_OUT))
    p.add_argument("--seed", type=int_arg(0, 2**32 - 1), default=0)
    p.add_argument(
        "--pair-share", type=float_arg(0, 1), default=0.05, help="true conversations' share"
    )
    p.add_argument("--n-chats", type=int_arg(1), default=4000)
    p.add_argument("--n-unpaired", type=int_arg(1), default=2000, help="of the tiny corpus")
    p.add_argument("--block", type=int_arg(), default=256)
    p.add_argument("--batch", type=int_arg(), default=16)
    p.add_argument("--steps", type=int_arg(), default=1500)
    p.add_argument("--lr", type=float_arg(0, low_open=True), default=1e-3)
    p.add_argument("--threads", type=int_arg(), default=min(2, os.cpu_count() or 1))
    p.add_argument("--eval-samples", type=int_arg(), default=100)
    print(json.dumps(train(p.parse_args(argv))))


if __name__ == "__main__":
    run_cli(main)
