"""A stranger's checkpoint runs no code and exhausts no memory, a save or load touches nothing of
the user's, every loaded field is checked (issue 43). Each test fails on the code before it."""

from __future__ import annotations

import json
import pickle
import shutil
import subprocess
import sys
import warnings
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agents import checkpoint, sb3, shards
from agents.qlearning import QLearning, QLearningConfig, make_tabular_env
from agents.token_ppo import TokenPPO, TokenPPOConfig
from tests.test_untrusted_checkpoints import _Payload  # unpickling it creates a file

ROOT = Path(__file__).resolve().parents[1]
KWARGS = {"max_steps": 4, "token_mode": "topk", "k": 4}


# -- sharded checkpoints: no pickle -----------------------------------------------------------
def _small_state(lr: float = 1e-3) -> dict:
    from torch.distributed.checkpoint.state_dict import get_state_dict

    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    model(torch.randn(2, 4)).sum().backward()
    optimizer.step()
    weights, optim = get_state_dict(model, optimizer)
    return {"model": weights, "optimizer": optim}


@pytest.fixture
def sharded(tmp_path) -> Path:
    folder = tmp_path / "shards"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # DCP warns that no process group is initialised
        shards.save(_small_state(), folder)
    return folder


def _load(folder: Path) -> dict:
    target = _small_state(lr=5.0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        shards.load(target, folder)
    return target


def test_a_sharded_save_writes_json_metadata_and_loads_back(sharded):
    assert (sharded / shards.METADATA_FILE).is_file()
    assert not (sharded / shards.PICKLED_METADATA_FILE).exists()
    loaded, saved = _load(sharded), _small_state()
    torch.testing.assert_close(loaded["model"]["weight"], saved["model"]["weight"])
    assert loaded["optimizer"]["param_groups"][0]["lr"] == 1e-3


def test_a_pickled_metadata_payload_is_never_unpickled(sharded, tmp_path):
    marker = tmp_path / "ran"
    (sharded / shards.METADATA_FILE).unlink()
    (sharded / shards.PICKLED_METADATA_FILE).write_bytes(pickle.dumps(_Payload(str(marker))))
    with pytest.raises(ValueError, match="metadata is a pickle"):
        _load(sharded)
    assert not marker.exists()


def test_a_pickled_metadata_beside_ours_is_ignored(sharded, tmp_path):
    marker = tmp_path / "ran"
    (sharded / shards.PICKLED_METADATA_FILE).write_bytes(pickle.dumps(_Payload(str(marker))))
    _load(sharded)
    assert not marker.exists()


def test_a_pickled_non_tensor_value_is_read_by_the_weights_only_unpickler(tmp_path):
    marker = tmp_path / "ran"
    folder = tmp_path / "bytes"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        shards.save({"value": _Payload(str(marker))}, folder)
        assert not marker.exists()
        with pytest.raises(ValueError, match="Weights only load failed"):
            shards.load({"value": 0}, folder)
    assert not marker.exists()


@pytest.mark.parametrize(
    "tamper, match",
    [
        (lambda m: m["storage"][0].update(file="../../etc/passwd"), "a shard file"),
        (lambda m: m["storage"][0].update(file=".metadata.json"), "a shard file"),
        (lambda m: m["storage"][0].update(length=10**12), "a range inside"),
        (lambda m: m["storage"][0].update(start=-1), "ints >= 0"),
        (lambda m: m["state_dict"]["model.weight"].update(dtype="object"), "dtype"),
        (lambda m: m["state_dict"]["model.weight"].update(size=[10**9, 10**9]), "elements"),
        (lambda m: m["state_dict"]["model.weight"].update(requires_grad="no"), "boolean"),
        (lambda m: m.update(format="pickle"), "format"),
        (lambda m: m["planner_data"].update(x={"a": 1}), "planner_data"),
    ],
)
def test_tampered_sharded_metadata_is_refused_by_field(sharded, tamper, match):
    path = sharded / shards.METADATA_FILE
    metadata = json.loads(path.read_text())
    tamper(metadata)
    path.write_text(json.dumps(metadata))
    with pytest.raises(ValueError, match=match):
        _load(sharded)


def test_a_trusted_pickled_metadata_converts_once(sharded):
    from torch.distributed.checkpoint import FileSystemWriter  # DCP's own pickle writer

    legacy = sharded.parent / "legacy"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import torch.distributed.checkpoint as dcp

        dcp.save(_small_state(), storage_writer=FileSystemWriter(str(legacy)))
    with pytest.raises(ValueError, match="convert_pickled_metadata"):
        _load(legacy)
    shards.convert_pickled_metadata(legacy)
    assert _load(legacy)["optimizer"]["param_groups"][0]["lr"] == 1e-3


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    path=st.sampled_from(
        [
            ("storage", 0, "start"),
            ("storage", 0, "length"),
            ("storage", 0, "file"),
            ("storage", 0, "fqn"),
            ("storage", 0, "offset"),
            ("state_dict", "model.weight", "size"),
            ("state_dict", "model.weight", "chunks"),
            ("state_dict", "model.bias", "dtype"),
            ("planner_data", "model.weight"),
            ("version",),
        ]
    ),
    value=st.one_of(
        st.none(),
        st.booleans(),
        st.integers(-(2**40), 2**40),
        st.floats(allow_nan=True, allow_infinity=True),
        st.text(max_size=8),
        st.lists(st.integers(-5, 10**6), max_size=4),
        st.dictionaries(st.text(max_size=3), st.integers(), max_size=2),
    ),
)
def test_any_tampered_metadata_field_loads_or_raises_value_error(sharded, path, value):
    original = (sharded / shards.METADATA_FILE).read_text()
    metadata = json.loads(original)
    node = metadata
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value
    (sharded / shards.METADATA_FILE).write_text(json.dumps(metadata))
    try:
        _load(sharded)  # loads (the change kept the layout) or raises our ValueError
    except ValueError:
        pass
    finally:
        (sharded / shards.METADATA_FILE).write_text(original)


