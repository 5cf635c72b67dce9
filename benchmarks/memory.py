"""Memory of a file dataset shared by the sub-envs of a batched env.

``python -m benchmarks.memory`` writes a JSON Lines dataset of ``--size-mb`` megabytes (built-in
summarization samples, varied) to a temporary folder and, for each ``--num-envs`` N, starts a fresh
process that loads the model, then builds ``gym.make_vec("textenvs/Generate-v0", num_envs=N,
dataset=FILE)`` and resets it. It prints one JSON object: per N, the resident memory (RSS) the
envs added on top of the loaded model, the same for N envs on the built-in task (no file), their
difference (what the file costs) and the file's size. A dataset is loaded once per process and
read from the file on access, so its cost should stay flat in N and far below the file size.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

from textenvs.cli import float_arg, int_arg, run_cli

CHILD = """
import json, sys
import gymnasium as gym
import textenvs
from textenvs.lm import shared_model

def rss_mb():
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) / 1024 for line in f if line.startswith("VmRSS:"))

shared_model()  # the model and its tokenizer are not the dataset's memory
before = rss_mb()
data = {"dataset": sys.argv[1]} if sys.argv[1] else {"task": "summarize"}
envs = gym.make_vec("textenvs/Generate-v0", num_envs=int(sys.argv[2]), max_steps=8, **data)
envs.reset(seed=0)
print(json.dumps({"rss_added_mb": round(rss_mb() - before, 1)}))
"""


def write_dataset(path: Path, size_mb: float) -> int:
    """A JSON Lines file of about ``size_mb`` MB; returns its number of samples."""
    from textenvs.tasks import builtin_task

    samples = builtin_task("summarize").split("train")
    n, written = 0, 0
    with path.open("w", encoding="utf-8") as f:
        while written < size_mb * 1e6:
            s = samples[n % len(samples)]
            line = json.dumps(
                {"source": f"{s.source} (item {n})", "references": list(s.references)}
            )
            f.write(line + "\n")
            written += len(line) + 1
            n += 1
    return n


def child_rss(dataset: str, num_envs: int) -> float:
    """RSS (MB) that ``num_envs`` batched sub-envs add in a fresh process ("": built-in task)."""
    out = subprocess.run(
        [sys.executable, "-c", CHILD, dataset, str(num_envs)],
        capture_output=True,
        text=True,
        check=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])["rss_added_mb"]


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size-mb", type=float_arg(0, low_open=True), default=50.0)
    p.add_argument("--num-envs", type=int_arg(), nargs="+", default=[1, 8, 32])
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="textenvs-memory-") as folder:
        path = Path(folder) / "data.jsonl"
        n = write_dataset(path, args.size_mb)
        result = {"file_mb": round(path.stat().st_size / 1e6, 1), "samples": n}
        for name, dataset in (("rss_added_mb", str(path)), ("rss_added_mb_builtin_task", "")):
            result[name] = {k: child_rss(dataset, k) for k in args.num_envs}
        result["dataset_cost_mb"] = {
            k: round(result["rss_added_mb"][k] - result["rss_added_mb_builtin_task"][k], 1)
            for k in args.num_envs
        }
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    run_cli(main)  # a user error as one line, "error: ...", exit status 2
