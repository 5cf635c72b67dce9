"""Throughput of the environments against the raw model forward and a naive recompute.

``python -m benchmarks.throughput --json`` prints one JSON object:

* ``raw_forward_tokens_per_s``: the model's incremental forward with a KV cache, batch 1, no env;
* ``env_steps_per_s``: ``textenvs/Summarize-v0`` steps (random token actions, episodes of
  ``--episode-length`` tokens, dense ROUGE-L reward), resets not timed;
  ``env_steps_with_resets_per_s``: the same with each episode's reset (its prompt forward) timed,
  as the batched env's figure is;
* ``naive_steps_per_s``: the same env stepped the way a text-only env must: every step re-runs the
  whole prompt + generated sequence through the model;
* ``ratio_to_raw`` = env / raw and ``speedup_vs_naive`` = env / naive;
* ``edit_steps_per_s``: ``textenvs/Edit-v0`` steps, uniformly random valid edits (insert / delete /
  replace, top-k tokens) on texts of ``--edit-length`` tokens, reusing the cache before the edit;
* ``edit_full_recompute_steps_per_s``: the same edits, recomputing prompt + text from scratch;
  ``edit_speedup`` = the first over the second;
* ``edit_vector_steps_per_s``: sub-env steps per second of ``gym.make_vec("textenvs/Edit-v0",
  num_envs=--num-envs)`` with the same kind of edits on the same text in every sub-env (one
  batched forward over the recomputed tails, split by tail length where padding would cost more
  than an extra forward), and ``edit_vector_speedup_vs_single`` over ``edit_steps_per_s``.

* ``vector_steps_per_s``: env steps per second of ``gym.make_vec("textenvs/Summarize-v0",
  num_envs=--num-envs)`` (the batched env, auto-resets included), against
  ``batched_bound_steps_per_s``, the bare batched incremental forward of the same batch size and
  model (one cache, equal lengths, no env); ``vector_ratio_to_bound`` and
  ``vector_speedup_vs_single`` (over ``env_steps_per_s``). The bound has no episode starts;
  ``batched_bound_with_prefill_steps_per_s`` adds the one batched prompt forward per episode that
  any env must run (``vector_ratio_to_bound_with_prefill``). ``batched_model_work_steps_per_s``:
  the model work of the batched env itself, bare: its own prompts whole (right-padded to the
  longest, attention mask, per-row positions), their prefill and the steps; what the env adds on
  top of that is ``vector_ratio_to_model_work``. ``vector_speedup_vs_single_with_resets`` compares
  with ``env_steps_with_resets_per_s``. ``vector_terminal_steps_per_s``: the batched env with
  ``dense=False``, which computes the metric once per episode instead of every step;
* ``vector_rss_mb_first`` / ``vector_rss_mb_last``: resident memory after the first tenth and at
  the end of ``--memory-steps`` env steps of the batched env (flat when finished caches are freed);
  ``memory``: the same for every id in each of its modes (generation vocab / top-k, editing pooled /
  positions) with random actions, and ``memory_max_growth_pct``, the largest growth among them.

``--random-gpt2 small`` measures a randomly initialised GPT-2 of the 124M layout (12 layers,
d = 768, the tiny model's tokenizer) saved to a temporary folder, to see how the ratios move with
model size without any download.

Every figure of one run comes from the same process, model and episode length; all but the edit
figures are the median of ``--repeats`` rounds (the batched env and its bounds are timed in turn
within each round). Compare the ratios, not the absolute numbers across machines.
"""

from __future__ import annotations

import argparse
import json
import platform
import time

import gymnasium as gym
import numpy as np
import torch

import textenvs
from textenvs.batching import takes_prepared_step_mask
from textenvs.cli import CommandLineError, int_arg, run_cli
from textenvs.envs.edit import DELETE, INSERT, REPLACE, TextEditEnv
from textenvs.envs.generate import TextGenerationEnv
from textenvs.lm import quiet_loading


