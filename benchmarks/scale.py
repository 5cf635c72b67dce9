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
* ``completions`` also holds ``two_processes_fsdp``: the two processes again with ``--fsdp true``
  (parameters, gradients and Adam states sharded; each rollout gathers the parameters once), and
  ``fsdp_vs_ddp`` = its completions/s over the DDP run's.
* ``sharded``: full fine-tuning of the 124M layout (below) in 1 process, 2 DDP processes, 2
  sharded processes (``--fsdp``, rollouts gathered once) and 2 sharded processes whose rollouts
  and evaluations run on the sharded units in lockstep (``fsdp_2_lockstep``:
  ``--fsdp-rollout sharded``, no process ever holds the whole model), one iteration each; per
  process, the numbers each holds of the parameters (policy, reference, value head), gradients
  and Adam states (``state_numbers``, the sum,
  and ``state_mb`` in float32), the peak resident memory (``ru_maxrss``), the peak before
  training (``peak_rss_before_training_mb``: loading and set-up; a sharded process reads only its
  own shards) and the resident memory after training
  (``rss_after_training_mb``, freed memory returned first), for every rank; ``fsdp_vs_ddp``: the
  worst sharded process over the worst DDP one, ``fsdp_vs_ddp_per_rank`` rank by rank
  (``fsdp_lockstep_vs_ddp*`` the same of the lockstep run). And the
  rollout's two ways under sharding, timed on the 2 sharded processes: a one-token step of
  ``--num-envs`` rows with the parameters gathered once for the rollout (``gathered_step_ms``)
  against the same step on sharded parameters, which gathers every block in every forward
  (``sharded_step_ms``: what ``--fsdp-rollout sharded`` pays per token, before its all-reduce
  of "one more forward"), and the one gather itself (``gather_ms``).
* ``checkpointing``: the update's activation memory with and without activation checkpointing
  (``--gradient-checkpointing``): one forward and backward of the policy over 4 sequences of
  ``--checkpoint-length`` tokens, 64 of them scored, on the 124M layout (or ``--sharded-model``):
  the bytes autograd keeps for the backward (``activation_mb``), the fastest of 3 forward-backward
  passes, and ``activation_ratio`` / ``time_ratio``, checkpointed over plain.
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

from textenvs.cli import int_arg, run_cli

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


def _run(command: list[str], env: dict | None, timeout: float) -> None:
    """Run ``command``; past ``timeout`` seconds it and every process below it are killed and the
    run fails: a launch whose other process died (a 2-process group left waiting) fails instead
    of hanging the benchmark, or a test, for ever."""
    with subprocess.Popen(
        command,
        cwd=ROOT,
        env={**os.environ, **(env or {})},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    ) as process:
        try:
            _, stderr = process.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            kill_tree(process.pid)
            try:  # the workers are dead, so their ends of the pipes are closed
                _, stderr = process.communicate(timeout=30)
            except subprocess.TimeoutExpired:
                stderr = "(its output could not be read)"
            raise RuntimeError(
                f"{' '.join(command[:6])} ... did not finish in {timeout:g} s (--launch-timeout) "
                f"and was killed:\n{stderr[-3000:]}"
            ) from None
    if process.returncode != 0:
        raise RuntimeError(f"{' '.join(command[:6])} ... failed:\n{stderr[-3000:]}")


def kill_tree(pid: int) -> None:
    """Kill a process and every process below it. torchrun starts each worker in a session of
    its own, so killing the launcher's process group leaves the workers running (and holding its
    output pipes); psutil (an accelerate dependency) finds them by ancestry."""
    import psutil

    try:
        root = psutil.Process(pid)
        family = [*root.children(recursive=True), root]
    except psutil.NoSuchProcess:
        return
    for member in family:
        try:
            member.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(family, timeout=30)


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
            args.launch_timeout,
        )
        return _figures(out, 1)

    result["one_process"] = one_process("one", cores)
    if args.device == "cpu" and cores > 1:  # what each of the two processes below has
        result["one_process_half_the_threads"] = one_process("one_thread", max(1, cores // 2))
    out = folder / "two.json"
    launch = _launch(2)
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
        args.launch_timeout,
    )
    result["two_processes"] = _figures(out, 2)
    result["speedup_two_processes"] = round(
        result["two_processes"]["completions_per_s"] / result["one_process"]["completions_per_s"],
        3,
    )
    out = folder / "two_fsdp.json"
    _run(
        [
            *_launch(2),
            "-m",
            "agents.token_ppo",
            *_token_ppo_args(args, 2 * per_process, out),
            "--device",
            args.device,
            "--fsdp",
            "true",
        ],
        threads,
        args.launch_timeout,
    )
    result["two_processes_fsdp"] = _figures(out, 2)
    result["fsdp_vs_ddp"] = round(
        result["two_processes_fsdp"]["completions_per_s"]
        / result["two_processes"]["completions_per_s"],
        3,
    )
    if "one_process_half_the_threads" in result:
        result["speedup_two_processes_vs_half_the_threads"] = round(
            result["two_processes"]["completions_per_s"]
            / result["one_process_half_the_threads"]["completions_per_s"],
            3,
        )
    if "ray" not in args.skip:
        result["ray_two_workers"] = _ray_two_workers(args, folder, 2 * per_process, cores)
    return result


def _ray_two_workers(args, folder: Path, episodes: int, cores: int) -> dict | str:
    """The same run's episodes collected by two Ray workers (a learner beside them)."""
    try:
        import ray  # noqa: F401
    except ImportError:
        return "skipped: pip install 'textenvs[ray]'"
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
            *_token_ppo_args(args, episodes, out),
        ],
        {"RAY_DISABLE_USAGE_STATS": "1"},
        args.launch_timeout,
    )
    return _figures(out, 2)


