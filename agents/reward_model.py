"""Train a reward model on preference rows, then use it as a reward.

The model is any ``AutoModelForSequenceClassification`` with one output (its logit is the reward),
started from a folder or hub name (a BERT-style encoder or a causal LM; its new one-output head is
random). It is trained with the Bradley-Terry loss of InstructGPT (Ouyang et al. 2022, eq. 1) and
TRL's ``RewardTrainer``: ``-log sigmoid(r(prompt, chosen) - r(prompt, rejected))``, reading prompt
and text as a pair, exactly as ``reward="classifier"`` with ``input="prompt+text"`` reads them.

Preferences: a JSONL of ``{"prompt", "chosen", "rejected"}`` rows (TRL's explicit-prompt
format; ``python -m textenvs.rate export --preferences`` writes it). Without ``"prompt"`` the
texts are read alone.

    python -m agents.reward_model --preferences prefs.jsonl --model bert-base-uncased

It saves the model and its tokenizer (safetensors) into a new ``runs/reward_model/<file>/<time>``
folder (or ``--save``), with ``reward_model.json`` (the held-out accuracy before and after), and
prints the ``gym.make`` line that uses it.
"""

from __future__ import annotations

import argparse
import json
import math
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from agents.checkpoint import check_save_target, save_atomically
from agents.cli import add_config_arguments, config_from_args
from agents.runs import add_output_flags, new_run_folder
from textenvs.checks import check_float, check_positive_int
from textenvs.cli import run_cli
from textenvs.rate.export import read_jsonl

LABEL = "reward"


@dataclass
class RewardModelConfig:
    """How the reward model is trained."""

    epochs: int = 1
    """Passes over the training pairs."""
    learning_rate: float = 2e-5
    """AdamW's learning rate."""
    batch_size: int = 8
    """Preference pairs per update."""
    max_length: int = 512
    """Longest prompt + text in tokens; longer ones are cut (the prompt first)."""
    eval_fraction: float = 0.1
    """Share of the pairs held out to measure accuracy (at least one pair when there are 10+)."""
    seed: int = 0
    """Seeds the new head, the held-out split and the batch order."""
    device: str = "cpu"
    """Where it trains."""

    def __post_init__(self) -> None:
        for name in ("epochs", "batch_size", "max_length"):
            check_positive_int(name, getattr(self, name))
        check_float("learning_rate", self.learning_rate, 0, low_open=True)
        check_float("eval_fraction", self.eval_fraction, 0, 1, high_open=True)


def read_preferences(path: str | os.PathLike) -> list[dict]:
    """The rows of a preference JSONL; a clear error names a bad line."""
    rows = []
    for number, row in read_jsonl(path):
        if not (
            isinstance(row, dict)
            and isinstance(row.get("chosen"), str)
            and isinstance(row.get("rejected"), str)
            and isinstance(row.get("prompt", ""), str)
        ):
            raise ValueError(
                f'{path}, line {number}: a preference row is {{"prompt", "chosen", '
                '"rejected"}, three strings ("prompt" optional).'
            )
        rows.append({"prompt": row.get("prompt", ""), **row})
    if not rows:
        raise ValueError(f"{path} holds no preference rows.")
    return rows


