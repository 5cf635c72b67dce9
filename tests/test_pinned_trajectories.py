"""Pinned trajectories: every env id's rewards, end flags and texts for a seed, bit for bit, and
its observations within 1e-5.

The file ``tests/data/pinned_trajectories.npz`` was recorded from the code before the structural
refactor (issue 12) and must never change unless an env's semantics change on purpose (then bump
the id's version and re-record with ``python -m tests.test_pinned_trajectories --write``). Single
envs and the batched vector envs (SameStep autoreset) are both pinned.

It was re-recorded once without a semantic change: when ``LanguageModel`` began running GPT-2's
tanh GELU as PyTorch's one kernel (``textenvs.lm.fuse_tanh_gelu``, the same function within an
ulp), every case's rewards, ends and texts stayed bit-identical and its observations moved by at
most 1.5e-6, well inside the 1e-5 the README allows between thread counts.

Float sums depend on how many threads split them, so a trajectory is recorded and compared with
``RECORDED_THREADS`` torch threads, whatever the process runs with otherwise (the test command's
pytest-xdist workers run one thread each). They also depend on the CPU: the kernels a CPU's
vector units select round differently. On the machine that recorded the file the observations
were the same bit for bit; on an AVX-512 Xeon (2026-12-02) every case kept its rewards, ends and
texts bit for bit and its observations moved by at most 2.8e-6. Observations are therefore
compared within ``OBS_ATOL``, the README's allowance between thread counts: far below what any
change of what an env computes moves them by.
"""

from __future__ import annotations

import sys
from pathlib import Path

import gymnasium as gym
import numpy as np
import pytest
import torch

import textenvs  # noqa: F401  (registers the ids)
from tests.conftest import BENCHMARK_KWARGS

PINNED = Path(__file__).parent / "data" / "pinned_trajectories.npz"
RECORDED_THREADS = 2  # torch threads of the recording
OBS_ATOL = 1e-5  # observations across CPUs and thread counts

# (case name, env id, keyword arguments, vector sub-envs or 0 for a single env, steps)
CASES = [
    ("summarize", "textenvs/Summarize-v0", {"max_steps": 5}, 0, 14),
    (
        "translate_topk",
        "textenvs/Translate-v0",
        {"token_mode": "topk", "k": 4, "max_steps": 6},
        0,
        14,
    ),
    (
        "generate_mean_terminal",
        "textenvs/Generate-v0",
        {"task": "translate", "obs": "mean", "dense": False, "max_steps": 4, "reward": "chrf"},
        0,
        12,
    ),
    ("edit", "textenvs/Edit-v0", {"max_steps": 5, "max_len": 12}, 0, 14),
    (
        "edit_summary_positions",
        "textenvs/EditSummary-v0",
        {"obs": "positions", "max_steps": 6, "max_len": 10, "k": 3},
        0,
        14,
    ),
    (
        "edit_translation_vocab",
        "textenvs/EditTranslation-v0",
        {"token_mode": "vocab", "max_steps": 4, "max_len": 16, "dense": False},
        0,
        12,
    ),
    ("vector_summarize", "textenvs/Summarize-v0", {"max_steps": 4}, 3, 10),
    (
        "vector_translate_topk",
        "textenvs/Translate-v0",
        {"token_mode": "topk", "k": 4, "max_steps": 3},
        3,
        10,
    ),
    (
        "vector_edit_summary",
        "textenvs/EditSummary-v0",
        {"max_steps": 3, "max_len": 10, "obs": "positions"},
        3,
        10,
    ),
    # the benchmark ids on their local fixtures (the hub's schema), with the built-in model
    *(
        (f"benchmark_{kwargs['task']}", env_id, {**BENCHMARK_KWARGS[env_id], "max_steps": 4}, 0, 10)
        for env_id, kwargs in textenvs.BENCHMARK_IDS.items()
    ),
    # conversations: the data responder, and a seeded LM responder in top-k mode
    ("dialogue", "textenvs/Dialogue-v0", {"max_turn_tokens": 3}, 0, 14),
    (
        "chat_lm_responder_topk",
        "textenvs/Chat-v0",
        {
            "responder": "lm",
            "responder_kwargs": {"max_new_tokens": 4, "seed": 3},
            "token_mode": "topk",
            "k": 4,
            "max_turn_tokens": 3,
            "max_turns": 3,
        },
        0,
        14,
    ),
    ("vector_dialogue", "textenvs/Dialogue-v0", {"max_turn_tokens": 2, "max_turns": 3}, 3, 10),
    (
        "benchmark_daily_dialog",
        "textenvs/DailyDialog-v0",
        {**BENCHMARK_KWARGS["textenvs/DailyDialog-v0"], "max_turn_tokens": 3},
        0,
        12,
    ),
    (
        "vector_cnndm_truncated",
        "textenvs/CNNDailyMail-v0",
        {**BENCHMARK_KWARGS["textenvs/CNNDailyMail-v0"], "max_steps": 3},
        3,
        8,
    ),
]


