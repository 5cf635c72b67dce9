"""Hostile use: random valid and invalid actions on every id, kills during every stage of a save,
extreme arguments, damaged files. Nothing may be accepted silently, crash, or leak a NaN.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from decimal import Decimal
from pathlib import Path

import gymnasium as gym
import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import textenvs
from tests.conftest import ENV_IDS, FAST_KWARGS

ROOT = Path(__file__).resolve().parents[1]


def invalid_actions(space: gym.Space, rng: np.random.Generator) -> list:
    """Values that are not in ``space``: out of bounds, wrong types, wrong shapes."""
    if isinstance(space, gym.spaces.Discrete):
        n = int(space.n)
        return [
            -1,
            n,
            n + int(rng.integers(1, 10**6)),
            10**30,
            3.0,
            1.5,
            True,
            np.bool_(False),
            "5",
            Decimal(5),
            None,
            np.array(2.0),
            np.array("3"),
            np.array([1]),
            [1, 2],
            np.uint64(2**63),
            np.int64(-(2**40)),
            complex(1, 0),
            object(),
        ]
    nvec = space.nvec
    good = rng.integers(nvec)
    wrong_dim = good.copy()
    wrong_dim[int(rng.integers(len(nvec)))] = nvec[0] + 10**6
    return [
        wrong_dim,
        -good - 1,
        good.astype(np.float64),
        good.astype(bool),
        list(good) + [0],
        good[:-1],
        [str(x) for x in good],
        None,
        3,
        np.array([good, good]),
        good.astype(object),
        "0 0 0",
        1.5,
    ]


def hostile_counts(env_id: str, n_actions: int, seed: int) -> dict:
    # Edit envs start from the source (one forward) rather than the LM's draft (one per token).
    start = {"start": "source"} if textenvs.is_edit_env(env_id) else {}
    env = gym.make(env_id, **FAST_KWARGS[env_id], **start).unwrapped
    rng = np.random.default_rng(seed)
    env.action_space.seed(seed)
    counts = {
        "tried": 0,
        "valid": 0,
        "clear error": 0,
        "crash": 0,
        "silent accept": 0,
        "non-finite": 0,
    }
    env.reset(seed=seed)
    for _ in range(n_actions):
        counts["tried"] += 1
        if rng.random() < 0.25:
            obs, reward, terminated, truncated, _ = env.step(env.action_space.sample())
            counts["valid"] += 1
            if not (
                np.isfinite(reward)
                and np.isfinite(obs).all()
                and env.observation_space.contains(obs)
            ):
                counts["non-finite"] += 1
            if terminated or truncated:
                env.reset()
            continue
        bad = invalid_actions(env.action_space, rng)
        action = bad[int(rng.integers(len(bad)))]
        try:
            env.step(action)
            counts["silent accept"] += 1
            env.reset()
        except ValueError as e:
            counts["clear error"] += "not in the action space" in str(e)
            counts["crash"] += "not in the action space" not in str(e)
        except Exception:  # noqa: BLE001 - anything but the clear error is a crash
            counts["crash"] += 1
    return counts


@pytest.mark.slow
@pytest.mark.parametrize("env_id", ENV_IDS)
def test_ten_thousand_hostile_actions_per_id(env_id):
    counts = hostile_counts(env_id, 10_000, seed=0)
    assert counts["tried"] == 10_000
    assert counts["silent accept"] == counts["crash"] == counts["non-finite"] == 0, counts
    assert counts["clear error"] + counts["valid"] == 10_000


def test_batched_envs_refuse_bad_rows_and_step_nothing():
    rng = np.random.default_rng(1)
    for env_id in ("textenvs/Summarize-v0", "textenvs/EditSummary-v0"):
        # SameStep: every row acts on every step (under NextStep a row waiting for its reset
        # ignores its action, as gymnasium's own vector envs do)
        envs = gym.make_vec(env_id, num_envs=3, autoreset_mode="SameStep", **FAST_KWARGS[env_id])
        envs.reset(seed=0)
        for _ in range(30):
            actions = np.stack([envs.single_action_space.sample() for _ in range(3)])
            bad_row = int(rng.integers(3))
            texts = [env.text for env in envs.unwrapped.envs]
            bad = invalid_actions(envs.single_action_space, rng)[0]
            if isinstance(envs.single_action_space, gym.spaces.Discrete):
                actions[bad_row] = bad if abs(bad) < 2**62 else -1
            else:
                actions[bad_row] = bad
            with pytest.raises(ValueError, match="not in the action space"):
                envs.step(actions)
            assert [env.text for env in envs.unwrapped.envs] == texts  # no sub-env was stepped
            for wrong in (actions.astype(np.float64), actions.astype(bool), actions[:2]):
                with pytest.raises(ValueError):
                    envs.step(wrong)
            envs.step(np.stack([envs.single_action_space.sample() for _ in range(3)]))


# -- extreme arguments ---------------------------------------------------------------------------

extreme = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from([0.0, 1e-300, 1e308, -0.0, 1000.0, 1000.0001, True, "1", None]),
    st.integers(min_value=-(10**20), max_value=10**20),
)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(length=extreme, repetition=extreme, cost=extreme, penalty=extreme, edit=st.booleans())
def test_extreme_arguments_are_refused_or_give_finite_rewards(
    length, repetition, cost, penalty, edit
):
    kwargs = {"length_penalty": length, "repetition_penalty": repetition, "max_steps": 4}
    env_id = "textenvs/EditSummary-v0" if edit else "textenvs/Summarize-v0"
    if edit:
        kwargs.update(edit_cost=cost, invalid_penalty=penalty, max_len=12)
    try:
        env = gym.make(env_id, **kwargs).unwrapped
    except ValueError as e:
        assert "must be a finite number in [0, 1000]" in str(e)
        return
    env.action_space.seed(0)
    env.reset(seed=0)
    for _ in range(8):
        obs, reward, terminated, truncated, _ = env.step(env.action_space.sample())
        assert np.isfinite(reward) and np.isfinite(obs).all()
        if terminated or truncated:
            env.reset()


def test_a_metric_that_returns_a_non_number_or_huge_values_is_caught():
    def text_metric(hypothesis, references):
        return "high"

    env = gym.make("textenvs/Summarize-v0", reward=text_metric, max_steps=3)
    with pytest.raises(ValueError, match="must return a finite number"):
        env.reset(seed=0)
    flip = iter([0.0] + [1e308, -1e308] * 10)
    env = gym.make("textenvs/Summarize-v0", reward=lambda h, r: next(flip), max_steps=3)
    env.reset(seed=0)
    env.step(5)
    with pytest.raises(FloatingPointError, match="ordinary magnitudes"):
        env.step(6)  # -1e308 - 1e308 overflows: refused, never returned


# -- kills during saves --------------------------------------------------------------------------

KILLER = """
import os, signal, sys
import torch
torch.set_num_threads({threads})
import agents.checkpoint as checkpoint
target_save, target_stage, saves = int(sys.argv[1]), sys.argv[2], [0]
def kill_at(hook, stage):
    saves[0] += stage == "written"
    if saves[0] == target_save and stage == target_stage:
        os.kill(os.getpid(), signal.SIGKILL)
