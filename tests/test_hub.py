"""The benchmark datasets (textenvs.tasks.hub) on local fixtures in each hub dataset's schema,
truncation of long sources, and the offline refusal."""

from __future__ import annotations

import json

import gymnasium as gym
import numpy as np
import pytest

import textenvs
from tests.conftest import BENCHMARK_KWARGS, CLASSIFIER_DIR
from tests.hub_fixtures import hub_fixture
from textenvs.tasks import BENCHMARKS, DatasetUnavailableError, benchmark_task


@pytest.mark.parametrize("name", sorted(BENCHMARKS))
def test_each_benchmark_loads_its_fixture_through_datasets(name):
    task = benchmark_task(name, **hub_fixture(name))
    assert set(task.splits) == {"train", "validation", "test"}
    for split in task.splits.values():
        assert len(split) > 0
        sample = split[0]
        assert sample.source.strip() and all(r.strip() for r in sample.references)
        assert "{source}" not in task.prompt(sample) and sample.source in task.prompt(sample)


def test_cnn_dailymail_sample_is_article_to_highlights():
    rows = [json.loads(line) for line in open(hub_fixture("cnn_dailymail")["data_files"]["test"])]
    task = benchmark_task("cnn_dailymail", **hub_fixture("cnn_dailymail"))
    assert task.splits["test"][3].source == rows[3]["article"]
    assert task.splits["test"][3].references == (rows[3]["highlights"],)
    assert task.prompt(task.splits["test"][3]).endswith("\nTL;DR:")
    assert task.default_reward == "rougeL"


@pytest.mark.parametrize(
    ("pair", "source", "target"), [("de-en", "de", "en"), ("en-de", "en", "de")]
)
def test_wmt16_pair_sets_the_direction(pair, source, target):
    path = hub_fixture("wmt16")["data_files"]["train"]
    row = json.loads(open(path).readline())["translation"]
    task = benchmark_task("wmt16", pair=pair, **hub_fixture("wmt16"))
    sample = task.splits["train"][0]
    assert (sample.source, sample.references) == (row[source], (row[target],))
    names = {"de": "German", "en": "English"}
    assert task.prompt(sample) == (
        f"translate {names[source]} to {names[target]}: {row[source]}\n{names[target]}:"
    )
    assert task.default_reward == "bleu"


@pytest.mark.parametrize("pair", ["de-fr", "deen", "en-en", 3, "xx-en"])
def test_wmt16_refuses_a_pair_it_does_not_have(pair):
    with pytest.raises(ValueError, match="WMT16 pair"):
        benchmark_task("wmt16", pair=pair, **hub_fixture("wmt16"))