def load_base(model: str, seed: int):
    """The base model with a new one-output head named ``"reward"``, and its tokenizer."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from textenvs.lm import quiet_loading, refuse_remote_code, resolve_model_path

    path = resolve_model_path(model)
    refuse_remote_code(path)
    torch.manual_seed(seed)  # the new head's initial weights
    with quiet_loading():
        net = AutoModelForSequenceClassification.from_pretrained(
            path,
            num_labels=1,
            id2label={0: LABEL},
            label2id={LABEL: 0},
            ignore_mismatched_sizes=True,  # a classifier's head of another size is replaced
            use_safetensors=True,
            trust_remote_code=False,
        )
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=False)
    if tokenizer.pad_token is None:  # GPT-2-style models pad with EOS
        tokenizer.pad_token = tokenizer.eos_token
    net.config.pad_token_id = tokenizer.pad_token_id
    return net, tokenizer


def rewards(net, tokenizer, prompts: list[str] | None, texts: list[str], max_length: int):
    """``(B,)`` reward-model logits of the texts, given their prompts as the first of a pair
    (None: the texts alone), encoded as ``reward="classifier"`` encodes them (``input=
    "prompt+text"`` or ``"text"``; longest first truncation)."""
    pairs = (prompts,) if prompts is not None else ()
    encoded = tokenizer(
        *pairs, texts, padding=True, truncation=True, max_length=max_length, return_tensors="pt"
    ).to(net.device)
    return net(**encoded).logits[:, 0].float()


def pair_rewards(net, tokenizer, batch: list[dict], paired: bool, max_length: int):
    """The rewards of a batch's chosen and of its rejected texts, ``(B,)`` each, in one
    forward."""
    prompts = [r["prompt"] for r in batch] * 2 if paired else None
    texts = [r["chosen"] for r in batch] + [r["rejected"] for r in batch]
    scores = rewards(net, tokenizer, prompts, texts, max_length)  # (2B,)
    return scores[: len(batch)], scores[len(batch) :]


def bradley_terry_loss(chosen: torch.Tensor, rejected: torch.Tensor) -> torch.Tensor:
    """``-log sigmoid(r_chosen - r_rejected)``, averaged: the negative log-likelihood of the
    preferences under the Bradley-Terry model."""
    return -F.logsigmoid(chosen - rejected).mean()


@torch.no_grad()
def accuracy(
    net, tokenizer, rows: list[dict], paired: bool, config: RewardModelConfig
) -> float | None:
    """The share of ``rows`` whose chosen text the model scores above the rejected one."""
    if not rows:
        return None
    net.eval()
    right = 0
    for start in range(0, len(rows), config.batch_size):
        batch = rows[start : start + config.batch_size]
        chosen, rejected = pair_rewards(net, tokenizer, batch, paired, config.max_length)
        right += int((chosen > rejected).sum())
    return right / len(rows)


def train_reward_model(rows: list[dict], model: str, config: RewardModelConfig):
    """Train on ``rows``; return the model, its tokenizer and a report (pairs, held-out accuracy
    before and after, each epoch's mean loss)."""
    if not rows:
        raise ValueError("No preference rows to train on.")
    # prompt + text pairs for every row, or texts alone when no row has a prompt: decided once,
    # as the classifier reward will read them (a batch of prompt-less rows is still a pair)
    paired = any(r["prompt"] for r in rows)
    rng = np.random.default_rng(config.seed)
    order = rng.permutation(len(rows))
    held = math.ceil(config.eval_fraction * len(rows)) if len(rows) >= 10 else 0
    evaluation = [rows[i] for i in order[:held]]
    training = [rows[i] for i in order[held:]]
    net, tokenizer = load_base(model, config.seed)
    net.to(config.device)
    before = accuracy(net, tokenizer, evaluation, paired, config)
    optimizer = torch.optim.AdamW(net.parameters(), lr=config.learning_rate)
    epoch_losses: list[float] = []
    updates = config.epochs * math.ceil(len(training) / config.batch_size)
    with tqdm(total=updates, desc="reward model", disable=None) as bar:
        for _ in range(config.epochs):
            training = [training[i] for i in rng.permutation(len(training))]
            net.train()
            losses = []
            for start in range(0, len(training), config.batch_size):
                batch = training[start : start + config.batch_size]
                chosen, rejected = pair_rewards(net, tokenizer, batch, paired, config.max_length)
                loss = bradley_terry_loss(chosen, rejected)
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
                losses.append(loss.item())
                bar.update(1)
                bar.set_postfix(loss=f"{loss.item():.4f}")
            epoch_losses.append(sum(losses) / len(losses))
    net.eval()
    report = {
        "base_model": model,
        "pairs_trained": len(training),
        "pairs_held_out": len(evaluation),
        "held_out_accuracy_before": before,
        "held_out_accuracy_after": accuracy(net, tokenizer, evaluation, paired, config),
        "epoch_losses": epoch_losses,
        "input": "prompt+text" if paired else "text",
        "config": asdict(config),
    }
    return net, tokenizer, report


def usage(folder: str | os.PathLike, input: str) -> str:
    """The ``gym.make`` line that uses a saved reward model as the reward."""
    kwargs = {"model": str(folder), "label": LABEL, "output": "logit", "input": input}
    return f'gym.make("textenvs/Summarize-v0", reward="classifier", reward_kwargs={kwargs!r})'


def save(net, tokenizer, report: dict, folder: str | os.PathLike) -> Path:
    """Save the model and tokenizer (safetensors) and ``reward_model.json``, atomically."""

    from textenvs.lm import quiet_loading

    def write(tmp: Path) -> None:
        with quiet_loading():  # no "Writing model shards" bar
            net.save_pretrained(tmp, safe_serialization=True)
            tokenizer.save_pretrained(tmp)
        (tmp / "reward_model.json").write_text(json.dumps(report, indent=2) + "\n")

    return save_atomically(folder, write)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(
        prog="python -m agents.reward_model",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--preferences", required=True, help="a JSONL of {prompt, chosen, rejected}")
    p.add_argument("--model", required=True, help="the base model: a folder or hub name")
    p.add_argument("--save", default=None, help="the folder to save into (default: a new run)")
    add_config_arguments(p, RewardModelConfig)
    add_output_flags(p, "reward_model")
    args = p.parse_args(argv)
    if args.no_save and args.save:
        p.error("--no-save contradicts --save; drop one of them")
    config = config_from_args(RewardModelConfig, vars(args))
    rows = read_preferences(args.preferences)
    if args.save:
        check_save_target(args.save)
    net, tokenizer, report = train_reward_model(rows, args.model, config)
    print(
        f"held-out accuracy (chosen scored above rejected): "
        f"{_share(report['held_out_accuracy_before'])} before, "
        f"{_share(report['held_out_accuracy_after'])} after "
        f"({report['pairs_held_out']} pairs held out of {len(rows)})"
    )
    if args.no_save:
        return
    folder = args.save or new_run_folder("reward_model", Path(args.preferences).stem, args.runs_dir)
    save(net, tokenizer, report, folder)
    print(f"saved to {folder}; use it as a reward:\n  {usage(folder, report['input'])}")


def _share(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"


if __name__ == "__main__":
    run_cli(main)  # a user error as one line, "error: ...", exit status 2