# -- nothing of the user's is replaced or deleted ---------------------------------------------
def _user_folder(path: Path) -> Path:
    path.mkdir(parents=True)
    (path / "thesis.tex").write_text("years of work")
    return path


def _write_one(folder: Path) -> None:
    (folder / "weights.bin").write_bytes(b"new")


def test_a_save_refuses_a_folder_of_someone_elses_files(tmp_path):
    user = _user_folder(tmp_path / "run")
    with pytest.raises(ValueError, match="not a textenvs checkpoint"):
        checkpoint.save_atomically(user, _write_one)
    assert (user / "thesis.tex").read_text() == "years of work"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]


def test_a_save_refuses_a_file_and_leaves_it_where_it_was(tmp_path):
    user = tmp_path / "notes.txt"
    user.write_text("mine")
    with pytest.raises(ValueError, match="is a file"):
        checkpoint.save_atomically(user, _write_one)
    assert user.read_text() == "mine"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]


def test_a_save_goes_into_a_new_an_empty_or_our_own_folder(tmp_path):
    checkpoint.save_atomically(tmp_path / "new", _write_one)
    (tmp_path / "empty").mkdir()
    checkpoint.save_atomically(tmp_path / "empty", _write_one)
    checkpoint.save_atomically(tmp_path / "new", _write_one)  # ours: replaced
    for name in ("new", "empty"):
        assert checkpoint.is_ours(tmp_path / name)
        assert (tmp_path / name / "weights.bin").read_bytes() == b"new"
    legacy = tmp_path / "legacy"  # a checkpoint written before the marker existed
    legacy.mkdir()
    (legacy / checkpoint.COMPLETE).write_text("complete\n")
    checkpoint.save_atomically(legacy, _write_one)
    assert (legacy / "weights.bin").is_file()


@pytest.mark.parametrize("suffix", [".old", ".tmp"])
def test_load_and_recovery_leave_a_users_old_and_tmp_folders(tmp_path, suffix):
    checkpoint.save_atomically(tmp_path / "run", _write_one)
    user = _user_folder(tmp_path / f"run{suffix}")
    assert checkpoint.recover(tmp_path / "run") == tmp_path / "run"
    assert (user / "thesis.tex").read_text() == "years of work"
    with pytest.raises(ValueError, match=f"run{suffix} exists and is not a textenvs checkpoint"):
        checkpoint.save_atomically(tmp_path / "run", _write_one)
    assert (user / "thesis.tex").read_text() == "years of work"