def test_imdb_prompt_is_the_first_half_and_splits_are_disjoint():
    task = benchmark_task("imdb", **hub_fixture("imdb"))
    sample = task.splits["test"][0]
    words = sample.references[0].split(" ")
    assert sample.source == " ".join(words[: len(words) // 2])
    train = {s.references[0] for s in task.splits["train"]}
    validation = {s.references[0] for s in task.splits["validation"]}
    assert not train & validation and len(train) + len(validation) == 12  # 80 / 20 of train
    assert task.default_reward == "classifier" and task.cut_side == "start"


def test_imdb_test_samples_is_a_seeded_subset_of_the_test_split():
    """RL4LMs' setting: 5,000 shuffled test reviews (here 5 of the fixture's 12)."""
    whole = benchmark_task("imdb", **hub_fixture("imdb")).splits["test"]
    part = benchmark_task("imdb", test_samples=5, **hub_fixture("imdb")).splits["test"]
    again = benchmark_task("imdb", test_samples=5, **hub_fixture("imdb")).splits["test"]
    texts = [s.references[0] for s in part]
    assert len(part) == 5 and set(texts) <= {s.references[0] for s in whole}
    assert texts == [s.references[0] for s in again]  # seeded: the same reviews every time
    assert len(benchmark_task("imdb", test_samples=99, **hub_fixture("imdb")).splits["test"]) == 12
    for bad in (0, -1, 2.5, True, "5000"):
        with pytest.raises(ValueError, match="test_samples must be None"):
            benchmark_task("imdb", test_samples=bad, **hub_fixture("imdb"))


def test_common_gen_groups_the_targets_of_a_concept_set():
    task = benchmark_task("common_gen", **hub_fixture("common_gen"))
    assert all(len(s.references) == 3 for s in task.splits["train"])
    # the hub's test split has no targets: our test split is its validation split
    assert len(task.splits["test"]) == 12 and len(task.splits["test"][0].references) == 3
    assert len(task.splits["train"]) + len(task.splits["validation"]) == 12


def test_unknown_dataset_kwargs_and_missing_split_files_are_refused(tmp_path):
    with pytest.raises(ValueError, match="Unknown dataset_kwargs.*pair"):
        benchmark_task("wmt16", pairs="de-en", **hub_fixture("wmt16"))
    files = dict(hub_fixture("xsum")["data_files"])
    del files["test"]
    with pytest.raises(ValueError, match="add 'test'"):
        benchmark_task("xsum", data_files=files)


def test_a_file_in_another_schema_is_refused_with_the_columns(tmp_path):
    path = tmp_path / "wrong.jsonl"
    path.write_text(json.dumps({"source": "a text", "references": ["b"]}) + "\n")
    files = {"train": str(path), "validation": str(path), "test": str(path)}
    with pytest.raises(ValueError, match="missing \\['article', 'highlights'\\]"):
        benchmark_task("cnn_dailymail", data_files=files)


def test_offline_without_a_cache_says_what_to_do(tmp_path):
    # conftest sets HF_HUB_OFFLINE=1: nothing is downloaded, and the empty cache holds nothing
    with pytest.raises(DatasetUnavailableError) as caught:
        benchmark_task("cnn_dailymail", cache_dir=str(tmp_path / "empty_cache"))
    message = str(caught.value)
    assert "abisee/cnn_dailymail" in message and "data_files" in message
    assert "pip install 'textenvs[hub]'" in message and "3.0.0" in message


# -- truncation ------------------------------------------------------------------------------
def _cnn_env(**kwargs):
    return gym.make(
        "textenvs/CNNDailyMail-v0", **{**BENCHMARK_KWARGS["textenvs/CNNDailyMail-v0"], **kwargs}
    ).unwrapped


def test_truncation_fits_every_sample_and_keeps_the_template():
    with pytest.warns(UserWarning, match=r"\d+ of the 12 samples .* cut to fit") as record:
        env = _cnn_env(max_steps=40, split="train")
    assert len([w for w in record if "cut to fit" in str(w.message)]) == 1
    limit = env.lm.max_positions
    cut = 0
    for i in range(len(env.samples)):
        env.reset(options={"index": i})
        ids = env.lm.encode(env.prompt)
        assert len(ids) + 40 <= limit
        assert env.prompt.endswith("\nTL;DR:")  # the template survives, the source is cut
        source = env.prompt[: -len("\nTL;DR:")]
        assert env.sample.source.startswith(source)  # the article's lead is kept
        cut += source != env.sample.source
    assert cut >= 1
    assert env.prompt_lengths().max() + 40 <= limit


def test_truncated_episode_runs_to_its_budget():
    env = _cnn_env(max_steps=40)
    env.reset(seed=0)
    for _ in range(40):
        *_, terminated, truncated, info = env.step(1)
    assert terminated and info["tokens"] == 40


def test_too_long_error_names_truncate_and_skip_all_does_not_advise_skip():
    with pytest.raises(ValueError, match="too_long='truncate'"):
        _cnn_env(too_long="error")
    with pytest.raises(ValueError, match="leaves none") as caught:
        _cnn_env(too_long="skip", max_steps=480)
    assert "pass too_long='skip'" not in str(caught.value)


def test_truncation_refuses_a_budget_that_leaves_no_room_for_a_source():
    with pytest.raises(ValueError, match="template .* alone takes"):
        _cnn_env(max_steps=508)


def test_imdb_truncation_keeps_the_end_of_the_prefix():
    env = gym.make(
        "textenvs/IMDBSentiment-v0",
        **{**BENCHMARK_KWARGS["textenvs/IMDBSentiment-v0"], "max_steps": 500},
    ).unwrapped
    env.reset(options={"index": 0})
    assert env.sample.source.endswith(env.prompt) and env.prompt != env.sample.source
    assert len(env.lm.encode(env.prompt)) + 500 <= env.lm.max_positions


@pytest.mark.parametrize("name", sorted(BENCHMARKS))
def test_edit_env_takes_every_benchmark_task(name):
    reward = {"reward_kwargs": {"model": CLASSIFIER_DIR}} if name == "imdb" else {}
    env = gym.make(
        "textenvs/Edit-v0",
        task=name,
        dataset_kwargs=hub_fixture(name),
        too_long="truncate",
        max_len=16,
        max_steps=4,
        **reward,
    ).unwrapped
    obs, info = env.reset(seed=1)
    task = benchmark_task(name, **hub_fixture(name))
    assert info["metric_name"] == task.default_reward
    assert env.sample.source in env.prompt or env.too_long == "truncate"
    for _ in range(4):
        *_, reward_, terminated, truncated, info = env.step(env.action_space.sample())
        assert np.isfinite(reward_)
        if terminated or truncated:
            break


def test_dataset_kwargs_without_a_dataset_are_refused_for_builtin_tasks():
    with pytest.raises(ValueError, match="drop them"):
        gym.make("textenvs/Summarize-v0", dataset_kwargs={"data_files": "x.jsonl"})


def test_imdb_scores_the_continuation_with_the_classifier_once_at_the_end():
    env = gym.make(
        "textenvs/IMDBSentiment-v0",
        **{**BENCHMARK_KWARGS["textenvs/IMDBSentiment-v0"], "max_steps": 3},
    ).unwrapped
    env.reset(seed=0)
    rewards = [env.step(5)[1] for _ in range(3)]
    assert rewards[:2] == [0.0, 0.0] and 0.0 < rewards[2] < 1.0  # terminal by default
    from textenvs.model_rewards import shared_metric

    expected = shared_metric("classifier", {"model": CLASSIFIER_DIR, "label": "POSITIVE"})
    assert rewards[2] == pytest.approx(expected.score_batch([env.text], [()], [""])[0], abs=1e-6)
    assert np.isfinite(rewards).all()


def test_benchmark_ids_default_to_gpt2():
    for env_id in textenvs.BENCHMARK_IDS:
        assert gym.spec(env_id).kwargs["model"] == "gpt2"


def test_hf_loader_offline_says_what_to_do(tmp_path):
    from textenvs.tasks import load_dataset

    with pytest.raises(DatasetUnavailableError, match="hf:json"):
        load_dataset(
            "hf:someorg/absent", source_key="a", reference_key="b", cache_dir=str(tmp_path)
        )


def test_a_large_split_measures_its_share_cut_on_a_subset(monkeypatch):
    from textenvs.envs import prompts

    monkeypatch.setattr(prompts, "EXACT_TRUNCATION_COUNT", 10)
    monkeypatch.setattr(prompts, "TRUNCATION_SUBSET", 6)
    with pytest.warns(UserWarning, match=r"About \d+% of the 12 samples .*measured on 6"):
        env = _cnn_env(max_steps=40, split="validation")
    assert (env.prompt_lengths() == env.lm.max_positions - 40).all()
    for i in range(len(env.samples)):
        env.reset(options={"index": i})
        assert len(env.sequence) + 40 <= env.lm.max_positions


def test_an_edited_local_file_is_read_again(tmp_path):
    import shutil

    from textenvs.tasks import resolve_task

    files = {}
    for split, path in hub_fixture("xsum")["data_files"].items():
        files[split] = str(tmp_path / f"{split}.jsonl")
        shutil.copy(path, files[split])
    first = resolve_task("xsum", None, {"data_files": files})
    assert resolve_task("xsum", None, {"data_files": files}) is first  # loaded once
    row = {"document": "A new document.", "summary": "A new summary.", "id": "1"}
    with open(files["test"], "a") as f:
        f.write(json.dumps(row) + "\n")
    again = resolve_task("xsum", None, {"data_files": files})
    assert again is not first and len(again.splits["test"]) == len(first.splits["test"]) + 1


def test_the_remaining_benchmark_refusals(tmp_path):
    from textenvs.tasks import Task

    with pytest.raises(ValueError, match="prompt_fraction must be a number in \\(0, 1\\)"):
        benchmark_task("imdb", prompt_fraction=1.5, **hub_fixture("imdb"))
    with pytest.raises(ValueError, match="data_files'\\] must be a path"):
        benchmark_task("xsum", data_files=3)
    with pytest.raises(ValueError, match="local data files must be"):
        benchmark_task("xsum", data_files={s: "x.txt" for s in ("train", "validation", "test")})
    empty = tmp_path / "empty.jsonl"
    empty.write_text(json.dumps({"document": " ", "summary": "s", "id": "0"}) + "\n")
    with pytest.raises(ValueError, match="holds no usable sample"):
        benchmark_task("xsum", data_files={s: str(empty) for s in ("train", "validation", "test")})
    with pytest.raises(ValueError, match="cut_side must be 'end' or 'start'"):
        Task("t", {"train": ()}, cut_side="middle")
