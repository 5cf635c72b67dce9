"""The benchmark suite runner on a tiny budget: valid JSON, table, plots, resume, bad input."""

from __future__ import annotations

import argparse
import json

import numpy as np
import pytest

from benchmarks import run

ARGS = [
    "--quick",
    "--jobs",
    "1",
    "--seeds",
    "2",
    "--scale",
    "0.01",
    "--eval-samples",
    "3",
    "--env-id",
    "textenvs/Summarize-v0",
    "textenvs/EditSummary-v0",
]


@pytest.fixture(scope="module")
def suite(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench") / "out"
    # two worker processes, the main job's default: cells come back in any order
    report = run.main(ARGS + ["--out", str(out), "--jobs", "2"])
    return out, report


@pytest.mark.slow
def test_suite_writes_json_table_and_plots(suite):
    out, report = suite
    results = json.loads((out / "results.json").read_text())
    agents = {(c["agent"], c["env_id"]) for c in results["cells"]}
    assert ("token_ppo", "textenvs/Summarize-v0") in agents and (
        "maskable_prior",
        "textenvs/EditSummary-v0",
    ) in agents
    assert ("token_ppo", "textenvs/EditSummary-v0") not in agents  # not applicable: skipped
    assert len(results["cells"]) == 2 * (5 + 4)
    for c in results["cells"]:
        assert (
            c["curve"] and all(0.0 <= p["metric"] <= 1.0 for p in c["curve"]) and c["wall_s"] >= 0
        )
    assert results["versions"]["torch"] and results["config"]["budget"]["seeds"] == 2
    for name in ("learning_curves.png", "final_metrics.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (out / "table.md").read_text().startswith("| env | agent |")


@pytest.mark.slow
def test_every_cell_reports_its_final_texts_statistics(suite):
    """Length, diversity and perplexity of each cell's last evaluation, recomputed from the texts
    it recorded; their means over seeds in text_stats.md."""
    from textenvs.text_stats import distinct_n, self_bleu

    out, _ = suite
    results = json.loads((out / "results.json").read_text())
    for c in results["cells"]:
        texts, stats = c["final_texts"], c["text_stats"]
        assert len(texts) == 3 == stats["texts"]
        assert stats["distinct_1"] == pytest.approx(distinct_n(texts, 1))
        assert stats["self_bleu"] == self_bleu(texts)
        assert stats["perplexity"] is None or stats["perplexity"] >= 1.0
    table = (out / "text_stats.md").read_text().splitlines()
    assert table[0].startswith("| env | agent | words |") and len(table) == 2 + len(results["rows"])
    for line, row in zip(table[2:], results["rows"]):
        cells = [
            c
            for c in results["cells"]
            if (c["env_id"], c["agent"]) == (row["env_id"], row["agent"])
        ]
        words = np.mean([c["text_stats"]["mean_words"] for c in cells])
        assert f"| {row['agent']} | {words:.1f} |" in line


@pytest.mark.slow
def test_table_numbers_equal_a_recomputation_from_the_json(suite):
    out, _ = suite
    results = json.loads((out / "results.json").read_text())
    table = (out / "table.md").read_text().splitlines()[2:]
    for line, row in zip(table, results["rows"]):
        finals = [
            c["final_metric"]
            for c in results["cells"]
            if c["env_id"] == row["env_id"] and c["agent"] == row["agent"]
        ]
        assert f"{np.mean(finals):.4f}" in line
        assert (row["agent"] in ("random",)) == (
            "vs_random" not in row
        )  # every other row is paired
        for c in results["cells"]:
            if c["env_id"] == row["env_id"] and c["agent"] == row["agent"]:
                assert c["final_metric"] == pytest.approx(np.mean(c["curve"][-1]["metrics"]))


@pytest.mark.slow
def test_resume_skips_finished_cells_and_existing_output_is_protected(suite, monkeypatch):
    out, _ = suite
    with pytest.raises(SystemExit, match="--resume"):
        run.main(ARGS + ["--out", str(out)])
    calls = []
    monkeypatch.setattr(run, "run_cell", lambda *a, **k: calls.append(a))
    run.main(ARGS + ["--out", str(out), "--resume"])
    assert calls == []  # every cell was already there


def test_interrupt_keeps_finished_cells(tmp_path, monkeypatch):
    out = tmp_path / "out"
    seen = []

    def fake_cell(agent, env_id, seed, budget, model, extra=None):
        if len(seen) == 2:
            raise KeyboardInterrupt
        seen.append(agent)
        return {
            "agent": agent,
            "env_id": env_id,
            "seed": seed,
            "steps": 0,
            "wall_s": 0.0,
            "final_metric": 0.5,
            "curve": [{"steps": 0, "metric": 0.5, "metrics": [0.5]}],
        }

    monkeypatch.setattr(run, "run_cell", fake_cell)
    with pytest.raises(SystemExit) as e:
        run.main(ARGS + ["--out", str(out)])
    assert e.value.code == 130
    assert len((out / "cells.jsonl").read_text().splitlines()) == 2
    assert json.loads((out / "results.json").read_text())["interrupted"]


@pytest.mark.parametrize(
    "argv,match",
    [
        (["--env-id", "textenvs/Nope-v0"], "registered textenvs ids"),
        (["--agents", "dqn"], "valid agents"),
        (["--jobs", "0"], "argument --jobs: must be an int >= 1"),
        (["--token-ppo-reward", "meteor"], "invalid choice: 'meteor'"),
        (["--token-ppo-config", '{"seed": 3}'], "cannot be set there"),
        (["--token-ppo-config", '{"num_epochs": 0}'], "num_epochs must be an int >= 1"),
        (["--token-ppo-config", "[4]"], "expected a JSON object"),
    ],
)
def test_bad_names_list_the_valid_ones(argv, match, capsys):
    with pytest.raises(SystemExit):
        run.parse_args(argv)
    assert match in capsys.readouterr().err


def test_token_ppo_trains_with_its_own_reward_and_settings_and_is_evaluated_on_the_envs(
    monkeypatch,
):
    from agents import token_ppo

    given = {"num_epochs": 2, "num_envs": 2}  # num_envs: the suite's own default is overridable
    argv = ["--token-ppo-reward", "rougeL", "--token-ppo-config", json.dumps(given)]
    budget = run.budget_for(run.parse_args(ARGS + argv))
    assert budget.token_ppo_reward == "rougeL" and budget.token_ppo_config == given
    budget.eval_samples = 2
    seen, update = [], token_ppo.TokenPPO.update

    def spy(self, rollout):
        assert (self.config.num_epochs, self.config.num_envs) == (2, 2)  # given
        assert self.config.minibatch_size == 16  # the suite's
        assert self.config.temperature == 0.5
        seen.extend(s.name for s in self.envs.get_attr("shaper"))
        return update(self, rollout)

    monkeypatch.setattr(token_ppo.TokenPPO, "update", spy)
    cell = run.run_cell("token_ppo", "textenvs/Translate-v0", 0, budget, "textenvs/tiny")
    assert seen and set(seen) == {"rougeL"}  # the run's reward, over the translation settings'
    kwargs = run.env_kwargs(budget, "textenvs/tiny", "textenvs/Translate-v0")
    evaluated = run.test_env("textenvs/Translate-v0", kwargs)
    assert {s.name for s in evaluated.get_attr("shaper")} == {"bleu"}
    assert len(cell["curve"][-1]["metrics"]) == 2


def test_token_ppo_settings_layer_suite_translation_and_the_runs_own():
    budget = run.budget_for(run.parse_args([]))  # the main job
    summarize = run.token_ppo_settings(budget, "summarize")
    translate = run.token_ppo_settings(budget, "translate")
    assert summarize == {
        "total_episodes": budget.token_ppo_episodes,
        "num_envs": 32,
        **run.TOKEN_PPO,
    }
    assert translate == {
        "total_episodes": budget.translate_token_ppo_episodes,
        "num_envs": 32,
        **run.TOKEN_PPO,
        **run.TRANSLATE_TOKEN_PPO,
    }
    assert budget.translate_token_ppo_episodes != budget.token_ppo_episodes
    assert run.token_ppo_settings(budget, None) == summarize  # a user's dataset: no task
    argv = ["--token-ppo-episodes", "64", "--token-ppo-config", '{"temperature": 0.8}']
    budget = run.budget_for(run.parse_args(argv))
    for task in ("summarize", "translate"):  # the run's own count and settings hold everywhere
        settings = run.token_ppo_settings(budget, task)
        assert settings["total_episodes"] == 64 and settings["temperature"] == 0.8
    scaled = run.budget_for(run.parse_args(["--scale", "0.5"]))
    assert (
        scaled.translate_token_ppo_episodes
        == run.PRESETS["default"].translate_token_ppo_episodes // 2
    )


@pytest.mark.parametrize("name", run.EDIT_BUDGETS)
def test_edit_envs_train_with_their_own_steps(name):
    edit, summarize = "textenvs/EditSummary-v0", "textenvs/Summarize-v0"
    flag = "--" + name.replace("_", "-")
    budget = run.budget_for(run.parse_args([]))  # the main job
    own = getattr(budget, f"edit_{name}")
    assert run.steps_on(budget, name, edit) == own != getattr(budget, name)
    assert run.steps_on(budget, name, summarize) == getattr(budget, name)
    given = run.budget_for(run.parse_args([flag, "300"]))  # the run's own count everywhere
    assert run.steps_on(given, name, edit) == run.steps_on(given, name, summarize) == 300
    scaled = run.budget_for(run.parse_args(["--scale", "0.5"]))
    assert run.steps_on(scaled, name, edit) == own // 2
    quick = run.budget_for(run.parse_args(["--quick"]))  # no edit budget of its own
    assert run.steps_on(quick, name, edit) == getattr(quick, name)


def test_throughput_figures_are_opt_in(tmp_path, monkeypatch):
    monkeypatch.setattr(run, "throughput_figures", lambda model: {"measured_for": model})
    argv = ARGS + ["--seeds", "1", "--agents", "greedy", "--env-id", "textenvs/Summarize-v0"]
    for extra, expected in (([], None), (["--throughput"], {"measured_for": "textenvs/tiny"})):
        out = tmp_path / f"out{len(extra)}"
        run.main(argv + extra + ["--out", str(out)])
        assert json.loads((out / "results.json").read_text()).get("throughput") == expected


def test_percentile_bootstrap_of_two_values_by_hand():
    # Resampling [0, 1] twice gives means 0, 0.5, 1 with probabilities 1/4, 1/2, 1/4: the 2.5th and
    # 97.5th percentiles of the bootstrap distribution are 0 and 1.
    assert run.bootstrap_ci([0.0, 1.0]) == (0.0, 1.0)
    low, high = run.bootstrap_ci(np.random.default_rng(1).normal(3.0, 1.0, size=400))
    assert 3.0 - 0.2 < low < 3.0 < high < 3.0 + 0.2 and high - low == pytest.approx(0.196, abs=0.04)


def test_hierarchical_bootstrap_by_hand():
    # One seed with samples [0, 1]: the same as the plain bootstrap of the samples.
    assert run.hierarchical_bootstrap([[0.0, 1.0]]) == (0.5, 0.0, 1.0)
    # Two seeds, each constant: only the seed level varies, means 0, 0.5, 1 as above.
    assert run.hierarchical_bootstrap([[0.0, 0.0], [1.0, 1.0]]) == (0.5, 0.0, 1.0)
    # The point estimate is the mean of the per-seed means, not the pooled mean.
    point, _, _ = run.hierarchical_bootstrap([[1.0], [0.0, 0.0, 0.0]])
    assert point == 0.5


def cell(agent, seed, per_sample, env_id="textenvs/Summarize-v0"):
    return {
        "agent": agent,
        "env_id": env_id,
        "seed": seed,
        "steps": 10,
        "wall_s": 0.0,
        "final_metric": float(np.mean(per_sample)),
        "curve": [{"steps": 10, "metric": float(np.mean(per_sample)), "metrics": list(per_sample)}],
    }


def test_aggregate_pairs_by_sample_and_seed():
    rng = np.random.default_rng(0)
    cells = []
    for seed, shift in enumerate([0.0, 0.1, 0.2, 0.9]):
        base = rng.uniform(0, 0.5, size=50)  # hard and easy samples: a large spread across samples
        cells += [
            cell("greedy", seed, base),
            cell("qlearning", seed, base + 0.1),
            cell("ppo", seed, base + rng.normal(0, 0.01, size=50)),
        ]
        cells.append(cell("random", seed, base - shift))
    rows = {r["agent"]: r for r in run.aggregate(cells)}
    # exactly +0.1 on every sample of every seed: the paired CI is the point
    q = rows["qlearning"]["vs_greedy"]
    assert q["diff"] == pytest.approx(0.1) and q["ci_low"] == pytest.approx(0.1)
    assert q["ci_high"] == pytest.approx(0.1) and q["excludes_zero"]
    # zero-mean noise around greedy: the paired CI holds 0 although the per-sample spread is large
    p = rows["ppo"]["vs_greedy"]
    assert (
        p["ci_low"] < 0 < p["ci_high"]
        and not p["excludes_zero"]
        and p["ci_high"] - p["ci_low"] < 0.02
    )
    # the interquartile mean of four seeds drops the best and the worst one
    finals = sorted(c["final_metric"] for c in cells if c["agent"] == "random")
    assert rows["random"]["iqm"] == pytest.approx(np.mean(finals[1:3]))
    assert rows["random"]["iqm"] != pytest.approx(np.mean(finals))
    assert "vs_random" not in rows["random"] and "vs_greedy" not in rows["greedy"]
    table = run.markdown_table(run.aggregate(cells))
    assert "| Summarize-v0 | qlearning | 4 |" in table and "+0.1000 (+0.1000, +0.1000)" in table
    assert "IQM" in table.splitlines()[0]
    # with 3 seeds the IQM trims nothing (it would equal the mean): no IQM column
    three = run.markdown_table(run.aggregate([c for c in cells if c["seed"] < 3]))
    assert "IQM" not in three and "| Summarize-v0 | qlearning | 3 |" in three
    assert all(line.count("|") == three.splitlines()[0].count("|") for line in three.splitlines())


def test_throughput_baselines_compute_what_the_envs_compute():
    """The naive and full-recompute baselines differ from the envs in the forward alone."""
    from benchmarks.throughput import FullRecomputeEditEnv, NaiveGenerationEnv, random_valid_edit
    from textenvs.envs.edit import TextEditEnv
    from textenvs.envs.generate import TextGenerationEnv

    kwargs = dict(task="summarize", max_steps=5)
    for fast, slow in [
        (TextGenerationEnv(**kwargs), NaiveGenerationEnv(**kwargs)),
        (TextEditEnv(max_len=20, **kwargs), FullRecomputeEditEnv(max_len=20, **kwargs)),
    ]:
        a, _ = fast.reset(seed=3)
        b, _ = slow.reset(seed=3)
        rng = np.random.default_rng(0)
        for _ in range(5):
            action = (
                random_valid_edit(fast, rng)
                if isinstance(fast, TextEditEnv)
                else int(rng.integers(50, 900))
            )
            a, ra, ta, tra, ia = fast.step(action)
            b, rb, tb, trb, ib = slow.step(action)
            np.testing.assert_allclose(a, b, atol=1e-4)
            assert ra == pytest.approx(rb) and (ta, tra) == (tb, trb) and ia["text"] == ib["text"]
        assert (
            ta or tra
        )  # the naive env ends its episode where the env does (terminated at max_steps)


def test_throughput_script_reports_every_figure():
    from benchmarks import throughput

    result = throughput.main(
        [
            "--json",
            "--episodes",
            "1",
            "--episode-length",
            "4",
            "--edit-length",
            "16",
            "--edit-steps",
            "3",
            "--num-envs",
            "2",
            "--vector-episodes",
            "1",
            "--memory-steps",
            "20",
        ]
    )
    for key in (
        "raw_forward_tokens_per_s",
        "env_steps_per_s",
        "naive_steps_per_s",
        "edit_steps_per_s",
        "vector_steps_per_s",
        "batched_bound_steps_per_s",
        "vector_terminal_steps_per_s",
        "batched_bound_with_prefill_steps_per_s",
        "batched_model_work_steps_per_s",
        "env_steps_with_resets_per_s",
        "edit_vector_steps_per_s",
        "vector_rss_mb_last",
    ):
        assert np.isfinite(result[key]) and result[key] > 0, key


@pytest.mark.parametrize(
    "argv,match",
    [
        (["--trainers", "ppo2"], "invalid choice"),
        (["--completions", "100", "--batch", "32"], "not a multiple of --batch"),
        (
            ["--completions", "120", "--batch", "30", "--grid-group", "4", "8"],
            "not a multiple of --grid-group [4, 8]",
        ),
        (["--grid-group", "4", "8", "16"], "same size"),
        (["--seeds", "0"], "argument --seeds: must be an int >= 1"),
        (["--reward", "meteor"], "unknown --reward"),
        (["--completions", "0"], "argument --completions: must be an int >= 1"),
        (["--grid-dense", "true", "flase"], "expected true or false (or yes / no, 1 / 0)"),
    ],
)
def test_compare_trl_refuses_budgets_it_cannot_give_every_trainer(argv, match, capsys):
    from benchmarks import compare_trl

    with pytest.raises(SystemExit):
        compare_trl.parse_args(argv)
    assert match in capsys.readouterr().err


def test_compare_trl_budgets_and_shared_settings_are_equal_from_the_same_arguments():
    pytest.importorskip("trl")
    from benchmarks import compare_trl

    args = compare_trl.parse_args(["--completions", "96", "--batch", "16"])
    C, B = args.completions, args.batch
    for point in [None, *compare_trl.grid(args, "textenvs_ppo")]:
        c = compare_trl.ours_config(args, point, 0, "textenvs/Summarize-v0", "m", "rougeL")
        rollouts = -(-c.total_episodes // c.num_envs)
        steps = rollouts * c.num_epochs * -(-c.num_envs // c.minibatch_size)
        assert (rollouts * c.num_envs, steps) == (C, C // B)
        assert c.temperature == 1.0 and c.max_new_tokens == args.max_new_tokens
    sizes = {len(compare_trl.grid(args, name)) for name in compare_trl.TRAINERS}
    assert sizes == {8}  # the same grid size for every trainer
    for kind in ("grpo", "rloo"):
        for point in [None, *compare_trl.grid(args, kind)]:
            c = compare_trl.trl_config(kind, args, point, 0, "/tmp/unused")
            per_step = c.per_device_train_batch_size * c.gradient_accumulation_steps
            assert (c.max_steps * per_step, c.max_steps) == (C, C // B)
            assert c.steps_per_generation == 1 and c.num_iterations == 1
            assert c.disable_dropout and not c.gradient_checkpointing
            assert (c.temperature, c.top_k, c.top_p) == (1.0, 0, 1.0)
            assert c.max_completion_length == args.max_new_tokens
            assert c.max_grad_norm == 1.0 and c.lr_scheduler_type == "linear"
            if point is not None:
                assert (c.learning_rate, c.beta, c.num_generations) == (
                    point["learning_rate"],
                    point["kl_coef"],
                    point["group"],
                )


def test_compare_trl_reward_text_is_the_envs_text():
    import gymnasium as gym

    from benchmarks import compare_trl

    env = gym.make("textenvs/Summarize-v0", token_mode="vocab", max_steps=6)
    env.reset(seed=2)
    lm = env.unwrapped.lm
    ids = lm.encode(" Council approves the new park plan")[:5]
    for token in ids:
        _, _, _, _, info = env.step(token)
    decoded = lm.tokenizer.decode(ids, skip_special_tokens=True)  # what TRL hands the reward
    assert compare_trl.reward_text(decoded) == info["text"]
    reward = compare_trl.CountingReward("rougeL")
    headline = "Norwick council approves park plan"
    scores = reward([f"  {headline} ", "x"], [[headline]] * 2)
    assert scores[0] == pytest.approx(1.0) and scores[1] == 0.0 and reward.scored == 2


@pytest.mark.slow
def test_compare_trl_measures_equal_budgets_on_every_trainer(tmp_path):
    pytest.importorskip("trl")
    from benchmarks import compare_trl

    out = str(tmp_path / "r.json")
    report = compare_trl.main(
        ["--completions", "16", "--batch", "8", "--seeds", "2", "--grid-lr", "1e-3"]
        + ["--grid-kl", "0.0", "--grid-group", "4", "--grid-dense", "true"]
        + ["--validation-samples", "3", "--eval-samples", "3", "--json-out", out]
    )
    assert set(report["trainers"]) == set(compare_trl.TRAINERS)
    for name, rows in report["trainers"].items():
        for point in rows["grid"]:
            assert (point["completions"], point["optimizer_steps"]) == (16, 2), name
        for setting in ("best", "defaults"):
            row = rows[setting]
            assert row["completions"] == [16, 16] and row["optimizer_steps"] == [2, 2], name
            assert len(row["runs"]) == 2 and all(len(r["metrics"]) == 3 for r in row["runs"])
            assert row["test_ci"][0] <= row["test_metric"] <= row["test_ci"][1]
            if name != "textenvs_ppo":
                assert row["minus_ours_ci"][0] <= row["minus_ours"] <= row["minus_ours_ci"][1]
    saved = json.loads((tmp_path / "r.json").read_text())
    assert saved["config"]["optimizer_steps_per_run"] == 2


def fake_cell(agent, env_id, seed, budget, model, extra=None):
    return cell(agent, seed, [0.5, 0.25], env_id)


def test_a_second_run_on_the_same_folder_fails_at_once(tmp_path):
    import subprocess
    import sys

    out = tmp_path / "out"
    out.mkdir()
    # Another process holds the folder's lock (a suite run in progress).
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time; from pathlib import Path; from benchmarks import run; h = "
            "run.lock_output_folder(Path(sys.argv[1])); print('locked', flush=True); "
            "time.sleep(60)",
            str(out),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(SystemExit, match="in use by another suite run"):
            run.main(ARGS + ["--out", str(out)])
        assert not (out / "cells.jsonl").exists()
    finally:
        holder.kill()
        holder.wait()


def test_resume_refuses_another_budget_and_recovers_a_torn_line(tmp_path, monkeypatch, capsys):
    out = tmp_path / "out"
    monkeypatch.setattr(run, "run_cell", fake_cell)
    monkeypatch.setattr(run, "applies", lambda agent, env_id: True)
    args = [
        "--seeds",
        "1",
        "--jobs",
        "1",
        "--no-throughput",
        "--agents",
        "random",
        "greedy",
        "--env-id",
        "textenvs/Summarize-v0",
        "--out",
        str(out),
    ]
    run.main(args)
    with pytest.raises(SystemExit, match="another budget .*budget.seeds"):
        run.main(args[:1] + ["2"] + args[2:] + ["--resume"])
    with pytest.raises(SystemExit, match="budget.q_steps"):
        run.main(args + ["--resume", "--scale", "2"])
    # the suite's token-PPO settings are code, not budget: a change of them is a change of run
    with monkeypatch.context() as patched:
        from benchmarks.suite import settings

        patched.setattr(settings, "TOKEN_PPO", {**settings.TOKEN_PPO, "gae_lambda": 0.9})
        with pytest.raises(SystemExit, match="token_ppo.other.gae_lambda, token_ppo.translate"):
            run.main(args + ["--resume"])
    recorded = json.loads((out / "run.json").read_text())
    assert recorded["token_ppo"]["translate"] == run.token_ppo_settings(
        run.budget_for(run.parse_args(args)), "translate"
    )
    raw = out / "cells.jsonl"
    lines = raw.read_text().splitlines()
    raw.write_text(lines[0] + "\n" + lines[1][: len(lines[1]) // 2])  # killed while writing
    calls = []
    monkeypatch.setattr(run, "run_cell", lambda *a, **k: calls.append(a[:3]) or fake_cell(*a, **k))
    report = run.main(args + ["--resume"])
    assert "torn record" in capsys.readouterr().err
    assert calls == [("greedy", "textenvs/Summarize-v0", 0)]  # only the torn cell runs again
    assert len(report["cells"]) == 2 and len(raw.read_text().splitlines()) == 2
    assert [r["seeds"] for r in report["rows"]] == [1, 1]


@pytest.mark.slow
def test_memory_script_reports_the_dataset_cost():
    from benchmarks import memory

    result = memory.main(["--size-mb", "0.2", "--num-envs", "2"])
    assert result["file_mb"] == pytest.approx(0.2, abs=0.01) and result["samples"] > 500
    for key in ("rss_added_mb", "rss_added_mb_builtin_task", "dataset_cost_mb"):
        assert np.isfinite(result[key][2])


def test_verdict_names_the_agents_that_beat_the_greedy_lm():
    def row(env, agent, greedy=None, random=None):
        out = {"env_id": f"textenvs/{env}", "agent": agent}
        for key, value in (("vs_greedy", greedy), ("vs_random", random)):
            if value is not None:
                out[key] = {"diff": value[0], "ci_low": value[1], "ci_high": value[2]}
        return out

    rows = [
        row("Summarize-v0", "greedy"),
        row("Summarize-v0", "token_ppo", (0.1, 0.05, 0.15), (0.2, 0.1, 0.3)),
        row("Summarize-v0", "ppo_prior", (0.0, -0.01, 0.01), (0.1, 0.05, 0.15)),
        row("Translate-v0", "token_ppo", (-0.01, -0.02, 0.0), (0.05, -0.01, 0.1)),
    ]
    text = run.verdict(rows)
    assert text.startswith("Beat the greedy LM: token_ppo on Summarize-v0 by +0.1000")
    assert "ppo_prior" not in text.split(";")[0]  # its CI includes zero: not a win
    assert "no agent beat it on Translate-v0" in text
    assert text.endswith("Not above random (CI includes zero or below): token_ppo on Translate-v0.")
    none = run.verdict([rows[2]])
    assert none.startswith("No learning agent beat the greedy LM")


@pytest.mark.slow
def test_scale_script_reports_completions_and_sharded_memory():
    pytest.importorskip("accelerate")
    from benchmarks import scale
    from tests.conftest import TEARDOWN_ABORT, one_launch_at_a_time

    argv = (
        ["--skip", "memory", "--skip", "ray", "--iterations", "1", "--num-envs", "2"]
        + ["--max-new-tokens", "3", "--sharded-model", "textenvs/tiny"]
        + ["--checkpoint-length", "64", "--launch-timeout", "240"]
    )
    with one_launch_at_a_time():  # its 2-process launches, none beside another test's
        try:
            result = scale.main(argv)
        except RuntimeError as e:  # a launch that hung was killed, or aborted at teardown:
            if "did not finish" not in str(e) and TEARDOWN_ABORT not in str(e):  # once more
                raise  # (conftest's run_launch says why)
            result = scale.main(argv)
    one, two = result["completions"]["one_process"], result["completions"]["two_processes"]
    assert (one["processes"], one["episodes"]) == (1, 2)
    assert (two["processes"], two["episodes"]) == (2, 4)  # each process its own 2 episodes
    ratio = two["completions_per_s"] / one["completions_per_s"]
    assert result["completions"]["speedup_two_processes"] == pytest.approx(ratio, abs=1e-3)
    sharded = result["completions"]["two_processes_fsdp"]
    assert (sharded["processes"], sharded["episodes"]) == (2, 4)
    # each of 2 sharded processes holds half of what each DDP process holds
    memory = result["sharded"]
    assert len(memory["ddp_2"]) == len(memory["fsdp_2"]) == 2 and len(memory["one_process"]) == 1
    assert memory["ddp_2"][0]["state_numbers"] == memory["one_process"][0]["state_numbers"]
    assert len(memory["fsdp_2_lockstep"]) == 2  # rollouts on the sharded units, in lockstep
    for key in ("params", "grads", "adam"):
        for kind in ("fsdp", "fsdp_lockstep"):
            assert memory[f"{kind}_vs_ddp"][key] == pytest.approx(0.5, abs=0.01), key
            for rank in memory[f"{kind}_vs_ddp_per_rank"]:  # every rank, not process 0 alone
                assert rank[key] == pytest.approx(0.5, abs=0.01), key
    worst = max(r["peak_rss_mb"] for r in memory["fsdp_2"]) / max(
        r["peak_rss_mb"] for r in memory["ddp_2"]
    )
    assert memory["fsdp_vs_ddp"]["peak_rss_mb"] == pytest.approx(worst, abs=1e-4)
    assert memory["fsdp_2"][0]["gathered_step_ms"] > 0 and memory["fsdp_2"][0]["gather_ms"] > 0
    checkpointed = result["checkpointing"]
    assert checkpointed["length"] == 64 and checkpointed["layers"] == 4
    assert 0 < checkpointed["activation_ratio"] < 1 and checkpointed["time_ratio"] > 0


@pytest.mark.slow
def test_every_default_agent_runs_unchanged_on_a_users_jsonl_dataset(tmp_path):
    """The main job's agents on the user's own data: textenvs/Generate-v0 and textenvs/Edit-v0
    with a JSONL file (seeded splits), no other change."""
    data = tmp_path / "mine.jsonl"
    rows = [
        {"source": f"On Monday the council of town {i} opened a bridge.", "references": f"Town {i}"}
        for i in range(40)
    ]
    data.write_text("\n".join(json.dumps(r) for r in rows), encoding="utf-8")
    dataset = {"dataset": str(data), "dataset_kwargs": {"split_fractions": [0.6, 0.2, 0.2]}}
    args = [a for a in ARGS if a not in ("textenvs/Summarize-v0", "textenvs/EditSummary-v0")]
    args[args.index("--env-id") + 1 : args.index("--env-id") + 1] = [
        "textenvs/Generate-v0",
        "textenvs/Edit-v0",
    ]
    out = tmp_path / "out"
    run.main(args + ["--seeds", "1", "--env-kwargs", json.dumps(dataset), "--out", str(out)])
    cells = json.loads((out / "results.json").read_text())["cells"]
    ran = {(c["agent"], c["env_id"].split("/")[-1]) for c in cells}
    generation = {"random", "greedy", "qlearning", "ppo_prior", "token_ppo"}
    edit = {"random", "greedy", "qlearning", "maskable_prior"}
    assert ran == {(a, "Generate-v0") for a in generation} | {(a, "Edit-v0") for a in edit}
    assert all(0.0 <= p["metric"] <= 1.0 for c in cells for p in c["curve"])


def test_the_last_block_agent_runs_in_the_suite_with_its_own_settings(tmp_path):
    """``--agents ppo_last_block``: SB3 PPO with the last-block policy on generation envs only, on
    its own step budget, with the suite's LAST_BLOCK settings recorded for --resume."""
    out = tmp_path / "lb"
    argv = ["--quick", "--scale", "0.01", "--seeds", "1", "--jobs", "1", "--eval-samples", "4"]
    argv += ["--eval-points", "1", "--agents", "greedy", "ppo_last_block", "--out", str(out)]
    run.main(argv + ["--env-id", "textenvs/Translate-v0", "textenvs/EditSummary-v0"])
    results = json.loads((out / "results.json").read_text())
    ran = {(c["agent"], c["env_id"]) for c in results["cells"]}
    assert ("ppo_last_block", "textenvs/Translate-v0") in ran
    assert ("ppo_last_block", "textenvs/EditSummary-v0") not in ran  # edit envs: MaskablePPO
    cell = next(c for c in results["cells"] if c["agent"] == "ppo_last_block")
    assert cell["steps"] == 8 * 32 and 0.0 <= cell["final_metric"] <= 1.0  # one rollout
    recorded = json.loads((out / "run.json").read_text())
    assert recorded["last_block"] == run.LAST_BLOCK
    data = tmp_path / "mine.jsonl"  # a user's own dataset, unchanged
    rows = [
        {"source": f"The council of town {i} met.", "references": f"Town {i}"} for i in range(30)
    ]
    data.write_text("\n".join(json.dumps(r) for r in rows), encoding="utf-8")
    dataset = {"dataset": str(data), "dataset_kwargs": {"split_fractions": [0.6, 0.2, 0.2]}}
    argv[argv.index("--out") + 1] = str(tmp_path / "mine")
    run.main(argv + ["--env-id", "textenvs/Generate-v0", "--env-kwargs", json.dumps(dataset)])
    cells = json.loads((tmp_path / "mine" / "results.json").read_text())["cells"]
    assert {c["agent"] for c in cells} == {"greedy", "ppo_last_block"}
    budget = run.budget_for(run.parse_args(["--full", "--last-block-steps", "1000"]))
    assert budget.last_block_steps == 1000 and run.PRESETS["full"].last_block_steps == 49152


@pytest.mark.parametrize(
    "agent,estimator,top_p,credit,lr",
    [
        ("token_grpo", "grpo", 0.0, "episode", 1e-4),
        ("token_rloo", "rloo", 0.0, "episode", 1e-4),
        ("token_grpo_to_go", "grpo", 0.0, "to_go", 3e-4),
        ("token_rloo_to_go", "rloo", 0.0, "to_go", 3e-4),
        ("token_nlpo", "gae", 0.9, "episode", 3e-4),
    ],
)
def test_group_estimator_agents_run_in_the_suite_with_the_suites_settings(
    agent, estimator, top_p, credit, lr, monkeypatch
):
    """The suite's token agents differ from token PPO by their estimator and its tuned settings
    alone (benchmarks.estimator_grid), each rollout of the same 32 prompts."""
    from agents import token_ppo
    from benchmarks.suite.agents import token_config
    from benchmarks.suite.cells import Cell

    budget = run.budget_for(run.parse_args(ARGS))
    budget.eval_samples = 2
    seen, update, placements = [], token_ppo.TokenPPO.update, set()

    def spy(self, rollout):
        c = self.config
        seen.append((c.estimator, c.nlpo_top_p, c.temperature, c.kl_placement, c.num_epochs))
        placements.add(c.kl_settings()[0])
        return update(self, rollout)

    monkeypatch.setattr(token_ppo.TokenPPO, "update", spy)
    cell = run.run_cell(agent, "textenvs/Summarize-v0", 0, budget, "textenvs/tiny")
    assert seen and set(seen) == {(estimator, top_p, 0.5, "auto", 4)}
    main_job = Cell(
        agent, "textenvs/Summarize-v0", 0, run.PRESETS["default"], "textenvs/tiny", None
    )
    config = token_config(main_job, estimator, run.REGISTRY[agent].run.keywords["extra_config"])
    assert (config.group_credit, config.learning_rate) == (credit, lr)
    prompts = config.num_envs // (config.group_size if estimator != "gae" else 1)
    assert prompts == 32 and config.total_episodes == 768
    assert placements == {"loss" if estimator == "grpo" else "reward"}  # GRPO: TRL's placement
    assert cell["agent"] == agent and len(cell["curve"][-1]["metrics"]) == 2
    assert run.applies(agent, "textenvs/Translate-v0") and not run.applies(
        agent, "textenvs/EditSummary-v0"
    )


def test_compare_trl_like_with_like_gives_both_sides_the_same_math():
    pytest.importorskip("trl")
    from benchmarks import compare_trl

    args = compare_trl.parse_args(
        ["--like-with-like", "--completions", "64", "--batch", "16", "--group", "4"]
        + ["--learning-rate", "1e-4", "--kl-coef", "0.05"]
    )
    for algorithm in ("grpo", "rloo"):
        ours = compare_trl.like_config(algorithm, args, 0, "textenvs/Summarize-v0", "m", "rougeL")
        trl = compare_trl.like_trl_config(algorithm, args, 0, "/tmp/unused")
        assert (ours.learning_rate, ours.kl_coef, ours.group_size) == (1e-4, 0.05, 4)
        assert (trl.learning_rate, trl.beta, trl.num_generations) == (1e-4, 0.05, 4)
        assert ours.total_episodes == trl.max_steps * trl.per_device_train_batch_size == 64
        assert (ours.num_epochs, trl.num_iterations) == (1, 1) and not ours.dense
        assert trl.adam_epsilon == 1e-5 and ours.estimator == algorithm
        if algorithm == "grpo":
            assert (trl.loss_type, trl.scale_rewards) == ("bnpo", "group")
            assert (ours.kl_placement, ours.kl_estimator, ours.ratio_level) == (
                "loss",
                "k3",
                "token",
            )
        else:
            assert trl.normalize_advantages is False
            assert (ours.kl_placement, ours.kl_estimator, ours.ratio_level) == (
                "reward",
                "k1",
                "sequence",
            )
    with pytest.raises(SystemExit):
        compare_trl.parse_args(["--like-with-like", "--batch", "16", "--group", "3"])


@pytest.mark.slow
def test_compare_trl_like_with_like_reports_metric_speed_and_time_split(tmp_path):
    pytest.importorskip("trl")
    from benchmarks import compare_trl

    report = compare_trl.main(
        ["--like-with-like", "--completions", "16", "--batch", "8", "--group", "4"]
        + ["--seeds", "2", "--repeats", "2", "--eval-samples", "3", "--max-new-tokens", "4"]
        + ["--algorithms", "grpo", "--json-out", str(tmp_path / "like.json")]
    )
    for algorithm in report["like_with_like"]:
        ours, theirs = compare_trl.PAIRS[algorithm]
        row = report["like_with_like"][algorithm]
        for name in (ours, theirs):
            assert row[name]["completions"] == [16, 16] and row[name]["optimizer_steps"] == [2, 2]
            speeds = row[name]["completions_per_s_runs"]
            assert len(speeds) == 4  # 2 seeds x 2 repeats, interleaved
            assert row[name]["completions_per_s"] == pytest.approx(np.median(speeds))
        assert set(row[ours]["time_split_s"]) == {"rollout_s", "reference_s", "update_s"}
        assert len(row["speed_ratios"]) == 4 and row["speed_ratio"] > 0
        low, high = row["speed_ratio_range"]
        assert low <= row["speed_ratio"] <= high
        assert row["ours_minus_trl_ci"][0] <= row["ours_minus_trl"] <= row["ours_minus_trl_ci"][1]
    assert json.loads((tmp_path / "like.json").read_text())["config"]["group"] == 4


def test_token_agents_are_also_paired_with_token_ppo():
    env = "textenvs/Summarize-v0"
    cells = [
        cell("greedy", 0, [0.1, 0.1], env),
        cell("token_ppo", 0, [0.2, 0.3], env),
        cell("token_grpo", 0, [0.4, 0.2], env),
    ]
    rows = {r["agent"]: r for r in run.aggregate(cells)}
    assert rows["token_grpo"]["vs_token_ppo"]["diff"] == pytest.approx(0.05)  # (0.2 - 0.1) / 2
    assert "vs_token_ppo" not in rows["token_ppo"] and "vs_token_ppo" not in rows["greedy"]
    table = run.markdown_table(list(rows.values()))
    assert "- token PPO (95% CI)" in table and "+0.0500" in table
    assert "token PPO" not in run.markdown_table([rows["greedy"], rows["token_ppo"]])


def test_the_dialogue_preset_runs_its_agents_on_conversations(tmp_path):
    """--dialogue: its env, agents, model and env arguments (a user's --env-kwargs over them);
    every agent of it runs a cell on Dialogue-v0, evaluated on the conversations' metric."""
    args = run.parse_args(["--dialogue", "--env-kwargs", '{"max_turns": 2}'])
    assert args.env_id == ["textenvs/Dialogue-v0"] and args.model == "textenvs/tiny-chat"
    assert args.agents == ["random", "greedy", "token_ppo"]
    assert args.env_kwargs == {"max_turn_tokens": 10, "max_turns": 2, "chat_template": True}
    budget = run.budget_for(run.parse_args(["--dialogue", "--scale", "0.02"]))
    assert budget.token_ppo_config == {"learning_rate": 1e-4}  # the preset's own step size
    budget.eval_samples, budget.eval_points = 3, 1
    cells = [
        run.run_cell(agent, "textenvs/Dialogue-v0", 0, budget, args.model, args.env_kwargs)
        for agent in args.agents
    ]
    for cell in cells:
        assert len(cell["curve"][-1]["metrics"]) == 3
        assert all(0.0 <= m <= 1.0 for m in cell["curve"][-1]["metrics"])
    token = cells[-1]
    assert token["steps"] > 0 and len(token["curve"]) == 2  # the start and one point
    greedy = cells[1]["curve"][-1]["metrics"]
    assert token["curve"][0]["metrics"] == pytest.approx(greedy, abs=1e-6)  # it starts greedy


def test_dialogue_script_compares_appending_turns_with_reencoding():
    from benchmarks import dialogue

    out = dialogue.main(["--models", "tiny", "--turns", "3,max", "--repeats", "1"])
    three = out["tiny"]["3"]
    assert three["ours"]["turns"] == three["reencode"]["turns"] == 3
    # ours forwards each token once: exactly the conversation's ids
    assert three["ours"]["tokens_forwarded"] == three["ours"]["final_tokens"]
    assert three["reencode_over_ours"]["tokens_forwarded"] > 1.5
    longest = out["tiny"]["max"]
    assert longest["ours"]["stop"] == "max_turns" and longest["ours"]["turns"] > 3
    assert (
        longest["reencode_over_ours"]["tokens_forwarded"]
        > three["reencode_over_ours"]["tokens_forwarded"]
    )


def test_figures_name_each_panels_metric_the_seeds_and_the_commit(tmp_path, monkeypatch):
    """A panel of BLEU says BLEU; every figure says how many seeds and which commit made it."""
    from matplotlib.figure import Figure

    from benchmarks.suite.output import versions

    cells = [
        cell(agent, seed, np.full(4, 0.1 + 0.1 * seed), env_id)
        for env_id in ("textenvs/Summarize-v0", "textenvs/Translate-v0")
        for agent in ("greedy", "token_ppo")
        for seed in range(3)
    ]
    rows = run.aggregate(cells)
    seen = []
    save = Figure.savefig

    def record(fig, *args, **kwargs):
        labels = [ax.get_ylabel() for ax in fig.axes]
        ticks = [t.get_text() for ax in fig.axes for t in ax.get_xticklabels()]
        seen.append((labels, ticks, [t.get_text() for t in fig.texts]))
        return save(fig, *args, **kwargs)

    monkeypatch.setattr(Figure, "savefig", record)
    report = {"cells": cells, "rows": rows, "config": {"env_kwargs": {}}, "versions": versions()}
    run.write_report(report, tmp_path)
    (curve_labels, _, curve_texts), (_, bar_ticks, bar_texts) = seen
    assert curve_labels == ["test ROUGE-L", "test BLEU"]
    assert bar_ticks == ["Summarize-v0\n(ROUGE-L)", "Translate-v0\n(BLEU)"]
    for texts in (curve_texts, bar_texts):
        caption = " ".join(texts)
        assert "3 seeds per cell" in caption
        assert f"commit {versions()['commit'] or 'unknown commit'}" in caption


def test_estimator_grid_tunes_each_estimator_on_validation_at_equal_prompts(tmp_path):
    from benchmarks import estimator_grid

    args = estimator_grid.main(
        [
            "--variants", "ppo", "rloo_to_go", "--learning-rates", "1e-4", "1e-3",
            "--seeds", "1", "--episodes", "128", "--max-new-tokens", "3",
            "--validation-samples", "4", "--jobs", "1", "--out", str(tmp_path / "grid.json"),
        ]
    )  # fmt: skip
    report = json.loads((tmp_path / "grid.json").read_text())
    assert report == json.loads(json.dumps(args)) and report["split"] == "validation"
    assert len(report["runs"]) == 4 and 0 <= report["greedy_validation_metric"] <= 1
    for variant, row in report["summary"].items():
        means = row["mean_by_learning_rate"]
        assert row["chosen_learning_rate"] == float(max(means, key=means.get))
        for lr, mean in means.items():
            runs = [
                r
                for r in report["runs"]
                if r["variant"] == variant and repr(r["learning_rate"]) == lr
            ]
            assert mean == pytest.approx(np.mean([r["validation_metric"] for r in runs]))
    # the same 32 distinct prompts per batch: groups of 4 completions each for RLOO
    grid_args = argparse.Namespace(env_id="textenvs/Summarize-v0", episodes=256, max_new_tokens=8)
    assert estimator_grid.variant_config("ppo", 3e-4, 0, grid_args)["num_envs"] == 32
    rloo = estimator_grid.variant_config("rloo_to_go", 3e-4, 0, grid_args)
    assert (rloo["num_envs"], rloo["group_size"], rloo["group_credit"]) == (128, 4, "to_go")
