"""Real-workload figures: a batched model-based reward, and a GPT-2-sized model on CNN/DM's schema.

``python -m benchmarks.workloads`` prints one JSON object with two parts, each measured in this run
on randomly initialised models it saves to a temporary folder (nothing is downloaded):

* ``bertscore``: ``--num-envs`` N generation envs with a dense BERTScore reward (a random BERT
  encoder of ``--encoder-layers`` layers), stepped as ONE batched vector env (one LM forward and
  one BERTScore forward per step) against N single envs stepped one after another (N of each);
  sub-env steps per second of both and their ratio, over ``--repeats`` rounds in which the two
  sides alternate (the median, and the range of the rounds' ratios).
* ``gpt2_cnndm``: a random GPT-2 of the 124M layout (12 layers, 768 wide, 50,257 head rows, 1,024
  positions; the built-in tokenizer) on a CNN/DailyMail-schema file (``article``, ``highlights``,
  ``id``) of articles longer than the context, ``too_long="truncate"`` (the id's default): steps
  per second of an N-env batched env, and the resident memory it adds per sub-env after reset.

Each section runs in a fresh process (``measured_in`` in the JSON says so), so no section's heap
is counted in another's memory.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time

import numpy as np

from textenvs.cli import int_arg, run_cli
from textenvs.lm import quiet_loading


def rss_mb() -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) / 1024 for line in f if line.startswith("VmRSS:"))


def random_encoder(folder: str, layers: int) -> str:
    """A random BERT encoder with the built-in tokenizer, saved with save_pretrained."""
    import torch
    from transformers import AutoTokenizer, BertConfig, BertModel

    from textenvs.lm import BUILTIN_MODELS, TINY

    tokenizer = AutoTokenizer.from_pretrained(BUILTIN_MODELS[TINY])
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=len(tokenizer),
        hidden_size=256,
        num_hidden_layers=layers,
        num_attention_heads=4,
        intermediate_size=1024,
        max_position_embeddings=512,
    )
    with quiet_loading():  # no "Writing model shards" bar
        BertModel(config).save_pretrained(folder, safe_serialization=True)
        tokenizer.save_pretrained(folder)
    return folder


def cnndm_files(folder: str, n: int) -> dict:
    """``data_files`` of CNN/DailyMail's schema: each article is several built-in articles (longer
    than 1,024 tokens), its highlights the first one's headline."""
    from textenvs.tasks import builtin_task

    samples = builtin_task("summarize").split("train")
    files = {}
    for split in ("train", "validation", "test"):
        path = os.path.join(folder, f"cnndm-{split}.jsonl")
        with open(path, "w", encoding="utf-8") as f:
            for i in range(n):
                parts = [samples[(i * 13 + j) % len(samples)] for j in range(30)]
                row = {
                    "article": " ".join(s.source for s in parts),
                    "highlights": parts[0].references[0],
                    "id": f"{i:040x}",
                }
                f.write(json.dumps(row) + "\n")
        files[split] = path
    return files


def steps_per_second(step, n_steps: int, sub_envs: int) -> float:
    start = time.perf_counter()
    for _ in range(n_steps):
        step()
    return n_steps * sub_envs / (time.perf_counter() - start)


def measure_bertscore(args: argparse.Namespace, folder: str) -> dict:
    import gymnasium as gym

    encoder = random_encoder(os.path.join(folder, "encoder"), args.encoder_layers)
    kwargs = dict(
        reward="bertscore",
        reward_kwargs={"model": encoder, "num_layers": args.encoder_layers},
        dense=True,
        max_steps=args.max_steps,
        token_mode="topk",
        k=8,
    )
    n = args.num_envs
    rng = np.random.default_rng(0)
    vec = gym.make_vec("textenvs/Summarize-v0", num_envs=n, **kwargs)
    vec.reset(seed=0)
    singles = [gym.make("textenvs/Summarize-v0", **kwargs) for _ in range(n)]
    for i, env in enumerate(singles):
        env.reset(seed=i)

    def step_batched():
        vec.step(rng.integers(8, size=n))

    def step_singles():
        for env in singles:
            *_, terminated, truncated, _ = env.step(int(rng.integers(8)))
            if terminated or truncated:
                env.reset()

    # the two sides alternate round by round, and who goes first alternates too, so a burst of
    # load on the machine lands on both; each round's ratio is of its own two timings
    batched, alone = [], []
    for round_ in range(args.repeats):
        sides = [(step_batched, batched), (step_singles, alone)]
        for step, rates in sides[:: 1 if round_ % 2 == 0 else -1]:
            rates.append(steps_per_second(step, args.steps, n))
    ratios = [b / a for b, a in zip(batched, alone)]
    return {
        "num_envs": n,
        "encoder_layers": args.encoder_layers,
        "steps": args.steps,
        "rounds": args.repeats,
        "batched_steps_per_s": round(float(np.median(batched)), 1),
        "single_envs_steps_per_s": round(float(np.median(alone)), 1),
        "batched_over_single": round(float(np.median(ratios)), 2),
        "batched_over_single_range": [round(min(ratios), 2), round(max(ratios), 2)],
    }