def recompute_forward(lm, seq, tokens: list[int]):
    """``tokens`` appended to ``seq`` the way a text-only env must: the whole sequence run again, no
    cache reuse.

    Returns the hidden states and logits of the new positions, as :meth:`TextEnv.forward` does.
    """
    if not tokens:
        return None, None
    ids = seq.ids + tokens
    lm.crop(seq, 0)
    hidden, logits = lm.extend(seq, ids)  # one full forward over prompt + text
    return hidden[-len(tokens) :], logits[-len(tokens) :]


class NaiveGenerationEnv(TextGenerationEnv):
    """The generation env without KV-cache reuse: every step recomputes the whole sequence.

    Everything but the forward is the env's own (its ``begin_step`` / ``finish_step``).
    """

    def forward(self, tokens):
        return recompute_forward(self.lm, self.sequence, tokens)


def _non_eos_actions(env: TextGenerationEnv, rng: np.random.Generator, n: int) -> list[int]:
    # Random tokens, EOS excluded, so every episode has exactly the requested length.
    actions = rng.integers(env.action_space.n, size=n)
    return [int(a) if a != env.lm.eos_token_id else int(a) + 1 for a in actions]


def time_env_steps(
    env: TextGenerationEnv, episodes: int, length: int, seed: int, resets: bool = False
) -> float:
    """Steps per second over ``episodes`` full episodes, reset time excluded unless ``resets``."""
    rng = np.random.default_rng(seed)
    steps, elapsed = 0, 0.0
    for ep in range(episodes):
        reset_start = time.perf_counter()
        env.reset(seed=seed + ep)
        actions = _non_eos_actions(env, rng, length)
        start = reset_start if resets else time.perf_counter()
        for a in actions:
            _, _, terminated, truncated, _ = env.step(a)
            steps += 1
            if terminated or truncated:
                break
        elapsed += time.perf_counter() - start
    return steps / elapsed


def time_raw_forward(env: TextGenerationEnv, episodes: int, length: int, seed: int) -> float:
    """Tokens per second of the bare incremental forward, same prompts and lengths as the env."""
    rng = np.random.default_rng(seed)
    lm, tokens, elapsed = env.lm, 0, 0.0
    for ep in range(episodes):
        env.reset(seed=seed + ep)
        seq, _, _ = lm.prefill(lm.encode(env.prompt))
        actions = _non_eos_actions(env, rng, length)
        start = time.perf_counter()
        for a in actions:
            lm.extend(seq, [a])
            tokens += 1
        elapsed += time.perf_counter() - start
    return tokens / elapsed


class FullRecomputeEditEnv(TextEditEnv):
    """The edit env without prefix reuse: every edit re-runs prompt + text from scratch.

    Everything but the forward is the env's own (its ``begin_step`` / ``finish_step``).
    """

    def forward(self, tokens):
        return recompute_forward(self.lm, self.sequence, tokens)


def random_valid_edit(env: TextEditEnv, rng: np.random.Generator) -> tuple[int, int, int]:
    """A uniformly random insert / delete / replace that is valid for the current text."""
    n = len(env.text_ids)
    ops = ([INSERT] if n < env.max_len else []) + ([DELETE, REPLACE] if n > 0 else [])
    op = int(rng.choice(ops))
    position = int(rng.integers(n + 1 if op == INSERT else n))
    return op, position, int(rng.integers(env.n_tokens))


def time_edit_steps(env: TextEditEnv, text: str, n_steps: int, seed: int) -> float:
    rng = np.random.default_rng(seed)
    env.reset(seed=seed, options={"text": text})
    elapsed = 0.0
    for _ in range(n_steps):
        action = random_valid_edit(env, rng)
        start = time.perf_counter()
        env.step(action)
        elapsed += time.perf_counter() - start
    return n_steps / elapsed