def _single_actions(space: gym.Space, rng: np.random.Generator):
    if isinstance(space, gym.spaces.Discrete):
        return int(rng.integers(space.n))
    return rng.integers(space.nvec).astype(np.int64)


def record(
    env_id: str, kwargs: dict, num_envs: int, steps: int, threads: int = RECORDED_THREADS
) -> dict[str, np.ndarray]:
    """Observations, rewards, end flags and texts of ``steps`` random-action steps from seed 11,
    with ``threads`` torch threads."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        return _record(env_id, kwargs, num_envs, steps)
    finally:
        torch.set_num_threads(before)


def _record(env_id: str, kwargs: dict, num_envs: int, steps: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(5)
    obs_list, rewards, ends, texts = [], [], [], []
    if num_envs:
        envs = gym.make_vec(
            env_id, num_envs=num_envs, text_infos=True, autoreset_mode="SameStep", **kwargs
        )
        obs, infos = envs.reset(seed=11)
        obs_list.append(obs)
        texts += list(infos["text"])
        for _ in range(steps):
            space = envs.single_action_space
            actions = np.stack([np.asarray(_single_actions(space, rng)) for _ in range(num_envs)])
            obs, reward, terminated, truncated, infos = envs.step(actions)
            obs_list.append(obs)
            rewards.append(reward)
            ends.append(np.stack([terminated, truncated], -1))
            texts += list(infos["text"])
            if "final_info" in infos:
                texts += [
                    str(t) for t, m in zip(infos["final_info"]["text"], infos["_final_info"]) if m
                ]
    else:
        env = gym.make(env_id, **kwargs)
        obs, info = env.reset(seed=11)
        obs_list.append(obs)
        texts.append(info["text"])
        for _ in range(steps):
            obs, reward, terminated, truncated, info = env.step(
                _single_actions(env.action_space, rng)
            )
            obs_list.append(obs)
            rewards.append(reward)
            ends.append([terminated, truncated])
            texts.append(info["text"])
            if terminated or truncated:
                obs, info = env.reset()
                obs_list.append(obs)
                texts.append(info["text"])
    return {
        "obs": np.stack(obs_list).astype(np.float32),
        "rewards": np.asarray(rewards, dtype=np.float64),
        "ends": np.asarray(ends, dtype=bool),
        "texts": np.asarray(texts, dtype=str),
    }


@pytest.fixture(scope="module")
def pinned() -> dict[str, np.ndarray]:
    with np.load(PINNED, allow_pickle=False) as data:
        return dict(data)


@pytest.mark.parametrize("name,env_id,kwargs,num_envs,steps", CASES, ids=[c[0] for c in CASES])
def test_trajectory_is_the_pinned_one(pinned, name, env_id, kwargs, num_envs, steps):
    assert_is_pinned(record(env_id, kwargs, num_envs, steps), pinned, name)


def assert_is_pinned(got: dict[str, np.ndarray], pinned: dict[str, np.ndarray], name: str):
    """Rewards, ends and texts bit for bit, observations within ``OBS_ATOL``."""
    for key, value in got.items():
        expected = pinned[f"{name}/{key}"]
        assert value.shape == expected.shape, (name, key)
        if key == "texts":
            assert value.tolist() == expected.tolist(), name
        elif key == "obs":
            np.testing.assert_allclose(value, expected, rtol=0, atol=OBS_ATOL, err_msg=name)
        else:
            np.testing.assert_array_equal(value, expected, err_msg=f"{name}/{key}")


@pytest.mark.parametrize("case", [CASES[0], CASES[-1]], ids=[CASES[0][0], CASES[-1][0]])
def test_one_thread_keeps_rewards_and_texts_and_moves_observations_within_1e_5(pinned, case):
    """What the README promises across thread counts, on a single env and a batched edit env."""
    name, env_id, kwargs, num_envs, steps = case
    assert_is_pinned(record(env_id, kwargs, num_envs, steps, threads=1), pinned, name)


def test_every_registered_id_is_pinned():
    assert {c[1] for c in CASES} >= set(textenvs.ENV_IDS)


if (
    __name__ == "__main__"
):  # re-record: only when an env's semantics change on purpose (and its id's version)
    if not {"--write", "--add-new"} & set(sys.argv):
        raise SystemExit(
            "python -m tests.test_pinned_trajectories --write  re-records the pinned file;\n"
            "python -m tests.test_pinned_trajectories --add-new  records only the cases it lacks"
        )
    arrays = {}
    if "--add-new" in sys.argv:  # keep every recorded case as it is
        with np.load(PINNED, allow_pickle=False) as data:
            arrays = dict(data)
    for name, env_id, kwargs, num_envs, steps in CASES:
        if f"{name}/obs" in arrays:
            continue
        for key, value in record(env_id, kwargs, num_envs, steps).items():
            arrays[f"{name}/{key}"] = value
    PINNED.parent.mkdir(exist_ok=True)
    np.savez_compressed(PINNED, **arrays)
    print(f"wrote {PINNED} ({PINNED.stat().st_size} bytes, {len(CASES)} cases)")