def test_recovery_with_no_checkpoint_never_renames_a_users_folder(tmp_path):
    user = _user_folder(tmp_path / "run.old")
    (user / checkpoint.COMPLETE).write_text("done, says my pipeline\n")  # not our marker
    assert checkpoint.recover(tmp_path / "run") is None
    assert (user / "thesis.tex").is_file() and not (tmp_path / "run").exists()


def test_our_interrupted_save_is_still_recovered(tmp_path):
    def killed(stage):
        if stage == "old_moved_aside":
            raise KeyboardInterrupt

    checkpoint.save_atomically(tmp_path / "run", _write_one)
    with pytest.raises(KeyboardInterrupt):
        checkpoint.save_atomically(tmp_path / "run", _write_one, hook=killed)
    assert not (tmp_path / "run").exists()
    assert checkpoint.recover(tmp_path / "run") == tmp_path / "run"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]


def test_qlearning_save_refuses_to_replace_a_file_that_is_not_its_own(tmp_path):
    env = make_tabular_env("textenvs/Summarize-v0", "train", 3, "hash", 4, 8, 0, max_steps=2)
    agent = QLearning(env, QLearningConfig())
    user = tmp_path / "table.npz"
    user.write_bytes(b"someone's data")
    with pytest.raises(ValueError, match="not a Q-learning save"):
        agent.save(user)
    assert user.read_bytes() == b"someone's data"
    agent.save(tmp_path / "mine.npz")
    agent.save(tmp_path / "mine.npz")  # its own save is replaced


# -- SB3 checkpoints: every field checked -----------------------------------------------------
@pytest.fixture(scope="module")
def sb3_checkpoint(tmp_path_factory):
    config = sb3.SB3Config(num_envs=2, n_steps=4, batch_size=4, n_epochs=1)
    model = sb3.build("textenvs/Summarize-v0", config, **KWARGS)
    model.learn(8)
    folder = tmp_path_factory.mktemp("sb3") / "ppo"
    sb3.save(model, folder, config, "textenvs/Summarize-v0", KWARGS)
    return folder


