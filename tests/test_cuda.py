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


def test_cuda_context_observation_and_last_block_policy():
    """obs="context" on the GPU equals the CPU's; SB3 PPO (on the GPU) with LastBlockPolicy starts
    at the LM and trains a rollout with its KL penalty."""
    from agents import sb3

    kwargs = {"token_mode": "topk", "k": 4, "max_steps": 3, "context_positions": 64}
    kwargs.update(sb3.policy_env_kwargs("last_block", "textenvs/Translate-v0"))
    cpu = gym.make("textenvs/Translate-v0", **kwargs)
    gpu = gym.make("textenvs/Translate-v0", device="cuda", **kwargs)
    np.testing.assert_allclose(cpu.reset(seed=0)[0], gpu.reset(seed=0)[0], atol=2e-3)
    for _ in range(2):
        np.testing.assert_allclose(cpu.step(0)[0], gpu.step(0)[0], atol=2e-3)
    config = sb3.SB3Config(policy="last_block", num_envs=2, n_steps=8, batch_size=8, n_epochs=1)
    config.kl_coef, config.policy_kwargs = 0.05, {"prior_temperature": 0.5}
    model = sb3.build("textenvs/Translate-v0", config, device="cuda", **kwargs)
    assert model.device.type == "cuda"
    obs, _ = gpu.reset(seed=1)
    dist = model.policy.get_distribution(torch.as_tensor(obs[None], device="cuda"))
    expected = torch.softmax(torch.as_tensor(gpu.unwrapped.action_logprobs()) / 0.5, -1)
    torch.testing.assert_close(dist.distribution.probs[0].cpu(), expected, atol=1e-4, rtol=0)
    model.learn(16, callback=sb3.train_callbacks(config))
