"""Each agent command saves what it trained by default, into a new printed folder that never
existed before, and what it saved loads and acts (agents/runs.py)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import gymnasium as gym
import numpy as np
import pytest

from agents import qlearning, token_ppo
from agents import sb3 as sb3_agent
from agents.runs import env_folder_name, new_run_folder


def test_a_run_folder_is_new_every_time_even_within_one_second(tmp_path):
    folders = [new_run_folder("sb3", "textenvs/Summarize-v0", tmp_path) for _ in range(3)]
    assert len(set(folders)) == 3 and all(f.is_dir() and not any(f.iterdir()) for f in folders)
    assert all(f.parent == tmp_path / "sb3" / "Summarize-v0" for f in folders)


def test_a_run_folder_never_reuses_a_users_folder(tmp_path, monkeypatch):
    monkeypatch.setattr("agents.runs.time.strftime", lambda fmt: "20260101-000000")
    taken = tmp_path / "qlearning" / "Summarize-v0" / "20260101-000000"
    taken.mkdir(parents=True)
    (taken / "mine.txt").write_text("a user's file")
    folder = new_run_folder("qlearning", "textenvs/Summarize-v0", tmp_path)
    assert folder.name == "20260101-000000-1"
    assert (taken / "mine.txt").read_text() == "a user's file"


@pytest.mark.parametrize(
    "env_id,name",
    [
        ("textenvs/Summarize-v0", "Summarize-v0"),
        ("CartPole-v1", "CartPole-v1"),
        ("mypkg:ns/Env-v0", "mypkg_ns_Env-v0"),
    ],
)
def test_env_folder_names(env_id, name):
    assert env_folder_name(env_id) == name


def saved_folder(out: str) -> str:
    return re.search(r"^saved the agent in (\S+);", out, re.M).group(1)


def test_sb3_saves_by_default_and_the_save_predicts(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("TEXTENVS_RUNS", str(tmp_path))
    result = sb3_agent.main(
        ["--total-steps", "32", "--eval-samples", "2", "--n-steps", "16", "--batch-size", "16"]
    )
    out = capsys.readouterr().out
    folder = saved_folder(out)
    assert folder == result["saved"] and folder.startswith(str(tmp_path / "sb3" / "Summarize-v0"))
    assert re.search(r"^test rougeL \d\.\d{4}: mean over 2 test samples$", out, re.M)
    model, meta = sb3_agent.load(folder)
    env = gym.make("textenvs/Summarize-v0", **meta["env_kwargs"])
    obs, _ = env.reset(seed=0)
    action, _ = model.predict(obs, deterministic=True)
    assert env.action_space.contains(int(action))


def test_qlearning_saves_by_default_and_the_save_acts(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("TEXTENVS_RUNS", str(tmp_path))
    result = qlearning.main(["--total-steps", "32", "--eval-samples", "2"])
    out = capsys.readouterr().out
    path = saved_folder(out)
    assert path == result["saved"] and path.endswith("qtable.npz")
    agent = qlearning.QLearning.load(path, split="test")
    state, _ = agent.env.reset(seed=0)
    assert 0 <= agent.act(state) < agent.n_actions


def test_token_ppo_exports_by_default_and_the_export_loads_both_ways(tmp_path, monkeypatch, capsys):
    from transformers import AutoModelForCausalLM

    monkeypatch.setenv("TEXTENVS_RUNS", str(tmp_path))
    report = token_ppo.main(
        ["--total-episodes", "8", "--num-envs", "4", "--eval-samples", "2", "--max-new-tokens", "4"]
    )
    out = capsys.readouterr().out
    policy = re.search(r"^exported the policy to (\S+);", out, re.M).group(1)
    assert policy == report["saved"] and policy.endswith("policy")
    assert re.search(r"^test rougeL \d\.\d{4} -> \d\.\d{4} \(greedy decoding", out, re.M)
    run = Path(policy).parent
    saved_report = json.loads((run / "report.json").read_text())
    assert saved_report["test_metric_after"] == report["test_metric_after"]
    stats = saved_report["test_text_stats"]  # the trained policy's greedy texts, beyond the metric
    assert stats["texts"] == 2 and 0 <= stats["distinct_1"] <= 1 and "perplexity" in stats
    assert "history" in saved_report and "config" in saved_report
    env = gym.make("textenvs/Summarize-v0", model=policy, max_steps=2)
    env.reset(seed=0)
    env.step(0)
    model = AutoModelForCausalLM.from_pretrained(policy)
    assert np.isfinite(model(**model.dummy_inputs).logits.detach().numpy()).all()


@pytest.mark.parametrize("agent", [qlearning, sb3_agent])
def test_no_save_writes_nothing(agent, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("TEXTENVS_RUNS", str(tmp_path))
    argv = ["--total-steps", "16", "--eval-samples", "1", "--no-save"]
    if agent is sb3_agent:
        argv += ["--n-steps", "16", "--batch-size", "16"]
    result = agent.main(argv)
    assert "saved" not in result and not any(tmp_path.iterdir())
    assert "saved the agent" not in capsys.readouterr().out


@pytest.mark.parametrize(
    "agent,flag", [(qlearning, "--save"), (sb3_agent, "--save"), (token_ppo, "--export")]
)
def test_no_save_with_a_target_is_refused(agent, flag, tmp_path, capsys):
    with pytest.raises(SystemExit):
        agent.main(["--no-save", flag, str(tmp_path / "target")])
    assert "--no-save contradicts" in capsys.readouterr().err
    assert not (tmp_path / "target").exists()


def test_qlearning_logs_to_tensorboard(tmp_path, monkeypatch):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    monkeypatch.setenv("TEXTENVS_RUNS", str(tmp_path / "runs"))
    logs = tmp_path / "tb"
    qlearning.main(
        ["--total-steps", "64", "--eval-samples", "1", "--max-steps", "4", "--no-save"]
        + ["--tensorboard-log", str(logs)]
    )
    events = EventAccumulator(str(logs))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {"qlearning/episode_return", "qlearning/episode_metric", "qlearning/epsilon"} <= tags
    assert len(events.Scalars("qlearning/episode_return")) == 64 // 4