def _copy(folder: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "copy"
    shutil.copytree(folder, copy)
    return copy


def _rewrite_zip(zip_path: Path, change) -> None:
    with zipfile.ZipFile(zip_path) as archive:
        entries = {name: archive.read(name) for name in archive.namelist()}
    change(entries)
    with zipfile.ZipFile(zip_path, "w", zipfile.ZIP_DEFLATED) as archive:
        for name, content in entries.items():
            archive.writestr(name, content)


def test_sb3_save_refuses_a_users_folder_and_load_refuses_another_zip(sb3_checkpoint, tmp_path):
    user = _user_folder(tmp_path / "results")
    model, meta = sb3.load(sb3_checkpoint)
    with pytest.raises(ValueError, match="not a textenvs checkpoint"):
        sb3.save(model, user, sb3.SB3Config(**meta["config"]), meta["env_id"], KWARGS)
    assert (user / "thesis.tex").is_file()
    copy = _copy(sb3_checkpoint, tmp_path)
    shutil.copy(copy / "model.zip", copy / "other.zip")
    with pytest.raises(ValueError, match="not another zip"):
        sb3.load(copy / "other.zip")
    sb3.load(copy / "model.zip")  # the folder's own zip still loads the folder


@pytest.mark.parametrize(
    "field, value",
    [
        ("gamma", float("nan")),
        ("n_epochs", -5),
        ("batch_size", 0),
        ("ent_coef", float("inf")),
        ("learning_rate", float("inf")),
        ("gamma", "0.99"),
        ("device", "cuda:7"),
        ("num_timesteps", -3),
        ("_n_updates", 1.5),
        ("some_new_field", 1),
    ],
)
def test_sb3_zip_data_cannot_override_the_checked_config(sb3_checkpoint, tmp_path, field, value):
    copy = _copy(sb3_checkpoint, tmp_path)

    def change(entries):
        data = json.loads(entries["data"])
        data[field] = value
        entries["data"] = json.dumps(data).encode()

    _rewrite_zip(copy / "model.zip", change)
    with pytest.raises(ValueError, match=f"field '{field}'"):
        sb3.load(copy)


@pytest.mark.parametrize(
    "change, match",
    [
        ({"num_envs": 10**7}, "num_envs must be an int in"),
        ({"policy_kwargs": {"net_arch": [16000, 16000]}}, "net_arch"),
        ({"policy_kwargs": {"activation_fn": "relu"}}, "must be a class"),
        ({"policy_kwargs": {"net_arch": [64, 64], "surprise": 1}}, "does not take"),
        ({"gamma": "1"}, "gamma must be a finite number"),
        ({"n_steps": 0}, "n_steps must be an int"),
        ({"seed": -1}, "seed must be an int"),
    ],
)
def test_sb3_config_fields_are_checked_before_anything_is_built(
    sb3_checkpoint, tmp_path, change, match
):
    copy = _copy(sb3_checkpoint, tmp_path)
    meta = json.loads((copy / "sb3_config.json").read_text())
    meta["config"].update(change)
    (copy / "sb3_config.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match=match):
        sb3.load(copy)


def test_a_config_naming_a_bigger_network_than_its_weights_is_refused_unbuilt(
    sb3_checkpoint, tmp_path
):
    copy = _copy(sb3_checkpoint, tmp_path)
    meta = json.loads((copy / "sb3_config.json").read_text())
    meta["config"]["policy_kwargs"] = {"net_arch": [8192, 8192, 8192]}  # 134M parameters
    (copy / "sb3_config.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="do not belong together"):
        sb3.load(copy)


@pytest.mark.parametrize(
    "field, value, match",
    [
        ("clip_obs", np.nan, "clip_obs"),
        ("clip_obs", -1.0, "clip_obs"),
        ("epsilon", -1e6, "epsilon"),
        ("epsilon", np.inf, "epsilon"),
        ("count", np.array([1.0, 2.0]), "count"),
        ("mean", np.zeros(3), "mean"),
    ],
)
def test_observation_statistics_are_checked(sb3_checkpoint, tmp_path, field, value, match):
    copy = _copy(sb3_checkpoint, tmp_path)
    with np.load(copy / "obs_normalization.npz") as data:
        stats = {k: data[k] for k in data.files}
    stats[field] = np.asarray(value)
    with open(copy / "obs_normalization.npz", "wb") as f:
        np.savez(f, **stats)
    with pytest.raises(ValueError, match=match):
        sb3.load(copy)


def test_an_inflating_zip_is_refused_before_it_inflates(sb3_checkpoint, tmp_path):
    """A 0.5 GB member that compresses to half a MB: refused from the zip's directory, in a
    process whose peak memory must not grow by the inflated size."""
    copy = _copy(sb3_checkpoint, tmp_path)
    with zipfile.ZipFile(copy / "model.zip") as archive:
        entries = {name: archive.read(name) for name in archive.namelist()}
    with zipfile.ZipFile(copy / "model.zip", "w", zipfile.ZIP_DEFLATED) as archive:
        for name, content in entries.items():
            if name != "policy.optimizer.pth":
                archive.writestr(name, content)
        with archive.open("policy.optimizer.pth", "w", force_zip64=True) as member:
            block = bytes(2**24)
            for _ in range(32):
                member.write(block)
    assert (copy / "model.zip").stat().st_size < 4 * 2**20
    script = f"""
import resource, sys
from agents import sb3
import gymnasium as gym
gym.make("textenvs/Summarize-v0")  # the model and env loaded before the baseline
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
try:
    sb3.load({str(copy)!r})
except ValueError as e:
    assert "inflates to" in str(e), e
else:
    sys.exit("loaded")
grown_mb = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
assert grown_mb < 256, grown_mb
"""
    run = subprocess.run(
        [sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=300
    )
    assert run.returncode == 0, run.stderr[-2000:]


# -- token-PPO checkpoints ----------------------------------------------------------------------
@pytest.fixture(scope="module")
def token_checkpoint(tmp_path_factory):
    config = TokenPPOConfig(
        num_envs=2, max_new_tokens=3, total_episodes=4, minibatch_size=2, num_epochs=1
    )
    trainer = TokenPPO(config)
    trainer.train(progress=False)
    folder = tmp_path_factory.mktemp("token") / "ckpt"
    trainer.save_checkpoint(folder)
    return config, folder


def _fresh(config) -> TokenPPO:
    return TokenPPO(config)


def _tamper_optimizer(folder: Path, change) -> None:
    state = torch.load(folder / "optimizer.pt", weights_only=True)
    change(state)
    torch.save(state, folder / "optimizer.pt")


@pytest.mark.parametrize(
    "change, match",
    [
        (lambda s: s["param_groups"][0].update(betas=(1.5, 0.999)), "betas"),
        (lambda s: s["param_groups"][0].update(lr=float("nan")), "'lr'"),
        (lambda s: s["param_groups"][0].update(eps=-1.0), "'eps'"),
        (lambda s: s["state"][0].update(exp_avg=torch.zeros(3, 3)), "has shape"),
        (lambda s: s["state"][0].update(exp_avg_sq=-s["state"][0]["exp_avg_sq"] - 1), "negative"),
        (lambda s: s["state"][0].update(step=torch.tensor(float("inf"))), "non-finite"),
        (lambda s: s["state"].update({10**6: s["state"][0]}), "does not have"),
        (lambda s: s["param_groups"][0].update(params=[0]), "other parameters"),
    ],
)
def test_a_tampered_optimizer_state_is_refused_by_field(token_checkpoint, tmp_path, change, match):
    config, folder = token_checkpoint
    copy = _copy(folder, tmp_path)
    _tamper_optimizer(copy, change)
    trainer = _fresh(config)
    before = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    with pytest.raises(ValueError, match=match):
        trainer.load_checkpoint(copy)
    assert trainer.iteration == 0
    assert all(torch.equal(v, trainer.model.state_dict()[k]) for k, v in before.items())


@pytest.mark.parametrize(
    "history",
    [[{}], [{"iteration": 0, "episodes": 2, "metric": 0.1, "kl": float("nan")}], [], "x"],
)
def test_a_tampered_history_is_refused(token_checkpoint, tmp_path, history):
    config, folder = token_checkpoint
    copy = _copy(folder, tmp_path)
    state = json.loads((copy / "trainer_state.json").read_text())
    state["history"] = history
    (copy / "trainer_state.json").write_text(json.dumps(state))
    with pytest.raises(ValueError, match="field 'history'"):
        _fresh(config).load_checkpoint(copy)


def test_a_checkpoints_config_json_is_never_what_allocates(token_checkpoint, tmp_path):
    """The checkpoint's model.safetensors is read against this trainer's model: a config.json
    naming a 10 GB model beside it allocates nothing."""
    config, folder = token_checkpoint
    copy = _copy(folder, tmp_path)
    model_config = json.loads((copy / "config.json").read_text())
    model_config.update(n_layer=48, n_embd=4096, n_head=32)
    (copy / "config.json").write_text(json.dumps(model_config))
    trainer = _fresh(config)
    trainer.load_checkpoint(copy)  # the weights fit this model; its config.json is not read
    assert trainer.iteration == 2


_TRAINERS: dict[str, TokenPPO] = {}  # one trainer for every hypothesis example


@settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    field=st.sampled_from(["iteration", "kl_coef", "history", "config", "model_signature"]),
    value=st.one_of(
        st.none(),
        st.booleans(),
        st.integers(-(2**63), 2**63),
        st.floats(allow_nan=True, allow_infinity=True),
        st.text(max_size=5),
        st.lists(st.dictionaries(st.text(max_size=3), st.integers(), max_size=2), max_size=3),
        st.dictionaries(st.text(max_size=4), st.integers(), max_size=3),
    ),
)
def test_any_tampered_trainer_state_field_loads_whole_or_raises_value_error(
    token_checkpoint, tmp_path, field, value
):
    config, folder = token_checkpoint
    copy = tmp_path / "hyp"
    if not copy.exists():
        shutil.copytree(folder, copy)
    original = json.loads((folder / "trainer_state.json").read_text())
    state = {**original, field: value}
    (copy / "trainer_state.json").write_text(json.dumps(state))
    trainer = _TRAINERS.setdefault("t", _fresh(config))
    trainer.iteration = 0
    try:
        trainer.load_checkpoint(copy)
    except ValueError:
        assert trainer.iteration == 0  # nothing replaced
    else:  # a value in range: loaded as written
        assert trainer.iteration == state["iteration"] and trainer.kl.value == state["kl_coef"]
        assert trainer.history == state["history"]
        assert 0 <= trainer.kl.value < float("inf")


# -- model folders: our message, before anything is allocated ----------------------------------
def _model_copy(random_gpt2_dir: str, tmp_path: Path) -> Path:
    copy = tmp_path / "model"
    shutil.copytree(random_gpt2_dir, copy)
    return copy


def _language_model(folder: Path):
    from textenvs.lm import LanguageModel

    return LanguageModel(str(folder))


def test_a_config_far_larger_than_its_weights_allocates_nothing(random_gpt2_dir, tmp_path):
    copy = _model_copy(random_gpt2_dir, tmp_path)
    config = json.loads((copy / "config.json").read_text())
    config.update(n_layer=200, n_embd=2048, n_head=16)  # 10 GB of float32 by the config
    (copy / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="config.json does not describe the weights"):
        _language_model(copy)


def test_another_architecture_in_the_config_is_refused(random_gpt2_dir, tmp_path):
    copy = _model_copy(random_gpt2_dir, tmp_path)
    config = json.loads((copy / "config.json").read_text())
    config.update(n_embd=64, n_head=2)
    (copy / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"is \(\d+, 32\) in the weights"):
        _language_model(copy)


@pytest.mark.parametrize(
    "damage, match",
    [
        (lambda d: (d / "config.json").write_text("[1, 2]"), "expected a JSON object"),
        (lambda d: (d / "config.json").write_text("{"), "not readable JSON"),
        (
            lambda d: (d / "model.safetensors").write_bytes(
                (d / "model.safetensors").read_bytes()[:5000]
            ),
            "may be truncated",
        ),
        (
            lambda d: (
                (d / "model.safetensors").unlink(),
                (d / "model.safetensors").symlink_to(d / "gone"),
            ),
            "does not exist",
        ),
        (lambda d: (d / "model.safetensors").unlink(), "no model.safetensors"),
    ],
)
def test_a_damaged_model_folder_gets_our_message(random_gpt2_dir, tmp_path, damage, match):
    copy = _model_copy(random_gpt2_dir, tmp_path)
    damage(copy)
    with pytest.raises(ValueError, match=match):
        _language_model(copy)


def test_a_symlinked_weights_file_that_is_whole_loads(random_gpt2_dir, tmp_path):
    copy = _model_copy(random_gpt2_dir, tmp_path)  # a hub cache snapshot links its blobs
    blob = tmp_path / "blob"
    (copy / "model.safetensors").rename(blob)
    (copy / "model.safetensors").symlink_to(blob)
    assert _language_model(copy).n_layers == 2


# -- data files and reward models: our message, naming the file and what is wrong ---------------
def _hub_files(tmp_path: Path, name: str, rows: list[dict], splits=("train", "validation", "test")):
    path = tmp_path / name
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return {"data_files": {s: str(path) for s in splits}}


def _make(env_id: str, **kwargs):
    import gymnasium as gym

    import textenvs

    return gym.make(env_id, model=textenvs.TINY, **kwargs)


CNN = "textenvs/CNNDailyMail-v0"


@pytest.mark.parametrize(
    "write, match",
    [
        (lambda p: p.write_bytes(b""), "is empty \\(0 bytes\\)"),
        (lambda p: p.write_text("\n\n"), "only blank lines"),
        (lambda p: p.write_text("[" * 50_000 + "]" * 50_000 + "\n"), "nested deeper"),
        (
            lambda p: p.write_text(
                json.dumps({"source": "a " * 1_100_000, "references": ["b"]}) + "\n"
            ),
            "more than the 2,097,152",
        ),
    ],
)
def test_a_bad_jsonl_file_gets_our_message(tmp_path, write, match):
    path = tmp_path / "data.jsonl"
    write(path)
    with pytest.raises(ValueError, match=match):
        _make("textenvs/Summarize-v0", dataset=str(path))


def test_a_csv_cell_past_the_csv_modules_limit_is_read(tmp_path):
    path = tmp_path / "data.csv"
    path.write_text("source,reference\n" + "word " * 40_000 + ",short\nhello,world\n")
    env = _make(
        "textenvs/Summarize-v0", dataset=str(path), too_long="truncate", max_steps=2
    ).unwrapped
    assert len(env.samples) == 2 and len(env.samples[0].source) == 200_000


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"dataset_kwargs": [1]}, "dataset_kwargs must be a dict"),
        ({"dataset_kwargs": "data.jsonl"}, "dataset_kwargs must be a dict"),
    ],
)
def test_dataset_kwargs_of_the_wrong_type(kwargs, match):
    with pytest.raises(ValueError, match=match):
        _make("textenvs/Summarize-v0", **kwargs)


