"""The CUDA paths: the same envs on a GPU give the CPU's results (skipped without a GPU)."""

from __future__ import annotations

import gymnasium as gym
import numpy as np
import pytest
import torch

from textenvs.envs.edit import TextEditEnv
from textenvs.vector import EditVectorEnv, GenerationVectorEnv

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.mark.parametrize("env_id", ["textenvs/Summarize-v0", "textenvs/EditTranslation-v0"])
def test_cuda_env_matches_cpu(env_id):
    cpu, gpu = gym.make(env_id), gym.make(env_id, device="cuda")
    o1, _ = cpu.reset(seed=0)
    o2, _ = gpu.reset(seed=0)
    np.testing.assert_allclose(o1, o2, atol=2e-3)
    rng = np.random.default_rng(0)
    for _ in range(6):
        a = (
            cpu.action_space.sample()
            if isinstance(cpu.action_space, gym.spaces.MultiDiscrete)
            else int(rng.integers(1, 1000))
        )
        r1, r2 = cpu.step(a), gpu.step(a)
        np.testing.assert_allclose(r1[0], r2[0], atol=2e-3)
        assert r1[4]["text"] == r2[4]["text"]
        if r1[2] or r1[3]:
            break


def test_cuda_vector_envs_match_single_envs():
    envs = GenerationVectorEnv(4, task="summarize", max_steps=5, device="cuda")
    singles = [
        gym.make("textenvs/Summarize-v0", max_steps=5, device="cuda").unwrapped for _ in range(4)
    ]
    obs, _ = envs.reset(seed=3)
    for i, env in enumerate(singles):
        env.reset(seed=3 + i)
    for step in range(8):
        actions = np.full(4, 30 + step)
        obs, *_ = envs.step(actions)
        for i, env in enumerate(singles):
            o, _, te, tr, _ = env.step(30 + step)
            if te or tr:
                o, _ = env.reset()
            np.testing.assert_allclose(obs[i], o, atol=1e-3)
    edit = EditVectorEnv(2, task="summarize", max_len=10, max_steps=3, device="cuda")
    edit.reset(seed=0)
    for _ in range(5):
        edit.step(edit.action_space.sample())


def test_cuda_edit_observation_equals_recompute():
    env = TextEditEnv(
        task="summarize", device="cuda", obs="positions", token_mode="vocab", max_len=12
    )
    env.reset(seed=0, options={"text": "Norwick council approves park plan"})
    env.step((0, 2, 500))
    env.step((1, 0, 0))
    _, hidden, _ = env.lm.prefill(env.lm.encode(env.prompt) + env.text_ids)
    rows = hidden[env._prompt_len - 1 :].cpu().numpy()
    np.testing.assert_allclose(env._observe()[: len(rows)], rows, atol=1e-3)