def _launch(processes: int) -> list[str]:
    """``accelerate launch`` of ``processes`` processes on this machine (CPU: gloo)."""
    return [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--multi_gpu",
        "--num_processes",
        str(processes),
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
        "--main_process_port",
        str(_free_port()),
    ]


SHARDED_PROBE = """
import json, os, resource, sys, time, torch
from agents.token_ppo import TokenPPO, TokenPPOConfig, make_accelerator
model, sharding, device, out = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4]
num_envs = int(sys.argv[5])
config = TokenPPOConfig(model=model, num_envs=4, max_new_tokens=8, total_episodes=4 * int(
    os.environ.get("WORLD_SIZE", "1")), minibatch_size=4, num_epochs=1, fsdp=sharding != "none",
    fsdp_rollout="sharded" if sharding == "lockstep" else "gathered", device=device)
trainer = TokenPPO(config, accelerator=make_accelerator(config))
peak_at_start = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # loading and set-up
trainer.train(progress=False)
def local(t):
    return t.to_local().numel() if hasattr(t, "to_local") else t.numel()
modules = [trainer.model, trainer.value_head] + ([trainer.reference] if trainer.reference else [])
params = {id(p): local(p) for m in modules for p in m.parameters()}
grads = sum(local(p.grad) for p in trainer.trainable if p.grad is not None)
adam = sum(local(t) for s in trainer.optimizer.state.values() for t in s.values()
           if torch.is_tensor(t) and t.dim() > 0)
import ctypes, gc
gc.collect()
ctypes.CDLL("libc.so.6").malloc_trim(0)  # freed memory back to the system: what is resident
rss = [int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmRSS")]
figures = {
    "params": sum(params.values()), "grads": grads, "adam": adam,
    "state_numbers": sum(params.values()) + grads + adam,
    "state_mb": round((sum(params.values()) + grads + adam) * 4 / 2**20, 1),
    "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
    "peak_rss_before_training_mb": round(peak_at_start, 1),
    "rss_after_training_mb": round(rss[0] / 1024, 1),
}
if trainer.units:  # the rollout's step, parameters gathered once against sharded every forward
    from agents.fsdp import gathered
    from textenvs.batching import LockstepBatch, prefill_batch
    lm, prompt = trainer.lm, trainer.lm.encode("Article: the council approves the new road")
    def steps(n):
        batch = LockstepBatch(lm, num_envs)
        for i, (seq, _, _) in enumerate(prefill_batch(lm, [prompt] * num_envs)):
            batch.adopt(i, seq)
        torch.distributed.barrier()
        start = time.perf_counter()
        for _ in range(n):
            batch.advance([17] * num_envs)
        return (time.perf_counter() - start) / n * 1000
    with torch.no_grad():
        sharded = steps(8)
        start = time.perf_counter()
        with gathered(trainer.units):
            gather = (time.perf_counter() - start) * 1000
            whole = steps(8)
    figures.update(gathered_step_ms=round(whole, 2), sharded_step_ms=round(sharded, 2),
                   gather_ms=round(gather, 1))
everyone = [figures]
if torch.distributed.is_initialized():
    everyone = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(everyone, figures)
if trainer.is_main:
    open(out, "w").write(json.dumps(everyone))
trainer.runtime.close()
"""