def test_cache_dir_must_be_a_path_and_writes_nothing(tmp_path, monkeypatch):
    from tests.hub_fixtures import hub_fixture

    monkeypatch.chdir(tmp_path)
    with pytest.raises(ValueError, match="cache_dir.* must be a string or path, got int 5"):
        _make(CNN, dataset_kwargs={**hub_fixture("cnn_dailymail"), "cache_dir": 5})
    assert not (tmp_path / "5").exists()


def test_empty_and_zero_row_data_files_are_named(tmp_path):
    import pandas as pd

    empty = tmp_path / "empty.jsonl"
    empty.write_bytes(b"")
    with pytest.raises(ValueError, match="empty.jsonl' is empty"):
        _make(
            CNN,
            dataset_kwargs={"data_files": {s: str(empty) for s in ("train", "validation", "test")}},
        )
    with pytest.raises(ValueError, match="empty.jsonl' is empty"):
        _make(
            "textenvs/Summarize-v0",
            dataset="hf:json",
            dataset_kwargs={"data_files": str(empty), "source_key": "s", "reference_key": "r"},
        )
    parquet = tmp_path / "zero.parquet"
    pd.DataFrame({c: pd.Series([], dtype=str) for c in ("article", "highlights", "id")}).to_parquet(
        parquet
    )
    with pytest.raises(ValueError, match="holds 0 rows"):
        _make(
            CNN,
            dataset_kwargs={
                "data_files": {s: str(parquet) for s in ("train", "validation", "test")}
            },
        )


