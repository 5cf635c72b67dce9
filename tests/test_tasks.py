"""Built-in tasks (deterministic, disjoint splits, headroom by construction) and the loaders."""

from __future__ import annotations

import json

import pytest

from textenvs.tasks import (
    SPLIT_SIZES,
    DatasetFormatError,
    Sample,
    builtin_task,
    generate_samples,
    load_csv,
    load_dataset,
    load_jsonl,
    unpaired_texts,
)


@pytest.mark.parametrize("name", ["summarize", "translate"])
def test_builtin_splits_are_fixed_sized_and_disjoint(name):
    task = builtin_task(name)
    sources = {split: {s.source for s in task.split(split)} for split in SPLIT_SIZES}
    for split, size in SPLIT_SIZES.items():
        assert len(sources[split]) == size
    assert not sources["train"] & sources["test"]
    assert not sources["train"] & sources["validation"]
    assert not sources["validation"] & sources["test"]


@pytest.mark.parametrize("name", ["summarize", "translate"])
def test_generators_are_seeded(name):
    assert generate_samples(name, 20, seed=5) == generate_samples(name, 20, seed=5)
    assert generate_samples(name, 20, seed=5) != generate_samples(name, 20, seed=6)


@pytest.mark.parametrize("name", ["summarize", "translate"])
def test_pretraining_text_never_contains_a_split_source(name):
    used = {s.source for split in builtin_task(name).splits.values() for s in split}
    sources, _ = unpaired_texts(name, 200, seed=1)
    assert not used & set(sources)


def test_translation_rules_by_hand():
    task = builtin_task("translate")
    # The word order is verb-final and every sentence ends with a period in both languages.
    for s in task.split("test")[:50]:
        assert s.source.endswith(".") and s.references[0].endswith(".")
        assert s.references[0].split()[-1].rstrip(".") in {
            "silente",
            "lante",
            "hodiau",
            "denove",
            "ofte",
        } or s.references[0].split()[-1].rstrip(".").endswith(("as", "ta"))


def test_summary_headline_names_the_town_of_the_article():
    for s in builtin_task("summarize").split("test")[:50]:
        assert s.references[0].split()[0] in s.source


def test_sample_validation():
    with pytest.raises(ValueError, match="source is empty"):
        Sample("  ", ("x",))
    with pytest.raises(ValueError, match="no non-empty reference"):
        Sample("a", ())
    assert Sample("a", "b").references == ("b",)


def test_jsonl_loader_unicode_and_multiple_references(tmp_path):
    p = tmp_path / "d.jsonl"
    p.write_text(
        '{"source": "Ünïcödé ✓ 日本", "references": ["a", "b"]}\n\n{"source": "x", "references": '
        '"y"}\n',
        encoding="utf-8",
    )
    samples = load_jsonl(p)
    assert list(samples) == [Sample("Ünïcödé ✓ 日本", ("a", "b")), Sample("x", ("y",))]
    assert samples[1] == Sample("x", ("y",)) and samples.line_of(1) == 3 and len(samples) == 2


@pytest.mark.parametrize(
    "line,match",
    [
        ("{not json", "line 2: not valid JSON"),
        ('["a"]', "line 2: expected a JSON object"),
        ('{"source": "", "references": ["a"]}', "line 2: field 'source' is missing or empty"),
        ('{"source": "a"}', "line 2: field 'references' is missing"),
        ('{"source": "a", "references": []}', "line 2: field 'references' must be"),
        ('{"source": "a", "references": ["", "b"]}', "line 2: field 'references' holds an empty"),
    ],
)
def test_jsonl_loader_names_file_and_line(tmp_path, line, match):
    p = tmp_path / "bad.jsonl"
    p.write_text('{"source": "ok", "references": ["ok"]}\n' + line + "\n", encoding="utf-8")
    with pytest.raises(DatasetFormatError, match=match) as e:
        load_jsonl(p)
    assert str(p) in str(e.value)


def test_csv_loader(tmp_path):
    p = tmp_path / "d.csv"
    p.write_text('source,reference,reference2\n"Ça va, 東京",yes,\nb,c,d\n', encoding="utf-8")
    assert load_csv(p) == [Sample("Ça va, 東京", ("yes",)), Sample("b", ("c", "d"))]


@pytest.mark.parametrize(
    "content,match",
    [
        ("text,reference\na,b\n", "line 1: header"),
        ("source,reference\na,\n", "line 2: no reference"),
        ("source,reference\n,b\n", "line 2: field 'source' is missing or empty"),
        ("source,reference\na,b,c\n", "line 2: more cells"),
        ("source,reference\n", "holds no samples"),
    ],
)
def test_csv_loader_errors(tmp_path, content, match):
    p = tmp_path / "bad.csv"
    p.write_text(content, encoding="utf-8")
    with pytest.raises(DatasetFormatError, match=match):
        load_csv(p)


