"""Token PPO past one process: completions/s for 1 and 2 processes, and LoRA against full
fine-tuning in memory.

``python -m benchmarks.scale`` prints one JSON object:

* ``completions``: the same token-PPO run (``--env-id``, ``--num-envs`` sub-envs per process,
  ``--iterations`` iterations per process, no evaluation in the timing) as
  - ``one_process``: ``python -m agents.token_ppo``, torch using every core;
  - ``two_processes``: ``accelerate launch --num_processes 2`` (DDP; gloo on a CPU, NCCL on GPUs),
    one torch thread per process on a CPU;
  - ``ray_two_workers`` (when ray is installed): ``agents.ray_rollouts``, two Ray actors collecting,
    one learner;
  each with ``completions_per_s`` = completions / wall seconds of the whole ``train()`` (rollouts
  and updates), and ``speedup_two_processes`` = two / one. On a CPU,
  ``one_process_half_the_threads`` is one process with the threads each of the two has, and
  ``speedup_two_processes_vs_half_the_threads`` the scaling of the processes themselves (the first
  ratio also carries what intra-op threads already gave the one process). Each process trains on
  its own ``--num-envs`` episodes per iteration, so two processes train on twice the episodes per
  update.
* ``memory``: one token-PPO iteration on a randomly initialised GPT-2 of the 124M layout (12
  layers, d = 768, the tiny model's tokenizer; saved to a temporary folder, nothing downloaded),
  full fine-tuning and LoRA (``--lora-r``, ``c_attn``), each in a fresh process: trainable and
  resident parameters (policy + reference + value head + adapter), optimizer-state numbers, peak
  resident memory (``ru_maxrss``) and, on CUDA, peak allocated GPU memory; ``lora_vs_full`` ratios.

Compare the ratios, not absolute figures across machines.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from textenvs.cli import run_cli

ROOT = Path(__file__).resolve().parents[1]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _token_ppo_args(args, episodes: int, out: Path) -> list[str]:
    """The run's flags, which ``agents.token_ppo`` and ``agents.ray_rollouts`` both take."""
    return [
        "--env-id",
        args.env_id,
        "--num-envs",
        str(args.num_envs),
        "--max-new-tokens",
        str(args.max_new_tokens),
        "--total-episodes",
        str(episodes),
        "--minibatch-size",
        str(args.num_envs // 2 or 1),
        "--eval-samples",
        "1",
        "--json-out",
        str(out),
    ]


def _run(command: list[str], env: dict | None = None) -> None:
    run = subprocess.run(
        command, cwd=ROOT, env={**os.environ, **(env or {})}, capture_output=True, text=True
    )
    if run.returncode != 0:
        raise RuntimeError(f"{' '.join(command[:6])} ... failed:\n{run.stderr[-3000:]}")


def _figures(report_path: Path, processes: int) -> dict:
    report = json.loads(report_path.read_text())
    return {
        "processes": processes,
        "episodes": report["episodes"],
        "train_seconds": report["train_seconds"],
        "completions_per_s": round(report["episodes"] / report["train_seconds"], 2),
        "rollout_completions_per_s": round(report["completions_per_s"], 2),
    }


def completions(args, folder: Path) -> dict:
    """The same run on 1 process, 2 accelerate processes and (if installed) 2 Ray workers."""
    per_process = args.num_envs * args.iterations
    cores = os.cpu_count() or 1
    result = {}

    def one_process(name: str, threads: int) -> dict:
        out = folder / f"{name}.json"
        command = [sys.executable, "-m", "agents.token_ppo"]
        _run(
            [*command, *_token_ppo_args(args, per_process, out), "--device", args.device],
            {"OMP_NUM_THREADS": str(threads)},
        )
        return _figures(out, 1)

    result["one_process"] = one_process("one", cores)
    if args.device == "cpu" and cores > 1:  # what each of the two processes below has
        result["one_process_half_the_threads"] = one_process("one_thread", max(1, cores // 2))
    out = folder / "two.json"
    launch = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--multi_gpu",
        "--num_processes",
        "2",
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
        "--main_process_port",
        str(_free_port()),
    ]
    threads = {"OMP_NUM_THREADS": str(max(1, cores // 2))} if args.device == "cpu" else {}
    _run(
        [
            *launch,
            "-m",
            "agents.token_ppo",
            *_token_ppo_args(args, 2 * per_process, out),
            "--device",
            args.device,
        ],
        threads,
    )
    result["two_processes"] = _figures(out, 2)
    result["speedup_two_processes"] = round(
        result["two_processes"]["completions_per_s"] / result["one_process"]["completions_per_s"],
        3,
    )
    if "ray" in args.skip:
        return result
    if "one_process_half_the_threads" in result:
        result["speedup_two_processes_vs_half_the_threads"] = round(
            result["two_processes"]["completions_per_s"]
            / result["one_process_half_the_threads"]["completions_per_s"],
            3,
        )
    try:
        import ray  # noqa: F401
    except ImportError:
        result["ray_two_workers"] = "skipped: pip install 'textenvs[ray]'"
        return result
    out = folder / "ray.json"
    _run(
        [
            sys.executable,
            "-m",
            "agents.ray_rollouts",
            "--workers",
            "2",
            "--num-cpus",
            str(max(2, cores)),
            *_token_ppo_args(args, 2 * per_process, out),
        ],
        {"RAY_DISABLE_USAGE_STATS": "1"},
    )
    result["ray_two_workers"] = _figures(out, 2)
    return result


MEMORY_PROBE = """
import json, resource, sys, torch
from agents.token_ppo import TokenPPO, TokenPPOConfig
model, lora_r, device = sys.argv[1], int(sys.argv[2]), sys.argv[3]
trainer = TokenPPO(TokenPPOConfig(model=model, num_envs=4, max_new_tokens=8, total_episodes=4,
                                  minibatch_size=4, num_epochs=1, lora_r=lora_r, device=device))
if device.startswith("cuda"):
    torch.cuda.reset_peak_memory_stats()
trainer.train(progress=False)
modules = [trainer.model, trainer.value_head] + ([trainer.reference] if trainer.reference else [])
resident = {id(p): p.numel() for m in modules for p in m.parameters()}
state = trainer.optimizer.state_dict()["state"]
print(json.dumps({
    "trainable_params": sum(p.numel() for p in trainer.trainable),
    "resident_params": sum(resident.values()),
    "optimizer_state_numbers": sum(t.numel() for s in state.values() for t in s.values()
                                   if torch.is_tensor(t) and t.dim() > 0),
    "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
    "peak_gpu_mb": round(torch.cuda.max_memory_allocated() / 2**20, 1)
    if device.startswith("cuda") else None,
}))
"""


def memory(args) -> dict:
    from benchmarks.throughput import random_gpt2

    model = random_gpt2("small", vocab_size=50257)  # GPT-2's own table: the 124M count
    result = {}
    for name, lora_r in (("full", 0), ("lora", args.lora_r)):
        run = subprocess.run(
            [sys.executable, "-c", MEMORY_PROBE, model, str(lora_r), args.device],
            cwd=ROOT,
            capture_output=True,
            text=True,
        )
        if run.returncode != 0:
            raise RuntimeError(f"memory probe ({name}) failed:\n{run.stderr[-3000:]}")
        result[name] = json.loads(run.stdout.strip().splitlines()[-1])
    result["lora_r"] = args.lora_r
    result["lora_vs_full"] = {
        key: round(result["lora"][key] / result["full"][key], 4)
        for key in ("trainable_params", "resident_params", "peak_rss_mb", "peak_gpu_mb")
        if result["full"][key]
    }
    return result


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--env-id", default="textenvs/Summarize-v0")
    p.add_argument("--num-envs", type=int, default=16, help="sub-envs per process")
    p.add_argument("--max-new-tokens", type=int, default=16)
    p.add_argument("--iterations", type=int, default=8, help="iterations per process")
    p.add_argument("--lora-r", type=int, default=8)
    p.add_argument("--device", default="cpu")
    p.add_argument("--skip", choices=("completions", "ray", "memory"), action="append", default=[])
    args = p.parse_args(argv)
    result = {
        "machine": {
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "torch": torch.__version__,
            "device": args.device,
        },
        "config": {k: v for k, v in vars(args).items() if k != "skip"},
    }
    with tempfile.TemporaryDirectory() as tmp:
        if "completions" not in args.skip:
            result["completions"] = completions(args, Path(tmp))
        if "memory" not in args.skip:
            result["memory"] = memory(args)
    print(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    run_cli(main)  # a user error as one line, "error: ...", exit status 2