@pytest.mark.parametrize(
    "env_id, rows, extra, match",
    [
        (CNN, [{"article": 5, "highlights": "a b", "id": "1"}], {}, "'article' is int"),
        (CNN, [{"article": "a b", "highlights": ["x"], "id": "1"}], {}, "'highlights' is list"),
        (
            "textenvs/WMT16-v0",
            [{"translation": {"de": "Der Rat", "en": "The council"}}],
            {"pair": "ro-en"},
            "'translation' has the languages \\['de', 'en'\\], not 'ro'",
        ),
        ("textenvs/WMT16-v0", [{"translation": "Der Rat"}], {}, "'translation' is a str"),
        (
            "textenvs/CommonGen-v0",
            [{"concept_set_idx": 0, "concepts": "dog cat", "target": "a dog and a cat"}],
            {},
            "'concepts' is 'dog cat', not a non-empty list",
        ),
    ],
)
def test_a_file_in_the_wrong_schema_says_which_row_and_why(tmp_path, env_id, rows, extra, match):
    files = _hub_files(tmp_path, "rows.jsonl", rows * 3)
    with pytest.raises(ValueError, match=f"holds no usable sample.*row 0: {match}"):
        _make(env_id, dataset_kwargs={**files, **extra})


def test_rows_left_out_and_split_files_not_read_are_said(tmp_path):
    from tests.hub_fixtures import _rows

    good = _rows("cnn_dailymail", "train", 4)
    files = _hub_files(
        tmp_path, "rows.jsonl", [*good, {"article": "", "highlights": "x", "id": "9"}]
    )
    files["data_files"]["tset"] = files["data_files"]["test"]
    with pytest.warns(UserWarning) as caught:
        _make(CNN, dataset_kwargs=files)
    said = " ".join(str(w.message) for w in caught)
    assert "1 of 5 rows make no sample and are left out (row 4: 'article' is empty)" in said
    assert "has the splits ['tset'], which task 'cnn_dailymail' does not read" in said