def sharded(args, folder: Path) -> dict:
    """Full fine-tuning of the 124M layout (or ``--sharded-model``): 1 process, 2 DDP processes,
    2 sharded processes."""
    from benchmarks.throughput import random_gpt2

    model = args.sharded_model or random_gpt2("small", vocab_size=50257)
    probe = folder / "sharded_probe.py"
    probe.write_text(SHARDED_PROBE)
    cores = os.cpu_count() or 1
    result = {}
    runs = (
        ("one_process", 1, "none"),
        ("ddp_2", 2, "none"),
        ("fsdp_2", 2, "gathered"),
        ("fsdp_2_lockstep", 2, "lockstep"),
    )
    for name, processes, sharding in runs:
        out = folder / f"{name}.json"
        start = [sys.executable] if processes == 1 else _launch(processes)
        threads = max(1, cores // processes) if args.device == "cpu" else cores
        _run(
            [*start, str(probe), model, sharding, args.device, str(out), str(args.num_envs)],
            {"OMP_NUM_THREADS": str(threads), "PYTHONPATH": str(ROOT)},
            args.launch_timeout,
        )
        result[name] = json.loads(out.read_text())
    keys = (
        "state_numbers",
        "params",
        "grads",
        "adam",
        "peak_rss_mb",
        "peak_rss_before_training_mb",
        "rss_after_training_mb",
    )
    # every rank's figures, and the ratio of the worst process of each kind (what a machine
    # must hold for the run): process 0 alone would hide a rank that holds more
    for name, run in (("fsdp", "fsdp_2"), ("fsdp_lockstep", "fsdp_2_lockstep")):
        result[f"{name}_vs_ddp_per_rank"] = [
            {key: round(fsdp[key] / ddp[key], 4) for key in keys}
            for ddp, fsdp in zip(result["ddp_2"], result[run])
        ]
        result[f"{name}_vs_ddp"] = {
            key: round(max(r[key] for r in result[run]) / max(r[key] for r in result["ddp_2"]), 4)
            for key in keys
        }
    fsdp = result["fsdp_2"][0]
    result["sharded_vs_gathered_step"] = round(
        fsdp["sharded_step_ms"] / fsdp["gathered_step_ms"], 3
    )
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


def checkpointing(args) -> dict:
    """The update's activation memory and time with and without activation checkpointing
    (``--gradient-checkpointing``): one forward and backward of the policy over 4 sequences of
    ``--checkpoint-length`` tokens (a long prompt and its 64 generated tokens scored), the 124M
    layout (or ``--sharded-model``), in this process, the same weights both ways."""
    import time

    from agents.token_ppo import TokenPPO, TokenPPOConfig, checkpoint_blocks, held_for_backward
    from benchmarks.throughput import random_gpt2

    model = args.sharded_model or random_gpt2("small", vocab_size=50257)
    trainer = TokenPPO(
        TokenPPOConfig(model=model, num_envs=1, total_episodes=1, device=args.device)
    )
    batch, length = 4, args.checkpoint_length
    scored = min(64, length - 1)
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, trainer.lm.vocab_size, (batch, length), generator=gen)
    ids = ids.to(trainer.lm.device)
    positions = torch.arange(length - scored - 1, length - 1, device=ids.device).expand(batch, -1)

    def step() -> tuple[int, float]:
        trainer.optimizer.zero_grad()
        start = time.perf_counter()
        (logp, _, values), kept = held_for_backward(
            lambda: trainer.policy(ids, torch.ones_like(ids), positions, ids[:, -scored:], 1.0)
        )
        (logp.sum() + values.sum()).backward()
        if ids.device.type == "cuda":
            torch.cuda.synchronize()
        return kept, time.perf_counter() - start

    figures = {}
    for name in ("plain", "checkpointed"):
        if name == "checkpointed":
            checkpoint_blocks(trainer.model)
        step()  # warm-up
        kept, seconds = min((step() for _ in range(3)), key=lambda r: r[1])
        figures[name] = {"activation_mb": round(kept / 2**20, 1), "forward_backward_s": seconds}
    plain, checkpointed = figures["plain"], figures["checkpointed"]
    return {
        "batch": batch,
        "length": length,
        "scored_tokens": scored,
        "layers": trainer.lm.n_layers,
        **figures,
        "activation_ratio": round(checkpointed["activation_mb"] / plain["activation_mb"], 4),
        "time_ratio": round(checkpointed["forward_backward_s"] / plain["forward_backward_s"], 3),
    }


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--env-id", default="textenvs/Summarize-v0")
    p.add_argument("--num-envs", type=int_arg(), default=16, help="sub-envs per process")
    p.add_argument("--max-new-tokens", type=int_arg(), default=16)
    p.add_argument("--iterations", type=int_arg(), default=8, help="iterations per process")
    p.add_argument("--lora-r", type=int_arg(0), default=8)
    p.add_argument("--device", default="cpu")
    p.add_argument(
        "--sharded-model",
        help="the model of the sharded and checkpointing figures (default: a random GPT-2 of the "
        "124M layout)",
    )
    p.add_argument(
        "--checkpoint-length",
        type=int_arg(),
        default=512,
        help="tokens per sequence of the checkpointing figures",
    )
    p.add_argument(
        "--launch-timeout",
        type=int_arg(1),
        default=3600,
        help="seconds a run may take before it is killed and the benchmark fails (a 2-process "
        "launch whose other process died would wait for ever)",
    )
    p.add_argument(
        "--skip",
        choices=("completions", "ray", "memory", "sharded", "checkpointing"),
        action="append",
        default=[],
    )
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
        if "sharded" not in args.skip:
            result["sharded"] = sharded(args, Path(tmp))
        if "checkpointing" not in args.skip:
            result["checkpointing"] = checkpointing(args)
    print(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    run_cli(main)  # a user error as one line, "error: ...", exit status 2
