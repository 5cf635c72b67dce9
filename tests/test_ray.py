"""Envs on Ray: actors that each hold a batched vector env collect token-PPO rollouts.

Runs a local ``ray.init(num_cpus=2)`` in a child process (with a timeout, so a hang fails).
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("ray", reason="pip install -e '.[ray]'")

ROOT = Path(__file__).resolve().parents[1]

NLPO_SCRIPT = """
import json, sys, ray, torch
from agents.ray_rollouts import RayTokenPPO, RolloutWorker
from agents.token_ppo import TokenPPO, TokenPPOConfig
ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
config = TokenPPOConfig(model=sys.argv[1], num_envs=2, max_new_tokens=4, total_episodes=12,
                        minibatch_size=2, eval_samples=2, seed=4, nlpo_top_p=0.5, nlpo_mu=1)
trainer = RayTokenPPO(config, workers=2)
history = trainer.train(progress=False, stop_after=2)
# the workers' masking policies were refreshed with the learner's: their rollout and its masks
# equal those of local workers refreshed the same way
trainer.masker.refresh(trainer.model)  # what the learner's loop does before iteration 2
rollout = trainer.collect()
local = [RolloutWorker(trainer.workers_config.__dict__, r, 2) for r in range(2)]
weights = trainer.trainable_weights()
parts = [w.collect(weights, trainer.iteration, True) for w in local]
same = all(
    torch.equal(rollout.tokens[2 * r: 2 * r + 2], parts[r].tokens)
    and torch.equal(rollout.action_masks[2 * r: 2 * r + 2], parts[r].action_masks)
    for r in range(2)
)
m = rollout.mask.bool()
sampled_in_mask = bool(rollout.action_masks.gather(2, rollout.tokens[..., None])[..., 0][m].all())
narrowed = bool((rollout.action_masks[m].sum(-1) < rollout.action_masks.shape[-1]).all())
print(json.dumps({"iterations": len(history), "same_as_local": same,
                  "sampled_in_mask": sampled_in_mask, "narrowed": narrowed,
                  "masks": list(rollout.action_masks.shape)}))
ray.shutdown()
"""

SCRIPT = """
import json, sys, ray, torch
from agents.ray_rollouts import RayTokenPPO, RolloutWorker
from agents.token_ppo import TokenPPOConfig, batch_sequences, collect_rollout
ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
config = TokenPPOConfig(model=sys.argv[1], num_envs=2, max_new_tokens=4, total_episodes=12,
                        minibatch_size=2, eval_samples=2, seed=4, lora_r=int(sys.argv[2]))
trainer = RayTokenPPO(config, workers=2)
history = trainer.train(progress=False, stop_after=2)
# After two updates, the workers act with the learner's current weights: their rollout equals
# the one a local worker with the same weights collects, and the learner's recompute.
rollout = trainer.collect()
local = [RolloutWorker(trainer.workers_config.__dict__, r, 2) for r in range(2)]
weights = trainer.trainable_weights()
parts = [w.collect(weights, trainer.iteration) for w in local]
same = all(torch.equal(rollout.tokens[2 * r: 2 * r + 2], parts[r].tokens) for r in range(2))
ids, attention, positions = batch_sequences(rollout.prompts, rollout.tokens, rollout.mask,
                                            trainer.lm.eos_token_id)
with torch.no_grad():
    logp, _, values = trainer.policy(ids, attention, positions, rollout.tokens, 1.0)
m = rollout.mask
print(json.dumps({
    "iterations": len(history), "batch": int(rollout.tokens.shape[0]),
    "episodes": [h["episodes"] for h in history], "same_as_local": same,
    "logp_error": float(((logp - rollout.logprobs) * m).abs().max()),
    "value_error": float(((values - rollout.values) * m).abs().max()),
    # explained_variance is undefined (NaN, SB3's convention) when the returns do not vary: a
    # random model scores 0 everywhere, and where the recompute equals the rollout's log-probs
    # bit for bit (some CPUs) the KL term is 0 as well
    "finite": all(v == v for h in history for k, v in h.items() if k != "explained_variance"),
}))
ray.shutdown()
"""


def _run(argv: list[str]) -> subprocess.CompletedProcess:
    """A child Python with ``argv``, one torch thread, no usage stats, a timeout against hangs."""
    return subprocess.run(
        [sys.executable, *argv],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "RAY_DISABLE_USAGE_STATS": "1", "OMP_NUM_THREADS": "1"},
    )


@pytest.mark.slow
@pytest.mark.parametrize("lora_r", [0, 4])
def test_ray_workers_collect_with_the_learners_weights(random_gpt2_dir, lora_r):
    if lora_r:
        pytest.importorskip("peft")
    run = _run(["-c", SCRIPT, random_gpt2_dir, str(lora_r)])
    assert run.returncode == 0, run.stderr[-4000:]
    out = json.loads(run.stdout.strip().splitlines()[-1])
    assert out["iterations"] == 2 and out["batch"] == 4 and out["episodes"] == [4, 8]
    assert out["same_as_local"] and out["finite"]
    assert out["logp_error"] < 1e-4 and out["value_error"] < 1e-4


@pytest.mark.slow
def test_nlpo_runs_with_ray_rollouts_and_their_action_masks(random_gpt2_dir):
    run = _run(["-c", NLPO_SCRIPT, random_gpt2_dir])
    assert run.returncode == 0, run.stderr[-4000:]
    out = json.loads(run.stdout.strip().splitlines()[-1])
    assert out["iterations"] == 2 and out["same_as_local"]
    assert out["sampled_in_mask"] and out["narrowed"] and out["masks"][:2] == [4, 4]


@pytest.mark.slow
def test_the_ray_example_runs_locally(tmp_path):
    run = _run(
        ["-m", "agents.ray_rollouts", "--workers", "2", "--num-envs", "4", "--max-new-tokens", "6"]
        + ["--total-episodes", "24", "--minibatch-size", "4", "--eval-samples", "4"]
        + ["--json-out", str(tmp_path / "report.json")]
    )
    assert run.returncode == 0, run.stderr[-4000:]
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["workers"] == 2 and report["episodes"] == 24 and len(report["history"]) == 3
    assert 0.0 <= report["test_metric_after"] <= 1.0


def test_bad_ray_setups_are_refused_with_the_fix(random_gpt2_dir):
    import ray

    from agents.ray_rollouts import RayTokenPPO, RolloutWorker
    from agents.token_ppo import TokenPPOConfig

    config = TokenPPOConfig(model=random_gpt2_dir, num_envs=2, max_new_tokens=3)
    with pytest.raises(ValueError, match="workers must be >= 1"):
        RayTokenPPO(config, workers=0)
    with pytest.raises(ValueError, match="fsdp=True shards"):
        RayTokenPPO(dataclasses.replace(config, fsdp=True), workers=2)
    assert not ray.is_initialized()
    with pytest.raises(RuntimeError, match=r"Call ray.init\(\)"):
        RayTokenPPO(config, workers=2)
    worker = RolloutWorker(vars(config), 0, 1)
    with pytest.raises(ValueError, match="same config"):
        worker.collect({"not_a_weight": torch.zeros(1)}, 0)