def test_the_offline_message_names_the_splits_the_task_reads():
    from textenvs.tasks.hub import BENCHMARKS, _unavailable

    message = _unavailable(BENCHMARKS["imdb"], "plain_text", "train", None, OSError("offline"))
    assert "{'test': ..., 'train': ...}" in message and "}}" not in message.replace("...}}", "")
    assert "validation" not in message


def test_reward_model_paths_and_layers_get_our_message(tmp_path):
    from tests.conftest import CLASSIFIER_DIR, ENCODER_DIR
    from textenvs.model_rewards import shared_metric

    with pytest.raises(FileNotFoundError, match="not a folder here and not a hub name"):
        shared_metric("classifier", {"model": str(tmp_path / "missing")})
    with pytest.raises(ValueError, match="num_layers.*=50 is past the 2 layers"):
        shared_metric("bertscore", {"model": ENCODER_DIR, "num_layers": 50})
    pickled = tmp_path / "pickled"  # a stray safetensors file beside the pickle that would load
    shutil.copytree(CLASSIFIER_DIR, pickled)
    (pickled / "model.safetensors").rename(pickled / "other.safetensors")
    (pickled / "pytorch_model.bin").write_bytes(b"not read")
    with pytest.raises(ValueError, match="no model.safetensors"):
        shared_metric("classifier", {"model": str(pickled)})


