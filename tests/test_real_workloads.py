"""The agents, unchanged, on the benchmark ids (local fixtures in the hub's schema, stand-in
models): SB3 PPO, MaskablePPO, token PPO (the RL4LMs IMDB recipe at a tiny budget) and the suite."""

from __future__ import annotations

import json

import gymnasium as gym
import numpy as np
import pytest

import textenvs
from tests.conftest import BENCHMARK_KWARGS, CLASSIFIER_DIR
from tests.hub_fixtures import hub_fixture


@pytest.mark.parametrize("env_id", ["textenvs/CNNDailyMail-v0", "textenvs/IMDBSentiment-v0"])
def test_sb3_ppo_trains_on_a_benchmark_id(env_id):
    from agents import sb3

    model = sb3.build(
        env_id,
        sb3.SB3Config(num_envs=2, n_steps=8, batch_size=8, n_epochs=1),
        **BENCHMARK_KWARGS[env_id],
        max_steps=4,
        token_mode="topk",
        k=4,
    )
    model.learn(16)
    from agents.common import evaluate_policy

    env = gym.make(
        env_id, split="test", **BENCHMARK_KWARGS[env_id], max_steps=4, token_mode="topk", k=4
    )
    result = evaluate_policy(env, sb3.deterministic_policy(model), max_samples=2)
    assert all(0.0 <= m <= 1.0 for m in result["metrics"])


def test_maskable_ppo_on_the_edit_env_with_a_benchmark_dataset():
    from agents import sb3

    kwargs = dict(
        task="xsum",
        dataset_kwargs=hub_fixture("xsum"),
        too_long="truncate",
        max_len=12,
        max_steps=3,
        flat_actions=True,
    )
    model = sb3.build(
        "textenvs/Edit-v0",
        sb3.SB3Config(algo="maskable_ppo", num_envs=2, n_steps=8, batch_size=8, n_epochs=1),
        **kwargs,
    )
    model.learn(16)


def test_the_rl4lms_imdb_recipe_runs_at_a_tiny_budget(random_gpt2_dir, tmp_path):
    """The docs' IMDB recipe (token PPO, a GPT-2, a sentiment classifier's positive probability,
    64-token prompts, 48-token episodes) with a random GPT-2 and a random classifier."""
    from agents.token_ppo import main

    env_kwargs = {
        "dataset_kwargs": hub_fixture("imdb"),  # the hub's schema, read locally
        "reward_kwargs": {"model": CLASSIFIER_DIR, "label": "POSITIVE"},
        "max_prompt_tokens": 64,
    }
    report = main(
        [
            "--env-id",
            "textenvs/IMDBSentiment-v0",
            "--model",
            random_gpt2_dir,
            "--env-kwargs",
            json.dumps(env_kwargs),
            "--max-new-tokens",
            "48",
            "--dense",
            "false",
            "--kl-coef",
            "0.1",
            "--num-envs",
            "2",
            "--total-episodes",
            "4",
            "--minibatch-size",
            "2",
            "--num-epochs",
            "1",
            "--eval-samples",
            "2",
            "--json-out",
            str(tmp_path / "report.json"),
        ]
    )
    saved = json.loads((tmp_path / "report.json").read_text())
    assert saved["config"]["env_kwargs"]["max_prompt_tokens"] == 64
    assert np.isfinite(report["test_metric_after"])


def test_max_prompt_tokens_cuts_every_prompt():
    env = gym.make(
        "textenvs/IMDBSentiment-v0",
        **{**BENCHMARK_KWARGS["textenvs/IMDBSentiment-v0"], "max_prompt_tokens": 8, "max_steps": 4},
    ).unwrapped
    for i in range(len(env.samples)):
        env.reset(options={"index": i})
        assert len(env.sequence) <= 8 and env.sample.source.endswith(env.prompt)
    with pytest.raises(ValueError, match="too_long='truncate'"):
        gym.make("textenvs/Summarize-v0", max_prompt_tokens=8)


def test_the_suite_runs_on_a_benchmark_id(tmp_path):
    from benchmarks import run

    kwargs = {"dataset_kwargs": hub_fixture("cnn_dailymail")}
    out = tmp_path / "out"
    run.main(
        [
            "--quick",
            "--jobs",
            "1",
            "--seeds",
            "1",
            "--scale",
            "0.01",
            "--eval-samples",
            "2",
            "--eval-points",
            "1",
            "--agents",
            "random",
            "greedy",
            "token_ppo",
            "--env-id",
            "textenvs/CNNDailyMail-v0",
            "--model",
            textenvs.TINY,
            "--env-kwargs",
            json.dumps(kwargs),
            "--out",
            str(out),
        ]
    )
    cells = json.loads((out / "results.json").read_text())["cells"]
    assert {c["agent"] for c in cells} == {"random", "greedy", "token_ppo"}
    assert all(0.0 <= p["metric"] <= 1.0 for c in cells for p in c["curve"])


def test_the_workloads_benchmark_prints_its_figures(capsys):
    from benchmarks import workloads

    result = workloads.main(
        [
            "--num-envs",
            "2",
            "--steps",
            "2",
            "--max-steps",
            "4",
            "--encoder-layers",
            "1",
            "--skip-gpt2",
        ]
    )
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1]) == result
    assert result["bertscore"]["batched_over_single"] > 0
    assert result["measured_in"].startswith("a fresh process per section")


def test_the_first_update_kl_benchmark_prints_each_rates_kl(monkeypatch, random_gpt2_dir, capsys):
    from benchmarks import first_update_kl, throughput

    monkeypatch.setattr(throughput, "random_gpt2", lambda *a, **k: random_gpt2_dir)
    result = first_update_kl.main(
        [
            "--learning-rates",
            "3e-2",
            "auto",
            "--iterations",
            "2",
            "--num-envs",
            "8",
            "--max-new-tokens",
            "6",
            "--prompt-tokens",
            "8",
        ]
    )
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1]) == result
    fast, auto = result["runs"]
    assert fast["learning_rate_used"] == 3e-2 and auto["learning_rate"] == "auto"
    assert auto["learning_rate_used"] == 3e-4  # the random test model is small
    for run in (fast, auto):
        assert run["rollout_kl_per_episode"][0] == pytest.approx(0.0, abs=1e-6)  # the reference
        assert len(run["update_approx_kl_per_token"]) == 2
    # a step 100 times larger moves the policy further from the reference
    assert fast["rollout_kl_per_episode"][1] > auto["rollout_kl_per_episode"][1]
    with pytest.raises(SystemExit):
        first_update_kl.main(["--learning-rates", "0"])