def test_load_dataset_dispatch(tmp_path):
    task = load_dataset([Sample("a", ("b",))], prompt_template="Q: {source} A:")
    assert task.prompt(task.split("test")[0]) == "Q: a A:"
    with pytest.raises(ValueError, match="must contain"):
        load_dataset([Sample("a", ("b",))], prompt_template="no field")


def test_hugging_face_datasets_builder_with_local_files(tmp_path):
    # The `datasets` route without a hub: its packaged "json" builder reading a file written here.
    pytest.importorskip("datasets")
    import gymnasium as gym

    path = tmp_path / "data.jsonl"
    rows = [
        {
            "document": f"The council of town {i} approved a plan.",
            "summary": [f"Council {i} plan", "Plan"],
        }
        for i in range(5)
    ]
    path.write_text("\n".join(json.dumps(r) for r in rows), encoding="utf-8")
    kwargs = {
        "data_files": str(path),
        "cache_dir": str(tmp_path / "cache"),
        "source_key": "document",
        "reference_key": "summary",
    }
    task = load_dataset("hf:json", **kwargs, prompt_template="Article: {source}\nHeadline:")
    samples = task.split("train")
    assert [s.source for s in samples] == [r["document"] for r in rows]
    assert samples[3].references == ("Council 3 plan", "Plan")
    env = gym.make("textenvs/Generate-v0", dataset="hf:json", dataset_kwargs=kwargs, max_steps=3)
    _, info = env.reset(seed=0)
    assert info["prompt"] in [f"{r['document']}\n" for r in rows]
    with pytest.raises(
        ValueError, match=r"has columns \['document', 'summary'\].*source_key='text'"
    ):
        load_dataset("hf:json", data_files=str(path), source_key="text", reference_key="summary")


def test_non_utf8_files_name_the_file_and_line(tmp_path):
    p = tmp_path / "latin1.jsonl"
    p.write_bytes(
        '{"source": "ok", "references": "a"}\n{"source": "caf\xe9", "references": "b"}\n'.encode(
            "latin-1"
        )
    )
    with pytest.raises(DatasetFormatError, match=r"latin1.jsonl, line 2: not UTF-8"):
        load_jsonl(p)
    c = tmp_path / "latin1.csv"
    c.write_bytes("source,reference\ncaf\xe9,b\n".encode("latin-1"))
    with pytest.raises(DatasetFormatError, match=r"latin1.csv, line 2: not UTF-8"):
        load_csv(c)


@pytest.mark.parametrize("template", ["{source} {title}", "{0}", "Doc: {source!z}"])
def test_a_template_that_samples_cannot_fill_is_refused_at_load(tmp_path, template):
    p = tmp_path / "d.jsonl"
    p.write_text('{"source": "x", "references": "y"}\n', encoding="utf-8")
    with pytest.raises(ValueError, match="cannot be filled from a sample"):
        load_dataset(str(p), prompt_template=template)


def test_a_file_is_loaded_once_per_process_and_read_on_access(tmp_path, monkeypatch):
    import gymnasium as gym

    from textenvs.tasks import loaders

    p = tmp_path / "d.jsonl"
    p.write_text(
        "".join(f'{{"source": "s{i}", "references": "r{i}"}}\n' for i in range(50)),
        encoding="utf-8",
    )
    calls = []
    real = loaders.JsonlSamples.__init__

    def counting(self, *args, **kwargs):
        calls.append(args)
        real(self, *args, **kwargs)

    monkeypatch.setattr(loaders.JsonlSamples, "__init__", counting)
    envs = gym.make_vec(
        "textenvs/Generate-v0", num_envs=4, dataset=str(p), max_steps=2, text_infos=True
    )
    assert len(calls) == 1  # four sub-envs, one load
    tasks = {id(env.task) for env in envs.unwrapped.envs}
    assert len(tasks) == 1
    samples = envs.unwrapped.envs[0].samples
    assert isinstance(samples, loaders.JsonlSamples) and samples.offsets.nbytes == 50 * 8
    _, infos = envs.reset(seed=0)
    assert all(t.startswith("s") for t in infos["prompt"])
    p.write_text('{"source": "changed", "references": "r"}\n', encoding="utf-8")
    env = gym.make("textenvs/Generate-v0", dataset=str(p), max_steps=2)
    assert len(calls) == 2 and len(env.unwrapped.samples) == 1  # a changed file is loaded again


