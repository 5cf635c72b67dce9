"""The benchmark suite runner on a tiny budget: valid JSON, table, plots, resume, bad input."""

from __future__ import annotations

import json

import numpy as np
import pytest

from benchmarks import run

ARGS = [
    "--quick",
    "--seeds",
    "2",
    "--scale",
    "0.01",
    "--no-throughput",
    "--eval-samples",
    "3",
    "--env-id",
    "textenvs/Summarize-v0",
    "textenvs/EditSummary-v0",
]


@pytest.fixture(scope="module")
def suite(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench") / "out"
    report = run.main(ARGS + ["--out", str(out)])
    return out, report


@pytest.mark.slow
def test_suite_writes_json_table_and_plots(suite):
    out, report = suite
    results = json.loads((out / "results.json").read_text())
    agents = {(c["agent"], c["env_id"]) for c in results["cells"]}
    assert ("token_ppo", "textenvs/Summarize-v0") in agents and (
        "maskable_ppo",
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
        ordered = np.sort(finals)
        assert row["iqm"] == pytest.approx(np.mean(ordered))  # 2 seeds: the trimmed mean keeps both
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
    ],
)
def test_bad_names_list_the_valid_ones(argv, match, capsys):
    with pytest.raises(SystemExit):
        run.parse_args(argv)
    assert match in capsys.readouterr().err


def test_bootstrap_and_iqm_by_hand():
    assert run.iqm([1, 2, 3, 4, 100, 5, 6, 7]) == pytest.approx(np.mean([3, 4, 5, 6]))
    low, high = run.bootstrap_ci([0.5, 0.5, 0.5])
    assert low == high == 0.5


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
    assert result["vector_ratio_to_bound"] == pytest.approx(
        result["vector_steps_per_s"] / result["batched_bound_steps_per_s"], rel=0.01
    )
