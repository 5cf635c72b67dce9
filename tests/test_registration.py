"""The ids resolve in processes that never import textenvs (the installed .pth hook)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

# A fresh interpreter that imports gymnasium only, then makes the id in two spawned workers.
WORKERS = textwrap.dedent(
    """
    import sys
    from functools import partial
    import gymnasium as gym
    assert "torch" not in sys.modules  # resolving ids costs no torch import
    make = partial(gym.make, ENV_ID, max_steps=2)
    envs = gym.vector.AsyncVectorEnv([make, make], context="spawn")
    obs, _ = envs.reset(seed=0)
    envs.step(envs.action_space.sample())
    envs.close()
    print("ok", obs.shape)
    """
)


def run_fresh(code: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=300,  # a regression fails instead of hanging CI
        env={**os.environ, **env},
        cwd=os.path.dirname(sys.executable),  # not the checkout: nothing of ours on sys.path
    )


def test_import_gymnasium_registers_the_ids_without_loading_torch():
    code = (
        "import sys, gymnasium as gym\n"
        "print(sorted(i for i in gym.registry if i.startswith('textenvs/')))\n"
        "print('torch' in sys.modules)"
    )
    out = run_fresh(code)
    assert out.returncode == 0, out.stderr
    ids, torch_loaded = out.stdout.strip().splitlines()
    assert "textenvs/Summarize-v0" in ids and "textenvs/EditSummary-v0" in ids
    assert torch_loaded == "False"


@pytest.mark.slow
@pytest.mark.parametrize(
    "env_id,switch_off",
    [
        ("textenvs/Summarize-v0", False),
        ("textenvs/Summarize-v0", True),
        ("textenvs:textenvs/Summarize-v0", True),  # gymnasium's own module:id form
    ],
)
def test_spawned_workers_make_the_ids_with_no_import_of_ours(env_id, switch_off):
    out = run_fresh(
        WORKERS.replace("ENV_ID", repr(env_id)),
        TEXTENVS_NO_AUTOREGISTER="1" if switch_off else "0",
    )
    if switch_off and ":" not in env_id:
        assert out.returncode != 0 and "Namespace textenvs not found" in out.stderr
    else:
        assert out.returncode == 0, out.stderr[-2000:]
        assert out.stdout.startswith("ok (2,")


@pytest.mark.slow
def test_sb3_subproc_vec_env_from_a_fresh_interpreter():
    """SB3's SubprocVecEnv (forkserver by default) from `python -c`, nothing of ours imported."""
    pytest.importorskip("stable_baselines3")
    code = textwrap.dedent(
        """
        from stable_baselines3.common.env_util import make_vec_env
        from stable_baselines3.common.vec_env import SubprocVecEnv
        venv = make_vec_env("textenvs/EditSummary-v0", n_envs=2, vec_env_cls=SubprocVecEnv,
                            env_kwargs={"max_len": 8, "max_steps": 2, "k": 2})
        obs = venv.reset()
        venv.step([venv.action_space.sample() for _ in range(2)])
        venv.close()
        print("ok", obs.shape)
        """
    )
    out = run_fresh(code)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.startswith("ok (2,")


@pytest.mark.slow
@pytest.mark.parametrize("context", [None, "fork", "forkserver", "spawn"])
def test_async_vector_env_after_torch_work_in_the_parent_does_not_hang(context):
    """Forked workers of a process whose torch thread pool ran used to deadlock in reset()."""
    vector_kwargs = "" if context is None else f", vector_kwargs={{'context': {context!r}}}"
    code = textwrap.dedent(
        f"""
        import torch, gymnasium as gym
        x = torch.randn(256, 256)
        for _ in range(20):
            x = torch.tanh(x @ x)  # the parent's intra-op pool has run
        envs = gym.make_vec("textenvs/Summarize-v0", num_envs=2, vectorization_mode="async",
                            max_steps=2{vector_kwargs})
        envs.reset(seed=0)
        envs.step(envs.action_space.sample())
        envs.close()
        print("ok")
        """
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=240
    )  # a regression fails here (TimeoutExpired) instead of hanging CI
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-2000:]


@pytest.mark.parametrize(
    "probe",
    [
        "import importlib.util; assert importlib.util.find_spec('gymnasium') is not None",
        "import importlib.util; importlib.util.find_spec('gymnasium'); "
        "importlib.util.find_spec('gymnasium')",
    ],
)
def test_a_look_up_of_gymnasium_before_its_import_still_registers_the_ids(probe):
    """TorchRL (and others) probe with find_spec before importing: the hook survives look-ups."""
    code = (
        f"{probe}\n"
        "import gymnasium as gym\n"
        "print(sum(i.startswith('textenvs/') for i in gym.registry))"
    )
    out = run_fresh(code)
    assert out.returncode == 0, out.stderr
    import gymnasium as gym

    assert int(out.stdout.strip()) == sum(i.startswith("textenvs/") for i in gym.registry)


def test_a_broken_textenvs_never_breaks_import_gymnasium(tmp_path):
    """The hook runs in every process that imports gymnasium: a failing import of ours warns."""
    broken = tmp_path / "textenvs"
    broken.mkdir()
    (broken / "__init__.py").write_text("raise RuntimeError('half-installed')\n")
    code = "import gymnasium as gym; print('ok', 'CartPole-v1' in gym.registry)"
    out = run_fresh(code, PYTHONPATH=str(tmp_path))  # shadows the installed package
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok True"
    assert "textenvs could not register its Gymnasium ids" in out.stderr
    assert "half-installed" in out.stderr