def test_a_sample_that_cannot_fit_the_context_is_refused_at_construction(tmp_path):
    import gymnasium as gym

    p = tmp_path / "long.jsonl"
    long_source = " ".join(["word"] * 600)  # far more than the tiny model's 512 positions
    p.write_text(
        '{"source": "short", "references": "r"}\n\n'
        + json.dumps({"source": long_source, "references": "r"})
        + "\n",
        encoding="utf-8",
    )
    with pytest.raises(
        ValueError,
        match=r"1 of the 2 samples of split 'train' of .*long.jsonl \(samples 1 \(line 3\);.*"
        "too_long='skip'",
    ):
        gym.make("textenvs/Generate-v0", dataset=str(p))
    with pytest.raises(
        ValueError, match="line 3"
    ):  # a vector env fails at construction, not at a reset
        gym.make_vec("textenvs/Edit-v0", num_envs=2, dataset=str(p))
    # too_long="skip": reported once at construction with the count, and never drawn.
    with pytest.warns(UserWarning, match=r"1 of the 2 samples .*line 3.*skipped"):
        envs = gym.make_vec("textenvs/Generate-v0", num_envs=2, dataset=str(p), too_long="skip")
    assert all(len(env.samples) == 1 for env in envs.unwrapped.envs)
    envs.reset(seed=0)
    assert all(env.sample.source == "short" for env in envs.unwrapped.envs)
    with pytest.raises(ValueError, match="too_long="):
        gym.make("textenvs/Generate-v0", dataset=str(p), too_long="drop")


def write_jsonl(path, n: int) -> None:
    path.write_text(
        "".join(
            json.dumps({"source": f"text {i}", "references": f"r{i}"}) + "\n" for i in range(n)
        ),
        encoding="utf-8",
    )


def test_one_file_serves_every_split_with_a_warning_or_a_seeded_disjoint_split(tmp_path):
    import gymnasium as gym

    p = tmp_path / "data.jsonl"
    write_jsonl(p, 20)
    with pytest.warns(UserWarning, match="same 20 samples as train, validation and test"):
        shared = load_dataset(str(p))
    assert all(len(shared.split(s)) == 20 for s in ("train", "validation", "test"))
    task = load_dataset(str(p), split_fractions=(0.7, 0.15, 0.15), split_seed=3)
    parts = {s: [x.source for x in task.split(s)] for s in ("train", "validation", "test")}
    assert [len(v) for v in parts.values()] == [14, 3, 3]
    assert len(set(sum(parts.values(), []))) == 20  # disjoint, and together the whole file
    again = load_dataset(str(p), split_fractions=(0.7, 0.15, 0.15), split_seed=3)
    assert [x.source for x in again.split("test")] == parts["test"]
    other = load_dataset(str(p), split_fractions=(0.7, 0.15, 0.15), split_seed=4)
    assert [x.source for x in other.split("test")] != parts["test"]
    assert task.split("test").line_of(0) == int(parts["test"][0].split()[1]) + 1
    env = gym.make(
        "textenvs/Generate-v0",
        dataset=str(p),
        split="validation",
        dataset_kwargs={"split_fractions": (0.7, 0.15, 0.15), "split_seed": 3},
    )
    _, info = env.reset(options={"index": 1})
    assert info["prompt"].strip() == parts["validation"][1]
    with pytest.raises(ValueError, match="split_fractions must be three numbers"):
        load_dataset(str(p), split_fractions=(0.5, 0.5))
    with pytest.raises(ValueError, match="leaves split 'test' empty"):
        load_dataset(str(p), split_fractions=(0.95, 0.05, 0.0))


def test_separate_files_per_split(tmp_path):
    files = {}
    for split, n in (("train", 5), ("validation", 2), ("test", 3)):
        files[split] = str(tmp_path / f"{split}.jsonl")
        write_jsonl(tmp_path / f"{split}.jsonl", n)
    task = load_dataset(files)
    assert [len(task.split(s)) for s in ("train", "validation", "test")] == [5, 2, 3]
    assert load_dataset(files) is task  # cached by the files' paths and contents
    with pytest.raises(ValueError, match="needs exactly the splits"):
        load_dataset({"train": files["train"]})
    with pytest.raises(ValueError, match="split_fractions splits one file"):
        load_dataset(files, split_fractions=(0.8, 0.1, 0.1))


@pytest.mark.parametrize(
    "env_id,kwargs,name",
    [
        ("textenvs/Summarize-v0", {"max_steps": 512}, "max_steps"),
        ("textenvs/EditSummary-v0", {"max_len": 600}, "max_len"),
    ],
)
def test_a_budget_beyond_the_context_is_refused_at_construction(env_id, kwargs, name):
    import gymnasium as gym

    with pytest.raises(ValueError, match=f"{name}=.* leaves no room for a prompt"):
        gym.make(env_id, **kwargs)
