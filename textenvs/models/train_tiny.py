"""Pretrain the built-in tiny GPT-2 (``textenvs/tiny``) from a seed, on CPU, in a few minutes.

Run ``python -m textenvs.models.train_tiny`` (``--out`` to write elsewhere, ``--pair-share`` and
``--translate-pair-share`` to change the supervised shares). It trains a byte-level BPE tokenizer
and a small GPT-2 on text of the
two built-in task domains:

* mostly **unpaired** text: articles alone, headlines alone, English sentences alone and Veltic
  sentences alone, drawn from generators disjoint from the task splits, so the model learns each
  language and the prompt formats but not how to map one to the other;
* a small share (``--pair-share``, ``--translate-pair-share``) of prompt + reference **pairs** from
  the train split, so that the right next token is often among the model's top candidates (top-k
  agents can find it) while greedy decoding stays far below the maximum score (reinforcement
  learning has headroom). Translation gets a larger share: with 0.03, or with 800 steps, the model
  never learns to read the English source and writes the same sentence for every input.

At the end it prints one JSON line with greedy test-split scores (ROUGE-L for summarization, BLEU
for translation) and the teacher-forced top-8 rate of reference tokens.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time
from pathlib import Path

import numpy as np
import torch

from textenvs.cli import float_arg, int_arg, run_cli
from textenvs.tasks import BUILTIN_TASKS, builtin_task, unpaired_texts

EOS = "<|endoftext|>"
DEFAULT_OUT = Path(__file__).parent / "tiny"


def build_corpus(n_unpaired: int, pair_share: float | dict[str, float], seed: int) -> list[str]:
    """Documents (each ends with EOS) of unpaired domain text plus a share of train-split pairs.

    ``pair_share`` is one share for every task or a dict from task name to its share.
    """
    rng = np.random.default_rng(seed)
    docs: list[str] = []
    for i, name in enumerate(BUILTIN_TASKS):
        task = builtin_task(name)
        src_label, tgt_label = (s.strip(": ") for s in task.prompt_template.split("{source}"))
        sources, targets = unpaired_texts(name, n_unpaired, seed + 10 * i)
        docs += [f"{src_label}: {s}{EOS}" for s in sources]
        docs += [f"{tgt_label}: {t}{EOS}" for t in targets]
        train = task.split("train")
        share = pair_share[name] if isinstance(pair_share, dict) else pair_share
        n_pairs = int(round(share * 2 * n_unpaired))
        for j in rng.choice(len(train), size=min(n_pairs, len(train)), replace=False):
            s = train[j]
            docs.append(f"{task.prompt(s)} {s.references[0]}{EOS}")
    rng.shuffle(docs)
    return docs


def train_tokenizer(docs: list[str], vocab_size: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator((d.replace(EOS, "") for d in docs), trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=EOS, eos_token=EOS, unk_token=EOS, pad_token=EOS
    )


def train_on_blocks(
    model, ids: np.ndarray, args: argparse.Namespace, warmup: int, report_every: int, t0: float
) -> None:
    """Language-model training on random ``args.block``-token blocks of ``ids``: AdamW (weight
    decay 0.01), ``args.steps`` steps of ``args.batch`` blocks, the learning rate ``args.lr``
    warmed up over ``warmup`` steps then cosine-annealed, gradients clipped at 1; the model is
    left in eval mode."""
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01)
    n_blocks = len(ids) // args.block
    blocks = torch.from_numpy(ids[: n_blocks * args.block].reshape(n_blocks, args.block))
    gen = torch.Generator().manual_seed(args.seed)
    model.train()
    for step in range(args.steps):
        lr = (
            args.lr
            * min(1.0, (step + 1) / warmup)
            * 0.5
            * (1 + math.cos(math.pi * step / args.steps))
        )
        for g in opt.param_groups:
            g["lr"] = lr
        batch = blocks[torch.randint(n_blocks, (args.batch,), generator=gen)]
        loss = model(input_ids=batch, labels=batch).loss
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if step % report_every == 0 or step == args.steps - 1:
            print(
                f"step {step} loss {loss.item():.3f} lr {lr:.2e} {time.time() - t0:.0f}s",
                flush=True,
            )
    model.eval()


def train(args: argparse.Namespace) -> dict:
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    t0 = time.time()
    shares = {name: args.pair_share for name in BUILTIN_TASKS}
    if args.translate_pair_share is not None:
        shares["translate"] = args.translate_pair_share
    docs = build_corpus(args.n_unpaired, shares, args.seed)
    tokenizer = train_tokenizer(docs, args.vocab_size)
    ids = np.concatenate([tokenizer(d)["input_ids"] for d in docs]).astype(np.int64)
    config = GPT2Config(
        vocab_size=len(tokenizer),
        n_positions=args.n_positions,
        n_embd=args.d_model,
        n_layer=args.n_layer,
        n_head=args.n_head,
        bos_token_id=tokenizer.eos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.eos_token_id,
    )
    model = GPT2LMHeadModel(config)
    train_on_blocks(model, ids, args, warmup=100, report_every=200, t0=t0)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    train_s = time.time() - t0
    report = {
        "train_seconds": round(train_s, 1),
        "tokens": int(len(ids)),
        "parameters": model.num_parameters(),
    }
    report.update(evaluate(str(out), args.eval_samples))
    (out / "training_report.json").write_text(
        json.dumps({**report, "args": vars(args) | {"out": None}}, indent=1)
    )
    return report


@torch.no_grad()
def evaluate(model_path: str, n: int) -> dict:
    """Greedy test-split metric and teacher-forced top-8 rate of the reference tokens, per task."""
    from textenvs.lm import LanguageModel
    from textenvs.rewards import get_metric

    lm = LanguageModel(model_path)
    report = {}
    for name, metric_name in (("summarize", "rougeL"), ("translate", "bleu")):
        task = builtin_task(name)
        metric = get_metric(metric_name)
        scores, hits, total = [], 0, 0
        for s in task.split("test")[:n]:
            prompt = lm.encode(task.prompt(s))
            text = lm.greedy(prompt, max_new_tokens=48)
            scores.append(metric(text, s.references))
            target = lm.encode(" " + s.references[0]) + [lm.eos_token_id]
            logits = lm.model(torch.tensor([prompt + target], device=lm.device)).logits[
                0, len(prompt) - 1 : -1
            ]
            top8 = logits.topk(8, dim=-1).indices.cpu()
            hits += sum(int(t in row) for t, row in zip(target, top8.tolist(), strict=False))
            total += len(target)
        report[f"{name}_greedy_{metric_name}"] = round(float(np.mean(scores)), 4)
        report[f"{name}_top8_rate"] = round(hits / total, 4)
    return report


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=str(DEFAULT_OUT))
    p.add_argument("--seed", type=int_arg(0, 2**32 - 1), default=0)
    p.add_argument(
        "--pair-share",
        type=float_arg(0, 1),
        default=0.03,
        help="pairs per unpaired text of each task",
    )
    p.add_argument(
        "--translate-pair-share",
        type=float_arg(0, 1),
        default=0.16,
        help="pair share of the translation task alone (it needs more pairs to learn to read its "
        "source)",
    )
    p.add_argument(
        "--n-unpaired", type=int_arg(), default=6000, help="unpaired sources (and targets) per task"
    )
    p.add_argument("--vocab-size", type=int_arg(), default=1024)
    p.add_argument("--d-model", type=int_arg(), default=128)
    p.add_argument("--n-layer", type=int_arg(), default=4)
    p.add_argument("--n-head", type=int_arg(), default=4)
    p.add_argument("--n-positions", type=int_arg(), default=512)
    p.add_argument("--block", type=int_arg(), default=128)
    p.add_argument("--batch", type=int_arg(), default=32)
    p.add_argument("--steps", type=int_arg(), default=1600)
    p.add_argument("--lr", type=float_arg(0, low_open=True), default=2e-3)
    p.add_argument("--threads", type=int_arg(), default=min(2, os.cpu_count() or 1))
    p.add_argument("--eval-samples", type=int_arg(), default=200)
    print(json.dumps(train(p.parse_args(argv))))


def cli() -> None:
    """The console script: a user error as one line (:func:`textenvs.cli.run_cli`)."""
    run_cli(main)


if __name__ == "__main__":
    cli()