def measure_edit(args: argparse.Namespace, model) -> dict:
    kwargs = dict(
        model=model,
        task="summarize",
        max_len=args.edit_length + 32,
        max_steps=10**9,
        token_mode="topk",
        obs="positions",
        device=args.device,
    )
    env = TextEditEnv(**kwargs)
    full = FullRecomputeEditEnv(**kwargs)
    env.reset(seed=args.seed)
    words = (env.sample.source + " ") * 4
    text = env.lm.decode(env.lm.encode(" " + words)[: args.edit_length]).strip()
    time_edit_steps(env, text, 10, args.seed)  # warm-up
    reuse = time_edit_steps(env, text, args.edit_steps, args.seed)
    recompute = time_edit_steps(full, text, args.edit_steps, args.seed)
    envs = gym.make_vec("textenvs/Edit-v0", num_envs=args.num_envs, **kwargs)
    vector = time_edit_vector_steps(envs, text, max(2, args.edit_steps // 5), args.seed)
    return {
        "edit_text_tokens": args.edit_length,
        "edit_steps_per_s": round(reuse, 1),
        "edit_full_recompute_steps_per_s": round(recompute, 1),
        "edit_speedup": round(reuse / recompute, 2),
        "edit_vector_steps_per_s": round(vector, 1),
        "edit_vector_speedup_vs_single": round(vector / reuse, 2),
    }


def time_edit_vector_steps(envs, text: str, n_steps: int, seed: int) -> float:
    """Sub-env steps per second of the batched edit env, each sub-env editing ``text`` at random."""
    rng = np.random.default_rng(seed)
    envs.reset(seed=seed, options={"text": text})
    elapsed = 0.0
    for _ in range(n_steps):
        actions = np.array([random_valid_edit(env, rng) for env in envs.unwrapped.envs])
        start = time.perf_counter()
        envs.step(actions)
        elapsed += time.perf_counter() - start
    return n_steps * envs.num_envs / elapsed


def rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def time_vector_steps(envs, episodes: int, length: int, seed: int) -> float:
    rng = np.random.default_rng(seed)
    envs.reset(seed=seed)
    eos = envs.unwrapped.lm.eos_token_id
    steps, elapsed = 0, 0.0
    for _ in range(episodes * length):
        actions = rng.integers(envs.single_action_space.n, size=envs.num_envs)
        actions[actions == eos] += 1
        start = time.perf_counter()
        envs.step(actions)
        elapsed += time.perf_counter() - start
        steps += envs.num_envs
    return steps / elapsed


def time_batched_forward(
    lm, prompts: list[str], length: int, seed: int, prefill: bool = False, whole: bool = False
) -> float:
    """Tokens per second of the bare batched incremental forward: one cache, no env.

    ``whole=False`` (the bound): every prompt cut to the shortest, so the rows have equal lengths
    and need no attention mask. ``whole=True``: the prompts kept whole, right-padded to the longest
    with an attention mask and per-row positions, which is the model work of the batched env itself.
    ``prefill=True`` also times the one batched forward of the prompts that starts the episodes
    (the LM head at one position per row, as the env runs it).
    """
    from transformers import DynamicCache

    rng = np.random.default_rng(seed)
    mask_4d = takes_prepared_step_mask(lm.model.config)
    ids = [lm.encode(p) for p in prompts]
    lengths = torch.tensor([len(i) for i in ids])
    width = int(lengths.max()) if whole else int(lengths.min())
    batch = torch.full((len(ids), width), lm.eos_token_id, dtype=torch.long)
    mask = torch.zeros_like(batch)
    for b, row in enumerate(ids):
        batch[b, : min(len(row), width)] = torch.tensor(row[:width])
        mask[b, : len(row)] = 1
    positions = lengths[:, None].to(lm.device) if whole else None
    mask = mask.to(lm.device) if whole else None
    with torch.inference_mode():
        tokens = torch.from_numpy(rng.integers(1, lm.vocab_size, size=(length, len(prompts)))).to(
            lm.device
        )
        ones = torch.ones(len(prompts), 1, dtype=torch.long, device=lm.device)
        cache = DynamicCache()
        prefill_start = time.perf_counter()
        out = lm.model(
            input_ids=batch.to(lm.device),
            attention_mask=mask,
            **{lm.cache_keyword: cache},
            use_cache=True,
            output_hidden_states=True,
            **({"logits_to_keep": 1} if lm.keeps_logits else {}),
        )
        out.logits.float().cpu()
        start = prefill_start if prefill else time.perf_counter()
        for t in range(length):
            if whole:
                mask = torch.cat([mask, ones], dim=1)
            # the mask in the form the env hands the model (a ready 4D mask where it takes one)
            step_mask = mask.bool()[:, None, None, :] if whole and mask_4d else mask
            out = lm.model(
                input_ids=tokens[t][:, None],
                attention_mask=step_mask,
                position_ids=None if positions is None else positions + t,
                **{lm.cache_keyword: cache},
                use_cache=True,
                output_hidden_states=True,
            )
            out.logits.float().cpu()  # what an env needs back on the host
        elapsed = time.perf_counter() - start
    return len(prompts) * length / elapsed


def measure_vector(args: argparse.Namespace, model) -> dict:
    n, length = args.num_envs, args.episode_length
    envs = gym.make_vec(
        "textenvs/Summarize-v0", num_envs=n, model=model, max_steps=length, device=args.device
    )
    time_vector_steps(envs, 1, 4, args.seed)  # warm-up
    terminal = gym.make_vec(
        "textenvs/Summarize-v0",
        num_envs=n,
        model=model,
        max_steps=length,
        device=args.device,
        dense=False,
    )
    lm = envs.unwrapped.lm
    # Every figure is the median of --repeats rounds, each round timing all of them in turn, so a
    # slow spell of a shared machine hits the env and its bounds alike.
    rounds = []
    for r in range(args.repeats):
        seed = args.seed + r
        envs.reset(seed=seed)
        prompts = [
            env.prompt for env in envs.unwrapped.envs
        ]  # the prompts of the round's first episodes
        rounds.append(
            (
                time_vector_steps(envs, args.vector_episodes, length, seed),
                time_vector_steps(terminal, args.vector_episodes, length, seed),
                time_batched_forward(lm, prompts, length, seed),
                time_batched_forward(lm, prompts, length, seed, prefill=True),
                time_batched_forward(lm, prompts, length, seed, prefill=True, whole=True),
            )
        )
    vector, vector_terminal, bound, bound_prefill, model_work = np.median(rounds, axis=0)
    rss = []
    rng = np.random.default_rng(args.seed)
    envs.reset(seed=args.seed)
    steps = max(10, args.memory_steps // n)
    for step in range(steps):
        envs.step(rng.integers(envs.single_action_space.n, size=n))
        if step + 1 in (steps // 10, steps):  # after the first tenth of the run, and at its end
            rss.append(rss_mb())
    return {
        "num_envs": n,
        "vector_steps_per_s": round(vector, 1),
        "batched_bound_steps_per_s": round(bound, 1),
        "vector_ratio_to_bound": round(vector / bound, 3),
        "vector_terminal_steps_per_s": round(vector_terminal, 1),
        "vector_terminal_ratio_to_bound": round(vector_terminal / bound, 3),
        "batched_bound_with_prefill_steps_per_s": round(bound_prefill, 1),
        "vector_ratio_to_bound_with_prefill": round(vector / bound_prefill, 3),
        "batched_model_work_steps_per_s": round(model_work, 1),
        "vector_ratio_to_model_work": round(vector / model_work, 3),
        "memory_env_steps": args.memory_steps,
        "vector_rss_mb_first": round(rss[0], 1),
        "vector_rss_mb_last": round(rss[-1], 1),
    }


def random_gpt2(size: str, vocab_size: int | None = None) -> str:
    """A randomly initialised GPT-2 of a standard layout with the tiny tokenizer, saved to a temp
    folder; ``vocab_size`` (default: the tokenizer's) sets the embedding table, e.g. 50257 for
    GPT-2's own parameter count.
    """
    import tempfile

    from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel

    layouts = {
        "small": dict(n_layer=12, n_embd=768, n_head=12),
        "medium": dict(n_layer=24, n_embd=1024, n_head=16),
    }
    if size not in layouts:
        raise CommandLineError(f"--random-gpt2 must be one of {list(layouts)}, got {size!r}.")
    folder = tempfile.mkdtemp(prefix=f"textenvs-gpt2-{size}-")
    tokenizer = AutoTokenizer.from_pretrained(textenvs.lm.BUILTIN_MODELS[textenvs.TINY])
    torch.manual_seed(0)
    config = GPT2Config(
        vocab_size=vocab_size or len(tokenizer),
        n_positions=1024,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=tokenizer.eos_token_id,
        **layouts[size],
    )
    with quiet_loading():  # no "Writing model shards" bar
        GPT2LMHeadModel(config).save_pretrained(folder, safe_serialization=True)
        tokenizer.save_pretrained(folder)
    return folder


# Every id in each of its observation / action modes (``--memory-all``): generation in vocab and
# top-k mode, editing with pooled and per-position observations (and top-k tokens, their default).
# The benchmark ids (hub datasets, GPT-2 by default) are left out: this runs offline.
_BUILTIN_GENERATION_IDS = [i for i in textenvs.GENERATION_IDS if i not in textenvs.BENCHMARK_IDS]
MEMORY_CASES_ALL = [
    *((env_id, {}) for env_id in _BUILTIN_GENERATION_IDS),
    *((env_id, {"token_mode": "topk", "k": 4}) for env_id in _BUILTIN_GENERATION_IDS),
    *((env_id, {}) for env_id in textenvs.EDIT_IDS),
    *((env_id, {"obs": "positions"}) for env_id in textenvs.EDIT_IDS),
]
# By default each env kind in each mode once.
MEMORY_CASES = [
    ("textenvs/Summarize-v0", {}),
    ("textenvs/Translate-v0", {"token_mode": "topk", "k": 4}),
    ("textenvs/EditSummary-v0", {}),
    ("textenvs/EditTranslation-v0", {"obs": "positions"}),
]


def measure_memory(args: argparse.Namespace, model) -> dict:
    """Resident memory after the first tenth and at the end of ``--memory-steps`` sub-env steps of
    a batched env of ``--num-envs`` sub-envs, for every case of :data:`MEMORY_CASES` (or
    :data:`MEMORY_CASES_ALL`: every id in every mode, with ``--memory-all``; random
    actions of the space, episodes of at most 16 steps so that many episodes start and end)."""
    cases = {}
    for env_id, extra in MEMORY_CASES_ALL if args.memory_all else MEMORY_CASES:
        envs = gym.make_vec(
            env_id, num_envs=args.num_envs, model=model, device=args.device, max_steps=16, **extra
        )
        envs.reset(seed=args.seed)
        envs.action_space.seed(args.seed)
        steps = max(10, args.memory_steps // args.num_envs)
        marks = []
        for step in range(steps):
            envs.step(envs.action_space.sample())
            if step + 1 in (steps // 10, steps):
                marks.append(rss_mb())
        name = env_id.split("/")[1] + "".join(f" {k}={v}" for k, v in extra.items() if k != "k")
        cases[name] = {
            "rss_mb_first": round(marks[0], 1),
            "rss_mb_last": round(marks[-1], 1),
            "growth_pct": round(100 * (marks[-1] - marks[0]) / marks[0], 2),
        }
        envs.close()
    return {
        "memory_sub_env_steps": args.memory_steps,
        "memory": cases,
        "memory_max_growth_pct": max(c["growth_pct"] for c in cases.values()),
    }


def measure(args: argparse.Namespace) -> dict:
    torch.manual_seed(args.seed)
    model = random_gpt2(args.random_gpt2) if args.random_gpt2 else args.model
    if args.memory_only:
        return {"model": args.model, **measure_memory(args, model)}
    kwargs = dict(model=model, max_steps=args.episode_length, device=args.device)
    env = gym.make("textenvs/Summarize-v0", **kwargs).unwrapped
    naive = NaiveGenerationEnv(task="summarize", **kwargs)
    n, length, seed = args.episodes, args.episode_length, args.seed
    time_env_steps(env, 1, length, seed)  # warm-up: allocator, lazy init
    raw = np.median([time_raw_forward(env, n, length, seed + r) for r in range(args.repeats)])
    env_sps = np.median([time_env_steps(env, n, length, seed + r) for r in range(args.repeats)])
    env_resets_sps = np.median(
        [time_env_steps(env, n, length, seed + r, resets=True) for r in range(args.repeats)]
    )
    naive_sps = np.median(
        [time_env_steps(naive, max(1, n // 2), length, seed + r) for r in range(args.repeats)]
    )
    edit = measure_edit(args, model)
    vector = measure_vector(args, model)
    memory = measure_memory(args, model)
    vector["vector_speedup_vs_single"] = round(vector["vector_steps_per_s"] / env_sps, 2)
    vector["vector_speedup_vs_single_with_resets"] = round(
        vector["vector_steps_per_s"] / env_resets_sps, 2
    )
    return {
        "model": f"random GPT-2 {args.random_gpt2}" if args.random_gpt2 else args.model,
        "device": args.device,
        "episode_length": length,
        "episodes": n,
        "raw_forward_tokens_per_s": round(raw, 1),
        "env_steps_per_s": round(env_sps, 1),
        "env_steps_with_resets_per_s": round(env_resets_sps, 1),
        "naive_steps_per_s": round(naive_sps, 1),
        "ratio_to_raw": round(env_sps / raw, 3),
        "speedup_vs_naive": round(env_sps / naive_sps, 2),
        **edit,
        **vector,
        **memory,
        "torch_threads": torch.get_num_threads(),
        "machine": f"{platform.machine()} {platform.processor() or ''}".strip(),
        "versions": {"textenvs": textenvs.__version__, "torch": torch.__version__},
    }


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description="Environment throughput against the raw and naive forwards."
    )
    p.add_argument("--json", action="store_true", help="print only the JSON object")
    p.add_argument("--model", default=textenvs.TINY)
    p.add_argument("--device", default="cpu")
    p.add_argument("--episodes", type=int_arg(), default=6)
    p.add_argument("--episode-length", type=int_arg(), default=64)
    p.add_argument(
        "--edit-length", type=int_arg(), default=128, help="tokens of the text being edited"
    )
    p.add_argument("--edit-steps", type=int_arg(), default=150)
    p.add_argument("--num-envs", type=int_arg(), default=16)
    p.add_argument("--vector-episodes", type=int_arg(), default=2)
    p.add_argument(
        "--repeats", type=int_arg(), default=3, help="rounds per figure (the median is reported)"
    )
    p.add_argument(
        "--memory-steps", type=int_arg(), default=20_000, help="sub-env steps of the memory checks"
    )
    p.add_argument(
        "--memory-all",
        action="store_true",
        help="the memory check on every id in every mode (about 10 minutes)",
    )
    p.add_argument("--memory-only", action="store_true", help="only the memory check")
    p.add_argument(
        "--random-gpt2", choices=["small", "medium"], help="measure a random GPT-2 of this layout"
    )
    p.add_argument("--seed", type=int_arg(0, 2**32 - 1), default=0)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    result = measure(args)
    print(json.dumps(result) if args.json else json.dumps(result, indent=2))
    return result


def cli() -> None:
    """The console script: a user error as one line (:func:`textenvs.cli.run_cli`)."""
    run_cli(main)


if __name__ == "__main__":
    cli()