checkpoint._call = kill_at
"""


def run_killed(body: str, save: int, stage: str) -> subprocess.CompletedProcess:
    code = KILLER.format(threads=torch.get_num_threads()) + body
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    result = subprocess.run(
        [sys.executable, "-c", code, str(save), stage],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == -9, result.stderr[-2000:]  # killed where we said
    return result


def no_leftovers(folder: Path) -> bool:
    return not any(folder.with_name(folder.name + s).exists() for s in (".tmp", ".old"))


def run_child(body: str, *args: str) -> None:
    code = f"import torch\ntorch.set_num_threads({torch.get_num_threads()})\n" + body
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    result = subprocess.run(
        [sys.executable, "-c", code, *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-2000:]


TRAINER = """
from agents.token_ppo import TokenPPO, TokenPPOConfig
def trainer(folder):
    return TokenPPO(TokenPPOConfig(model={model!r}, num_envs=4, max_new_tokens=4, total_episodes=12,
                                   minibatch_size=2, num_epochs=1, eval_samples=3, seed=3,
                                   checkpoint_dir=folder, save_every=1))
"""


@pytest.fixture(scope="module")
def uninterrupted_weights(tmp_path_factory, random_gpt2_dir):
    """The final policy of a token-PPO run that nobody interrupted (trained in a child process,
    as the killed and the resumed runs are)."""
    from safetensors.torch import load_file

    folder = tmp_path_factory.mktemp("uninterrupted") / "ckpt"
    run_child(
        TRAINER.format(model=random_gpt2_dir) + f"trainer({str(folder)!r}).train(progress=False)\n"
    )
    return load_file(folder / "model.safetensors")


@pytest.mark.slow
@pytest.mark.parametrize("stage", ["written", "old_moved_aside", "new_in_place", "done"])
def test_token_ppo_killed_at_any_stage_of_a_save_resumes_to_the_uninterrupted_result(
    tmp_path, random_gpt2_dir, uninterrupted_weights, stage
):
    from safetensors.torch import load_file

    folder = tmp_path / "ckpt"
    setup = TRAINER.format(model=random_gpt2_dir)
    run_killed(setup + f"trainer({str(folder)!r}).train(progress=False)\n", save=2, stage=stage)
    assert not (folder / "model.safetensors").exists() or (folder / "COMPLETE").exists()
    run_child(
        setup
        + f"""
