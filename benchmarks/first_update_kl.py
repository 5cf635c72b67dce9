"""How far ONE update moves a GPT-2-sized policy from its reference, by learning rate.

    python -m benchmarks.first_update_kl --json-out benchmarks/latest/first_update_kl.json

A randomly initialised GPT-2 of the 124M layout (12 layers, 768 wide, GPT-2's 50,257 head rows;
nothing is downloaded) trains token PPO on a CNN/DailyMail-schema file for ``--iterations``
updates at each ``--learning-rates`` value (``auto``: the trainer's ``learning_rate=None``, chosen
by the model's size). It prints one JSON object: per rate, the rate used, the KL to the reference
of each rollout (nats per episode, summed over its tokens: the first rollout is the reference's
own, 0) and each update's mean ``approx_kl`` (nats per token, policy before against after).

A random model is not a pretrained one: its next-token distributions are flat, a pretrained
GPT-2's are peaked. It measures what an Adam step of a given size does to a model of this many
weights, which is why the default learning rate depends on the size; recipes for pretrained
models are in the agents guide.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

from textenvs.cli import float_arg, int_arg, run_cli


def learning_rate(text: str) -> float | None:
    """A positive learning rate, or ``auto`` (None: the trainer chooses by size)."""
    return None if text == "auto" else float_arg(0, low_open=True)(text)


def measure(args: argparse.Namespace) -> dict:
    from agents.token_ppo import TokenPPO, TokenPPOConfig
    from benchmarks.throughput import random_gpt2
    from benchmarks.workloads import cnndm_files

    model = random_gpt2("small", vocab_size=50257)
    files = cnndm_files(tempfile.mkdtemp(), args.num_envs * 2)
    runs = []
    for rate in args.learning_rates:
        config = TokenPPOConfig(
            env_id="textenvs/CNNDailyMail-v0",
            model=model,
            env_kwargs={
                "dataset_kwargs": {"data_files": files},
                "max_prompt_tokens": args.prompt_tokens,
            },
            num_envs=args.num_envs,
            minibatch_size=args.num_envs,
            max_new_tokens=args.max_new_tokens,
            total_episodes=args.num_envs * args.iterations,
            learning_rate=rate,
            anneal_lr=False,
            seed=args.seed,
        )
        trainer = TokenPPO(config)
        started = time.perf_counter()
        history = trainer.train(progress=False)
        runs.append(
            {
                "learning_rate": "auto" if rate is None else rate,
                "learning_rate_used": trainer.learning_rate,
                "rollout_kl_per_episode": [round(h["kl"], 4) for h in history],
                "update_approx_kl_per_token": [round(h["approx_kl"], 5) for h in history],
                "seconds": round(time.perf_counter() - started, 1),
            }
        )
    return {
        "model": "random GPT-2, 124M layout",
        "model_parameters": trainer.model_parameters,
        "env_id": "textenvs/CNNDailyMail-v0 (a CNN/DailyMail-schema file)",
        "episodes_per_update": args.num_envs,
        "max_new_tokens": args.max_new_tokens,
        "prompt_tokens": args.prompt_tokens,
        "num_epochs": TokenPPOConfig.num_epochs,
        "torch_threads": torch.get_num_threads(),
        "runs": runs,
    }


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument(
        "--learning-rates",
        nargs="+",
        type=learning_rate,
        default=[3e-4, 1e-5, None],
        help="rates to try; 'auto' is the trainer's default (chosen by size)",
    )
    p.add_argument("--iterations", type=int_arg(), default=2, help="updates per rate")
    p.add_argument("--num-envs", type=int_arg(), default=16, help="episodes per update")
    p.add_argument("--max-new-tokens", type=int_arg(), default=16, help="tokens per episode")
    p.add_argument("--prompt-tokens", type=int_arg(), default=48, help="prompt tokens kept")
    p.add_argument("--seed", type=int_arg(0), default=0, help="seed of every run")
    p.add_argument("--json-out", help="also write the JSON here")
    args = p.parse_args(argv)
    out = measure(args)
    print(json.dumps(out))
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(out, indent=1) + "\n")
    return out


if __name__ == "__main__":
    run_cli(main)  # a user error as one line, "error: ...", exit status 2