def test_nan_weights_and_an_inflating_optimizer_file_are_refused(token_checkpoint, tmp_path):
    from safetensors.torch import load_file, save_file

    config, folder = token_checkpoint
    copy = _copy(folder, tmp_path)
    head = load_file(copy / "value_head.safetensors")
    head["weight"][0, 0] = float("nan")
    save_file(head, copy / "value_head.safetensors")
    with pytest.raises(ValueError, match="NaN or infinite"):
        _fresh(config).load_checkpoint(copy)
    copy = _copy(folder, tmp_path / "2")
    with zipfile.ZipFile(copy / "optimizer.pt", "w", zipfile.ZIP_DEFLATED) as archive:
        with archive.open("archive/data.pkl", "w", force_zip64=True) as member:
            for _ in range(16):
                member.write(bytes(2**24))
    with pytest.raises(ValueError, match="inflates to"):
        _fresh(config).load_checkpoint(copy)


@pytest.mark.parametrize(
    "extra, match",
    [
        ({"revision": 5}, "revision.* must be a string, got int 5"),
        ({"prompt_template": "no placeholder"}, "prompt_template.* must be a string holding"),
    ],
)
def test_benchmark_dataset_kwargs_are_type_checked(extra, match):
    from tests.hub_fixtures import hub_fixture

    with pytest.raises(ValueError, match=match):
        _make(CNN, dataset_kwargs={**hub_fixture("cnn_dailymail"), **extra})


def test_a_symlink_save_target_and_a_folder_where_a_file_goes_are_refused(tmp_path):
    real = tmp_path / "real"
    checkpoint.save_atomically(real, _write_one)
    link = tmp_path / "link"
    link.symlink_to(real)
    with pytest.raises(ValueError, match="is a symlink"):
        checkpoint.save_atomically(link, _write_one)
    assert link.is_symlink() and (real / "weights.bin").read_bytes() == b"new"
    folder = _user_folder(tmp_path / "table.npz")
    with pytest.raises(ValueError, match="is a folder or a symlink"):
        checkpoint.replace_file_atomically(folder, lambda p: p.write_bytes(b"x"))
    assert (folder / "thesis.tex").read_text() == "years of work"


def test_a_qlearning_save_that_inflates_is_refused_before_reading(tmp_path, monkeypatch):
    from agents import qlearning

    monkeypatch.setattr(qlearning, "MAX_SAVE_MEMBER_BYTES", 2**20)  # the cap, scaled down
    path = tmp_path / "q.npz"
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("q.npy", bytes(2**24))  # 16 MB of zeros, a few KB compressed
    with pytest.raises(ValueError, match="inflates to"):
        QLearning.load(path)