t = trainer({str(folder)!r})
t.load_checkpoint({str(folder)!r})
assert t.iteration in (1, 2), t.iteration
t.train(progress=False)
"""
    )
    assert no_leftovers(folder) and (folder / "COMPLETE").exists()
    resumed = load_file(folder / "model.safetensors")
    for name, weight in uninterrupted_weights.items():  # within float rounding, as any resume
        torch.testing.assert_close(resumed[name], weight, atol=1e-6, rtol=0, msg=name)


@pytest.mark.slow
@pytest.mark.parametrize("stage", ["written", "done"])
def test_qlearning_killed_while_saving_leaves_the_old_or_the_new_table(tmp_path, stage):
    from agents.qlearning import QLearning, make_tabular_env

    path = tmp_path / "q.npz"
    body = f"""
import numpy as np
from agents.qlearning import QLearning, make_tabular_env
env = make_tabular_env("textenvs/Summarize-v0", "train", 3, "hash", 4, 8, 0, n_fit=32, max_steps=3)
agent = QLearning(env)
agent.learn(30)
agent.save({str(path)!r})
np.save({str(tmp_path / "first.npy")!r}, agent.q)
agent.learn(30)
np.save({str(tmp_path / "second.npy")!r}, agent.q)
agent.save({str(path)!r})
"""
    run_killed(body, save=2, stage=stage)
    env = make_tabular_env(
        "textenvs/Summarize-v0", "train", 3, "hash", 4, 8, 0, n_fit=32, max_steps=3
    )
    loaded = QLearning.load(path, env)
    expected = np.load(tmp_path / ("first.npy" if stage == "written" else "second.npy"))
    np.testing.assert_array_equal(loaded.q, expected)
    loaded.save(path)  # saving again works, whatever the kill left behind


@pytest.mark.slow
@pytest.mark.parametrize("stage", ["written", "old_moved_aside", "new_in_place"])
def test_sb3_killed_while_saving_leaves_a_loadable_checkpoint(tmp_path, stage):
    from agents import sb3

    folder = tmp_path / "ppo"
    body = f"""