def measure_gpt2(args: argparse.Namespace, folder: str) -> dict:
    import gymnasium as gym

    from benchmarks.throughput import random_gpt2
    from textenvs.lm import shared_model

    model = random_gpt2("small", vocab_size=50257)  # GPT-2's 124M layout, its 50,257 head rows
    files = cnndm_files(folder, args.num_envs * 2)
    shared_model(model)  # the weights are not the envs' memory
    before = rss_mb()
    n = args.num_envs
    start = time.perf_counter()
    envs = gym.make_vec(
        "textenvs/CNNDailyMail-v0",
        num_envs=n,
        model=model,
        dataset_kwargs={"data_files": files},
        max_steps=args.max_steps,
    )
    envs.reset(seed=0)
    reset_s = time.perf_counter() - start
    added = rss_mb() - before
    prompt = [len(env.sequence) for env in envs.unwrapped.envs]
    rng = np.random.default_rng(0)
    vocab = envs.unwrapped.lm.vocab_size
    steps = min(args.steps, args.max_steps - 1)  # within the first episodes: no prefill mixed in
    rate = steps_per_second(lambda: envs.step(rng.integers(1, vocab, size=n)), steps, n)
    return {
        "num_envs": n,
        "parameters_m": round(sum(p.numel() for p in envs.unwrapped.lm.model.parameters()) / 1e6),
        "prompt_tokens_mean": round(float(np.mean(prompt)), 1),
        "context": envs.unwrapped.lm.max_positions,
        "build_and_reset_s": round(reset_s, 1),
        "steps": steps,
        "batched_steps_per_s": round(rate, 1),
        "rss_added_mb": round(added, 1),
        "rss_added_per_sub_env_mb": round(added / n, 1),
        # what the KV cache of the filled positions must take (float32 keys and values)
        "kv_cache_per_sub_env_mb": round(
            2 * 12 * 768 * 4 * (float(np.mean(prompt)) + args.max_steps) / 2**20, 1
        ),
    }


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--num-envs", type=int_arg(), default=16, help="sub-envs (and single envs)")
    p.add_argument("--steps", type=int_arg(), default=48, help="vector steps measured")
    p.add_argument(
        "--repeats",
        type=int_arg(),
        default=5,
        help="rounds of the BERTScore race, batched and single envs alternating (median reported)",
    )
    p.add_argument("--max-steps", type=int_arg(), default=32, help="tokens per episode")
    p.add_argument(
        "--encoder-layers", type=int_arg(), default=4, help="layers of the BERTScore encoder"
    )
    p.add_argument("--skip-gpt2", action="store_true", help="measure the BERTScore part only")
    p.add_argument(
        "--threads", type=int_arg(), default=None, help="torch threads (default: torch's own)"
    )
    args = p.parse_args(argv)
    sections = ["bertscore"] + ([] if args.skip_gpt2 else ["gpt2_cnndm"])
    # each section in a fresh interpreter: an earlier section's freed memory stays in this
    # process's heap and would be counted, or hidden, in the next one's resident memory
    import multiprocessing

    with multiprocessing.get_context("spawn").Pool(1, maxtasksperchild=1) as pool:
        parts = {name: pool.apply(_section, (name, vars(args))) for name in sections}
        if "gpt2_cnndm" in parts and args.num_envs >= 2:
            # the same section with half the sub-envs, in another fresh process: the difference
            # is what a sub-env adds, whatever the process's own start left in its heap
            half = {**vars(args), "num_envs": args.num_envs // 2}
            parts["gpt2_half"] = pool.apply(_section, ("gpt2_cnndm", half))
    result = {
        "bertscore": parts["bertscore"]["figures"],
        "torch_threads": parts["bertscore"]["torch_threads"],
        "measured_in": "a fresh process per section (multiprocessing spawn)",
    }
    if "gpt2_cnndm" in parts:
        whole = parts["gpt2_cnndm"]["figures"]
        result["gpt2_cnndm"] = whole
        if "gpt2_half" in parts:
            half = parts["gpt2_half"]["figures"]
            added = whole["rss_added_mb"] - half["rss_added_mb"]
            result["gpt2_cnndm"]["rss_marginal_per_sub_env_mb"] = round(
                added / (whole["num_envs"] - half["num_envs"]), 1
            )
            result["gpt2_cnndm"]["rss_marginal_over_kv_cache"] = round(
                result["gpt2_cnndm"]["rss_marginal_per_sub_env_mb"]
                / whole["kv_cache_per_sub_env_mb"],
                2,
            )
    print(json.dumps(result))
    return result


def _section(name: str, settings: dict) -> dict:
    """One section of :func:`main`, run in a worker process of its own."""
    import torch

    if settings.get("threads"):
        torch.set_num_threads(settings["threads"])
    torch.manual_seed(0)
    args = argparse.Namespace(**settings)
    measure = {"bertscore": measure_bertscore, "gpt2_cnndm": measure_gpt2}[name]
    with tempfile.TemporaryDirectory() as folder:
        figures = measure(args, folder)
    return {"figures": figures, "torch_threads": torch.get_num_threads()}


if __name__ == "__main__":
    run_cli(main)  # a user error as one line, "error: ...", exit status 2