from agents import sb3
kwargs = {{"token_mode": "topk", "k": 3, "max_steps": 3}}
config = sb3.SB3Config(num_envs=2, n_steps=8, batch_size=8, n_epochs=1)
model = sb3.build("textenvs/Summarize-v0", config, **kwargs)
model.learn(16)
sb3.save(model, {str(folder)!r}, config, "textenvs/Summarize-v0", kwargs)
model.learn(16, reset_num_timesteps=False)
sb3.save(model, {str(folder)!r}, config, "textenvs/Summarize-v0", kwargs)
"""
    run_killed(body, save=2, stage=stage)
    model, meta = sb3.load(folder)
    # "written": the old folder is still in place; later, the complete new one is promoted
    assert model.num_timesteps == (16 if stage == "written" else 32)
    assert no_leftovers(folder) and meta["env_id"] == "textenvs/Summarize-v0"


# -- damaged files -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "change,match",
    [
        ({"steps": -5}, "field 'steps' is"),
        ({"steps": np.array([1, 2])}, "field 'steps'"),
        ({"config": "{"}, "field 'config'"),
        ({"config": json.dumps({"learning_rate": 7})}, "field 'config'"),
        ({"config": json.dumps({"nope": 1})}, "field 'config'"),
        ({"q": np.full((16, 3), np.nan)}, "field 'q'"),
        ({"q": None}, "field 'q' is missing"),
    ],
)
def test_a_damaged_qlearning_save_names_the_field(tmp_path, change, match):
    from agents.qlearning import QLearning, make_tabular_env

    env = make_tabular_env(
        "textenvs/Summarize-v0", "train", 3, "hash", 4, 8, 0, n_fit=32, max_steps=3
    )
    path = QLearning(env).save(tmp_path / "q")
    with np.load(path) as data:
        fields = {k: data[k] for k in data.files}
    fields.update(change)
    np.savez(path, **{k: v for k, v in fields.items() if v is not None})
    with pytest.raises(ValueError, match=match):
        QLearning.load(path, env)


@pytest.mark.parametrize(
    "damage,match",
    [
        (lambda meta: meta.update(env_id="textenvs/Nope-v0"), "not a registered id"),
        (lambda meta: meta["config"].update(algo="dqn"), "not a valid SB3Config"),
        (lambda meta: meta["config"].update(learning_rate=-1), "not a valid SB3Config"),
        (lambda meta: meta.update(env_kwargs=[]), "field 'env_kwargs'"),
    ],
)
def test_a_damaged_sb3_config_names_the_field(tmp_path, damage, match):
    from agents import sb3

    kwargs = {"token_mode": "topk", "k": 3, "max_steps": 3}
    config = sb3.SB3Config(num_envs=2, n_steps=8, batch_size=8, n_epochs=1)
    folder = sb3.save(
        sb3.build("textenvs/Summarize-v0", config, **kwargs),
        tmp_path / "m",
        config,
        "textenvs/Summarize-v0",
        kwargs,
    )
    meta = json.loads((folder / "sb3_config.json").read_text())
    damage(meta)
    (folder / "sb3_config.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match=match):
        sb3.load(folder)


def _two_processes_save(folder: Path, version: str, hook=None):
    """save_atomically_together from 2 threads standing for 2 processes (a thread barrier for
    the processes' one); each writes its part, process 0 the rest. Returns each one's error."""
    import threading

    from agents.checkpoint import save_atomically_together

    barrier = threading.Barrier(2, timeout=20)
    errors = [None, None]

    def process(rank: int) -> None:
        def write_part(tmp: Path) -> None:
            (tmp / "shards").mkdir(exist_ok=True)
            (tmp / "shards" / f"{rank}.part").write_text(version)

        def write_rest(tmp: Path) -> None:  # runs after every part is written
            assert sorted(p.name for p in (tmp / "shards").iterdir()) == ["0.part", "1.part"]
            (tmp / "state.json").write_text(version)

        try:
            save_atomically_together(
                folder, write_part, write_rest, rank == 0, barrier.wait, hook if rank == 0 else None
            )
        except Exception as e:  # a killed process: the other's barrier breaks
            errors[rank] = e
            barrier.abort()

    threads = [threading.Thread(target=process, args=(r,)) for r in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return errors


@pytest.mark.parametrize("stage", ["written", "old_moved_aside", "new_in_place", "done"])
def test_a_sharded_save_killed_at_any_stage_leaves_a_whole_checkpoint(tmp_path, stage):
    from agents.checkpoint import recover

    folder = tmp_path / "ckpt"
    assert _two_processes_save(folder, "old") == [None, None]
    assert {p.read_text() for p in folder.rglob("*.part")} == {"old"}

    class Killed(Exception):
        pass

    def hook(at: str) -> None:
        if at == stage:
            raise Killed(at)

    errors = _two_processes_save(folder, "new", hook)
    assert isinstance(errors[0], Killed)
    assert recover(folder) == folder and no_leftovers(folder)
    version = (folder / "state.json").read_text()
    assert version in ("old", "new") and (folder / "COMPLETE").is_file()
    # every part of the checkpoint in place is of that one save
    assert [p.read_text() for p in sorted((folder / "shards").iterdir())] == [version, version]
    assert _two_processes_save(folder, "newer") == [None, None] and no_leftovers(folder)
    assert (folder / "state.json").read_text() == "newer"


def test_the_other_processes_do_not_read_process_0s_tmp_while_it_is_being_made(tmp_path):
    """A half-written marker in <folder>.tmp (process 0 is making it) is "not ours" to a reader:
    only process 0 checks the leftovers, so another process's check cannot refuse the save."""
    from agents.checkpoint import MARKER, check_save_target

    folder = tmp_path / "ckpt"
    tmp = tmp_path / "ckpt.tmp"
    tmp.mkdir()
    (tmp / MARKER).write_text("")  # opened, not yet written
    with pytest.raises(ValueError, match="not a textenvs checkpoint"):
        check_save_target(folder)  # process 0's full check: a user's folder would be refused
    assert check_save_target(folder, leftovers=False) == folder  # the others: the folder only
