"""SB3 PPO whose actor is a trainable copy of the LM's last block (a research script).

The LM-prior policy of :mod:`agents.lm_prior` corrects a frozen LM from its final hidden state, and
on Translate it stays level with greedy within 50k steps. Token PPO beats greedy there, and most of
its gain survives when only the last block is trained (README). This script puts that block inside
stock ``stable_baselines3.PPO``:

* :class:`ContextObservation` wraps a top-k generation env made with ``candidates_obs=True``: the
  observation is the layer ``L - 1`` hidden states of every position of ``prompt + text`` (the
  input of the last block, zero-padded to ``positions``), their count, the k candidates' token ids
  and their LM log-probabilities. It reads only documented attributes (``sequence.ids``,
  ``candidates``, ``lm``) and reruns the first ``L - 1`` blocks over the sequence each step.
* :class:`LastBlockPolicy`: the actor is the last block (trainable), the final norm and the LM
  head rows of the candidates (frozen), at ``temperature``; at the start it samples exactly the
  LM's tempered distribution over the candidates and acts as the greedy LM. The value head reads
  the current position's state and the log-probabilities.
* :class:`KLReward`: token PPO's KL penalty in the reward, ``-kl_coef * (log pi - log p_LM)`` of
  the sampled token, subtracted from the rollout's rewards as they are collected.

``python -m benchmarks.sb3_last_block --seeds 5`` trains on the train split (chrF reward) and
prints JSON: each seed's test BLEU and the paired difference to greedy with its hierarchical
bootstrap CI (as ``benchmarks.run``). About 8 minutes a seed at 49,152 steps on one CPU thread.
"""

from __future__ import annotations

import argparse
import copy
import json
import time

import gymnasium as gym
import numpy as np
import torch as th

import textenvs  # noqa: F401  (registers the ids)
from agents.common import evaluate_policy


class ContextObservation(gym.Wrapper):
    """The last block's whole input as the observation (see the module docstring)."""

    def __init__(self, env: gym.Env, positions: int) -> None:
        super().__init__(env)
        u = env.unwrapped
        if getattr(u, "token_mode", None) != "topk" or not getattr(u, "candidates_obs", False):
            raise ValueError(
                "ContextObservation needs a generation env made with token_mode='topk' and "
                "candidates_obs=True."
            )
        self.k, self.positions, self.d = u.k, positions, u.lm.hidden_size
        size = positions * self.d + 1 + 2 * self.k
        self.observation_space = gym.spaces.Box(-np.inf, np.inf, (size,), np.float32)

    def _context(self, obs: np.ndarray) -> np.ndarray:
        u = self.env.unwrapped
        ids = u.sequence.ids
        if len(ids) > self.positions:
            raise ValueError(
                f"The sequence has {len(ids)} tokens, more than positions={self.positions}: pass "
                "a larger --positions (prompt tokens + max_steps)."
            )
        with th.inference_mode():
            out = u.lm.model(
                input_ids=th.tensor([ids], device=u.lm.device), output_hidden_states=True
            )
            states = out.hidden_states[-2][0].float().cpu().numpy()
        context = np.zeros((self.positions, self.d), np.float32)
        context[: len(ids)] = states
        return np.concatenate(
            [context.ravel(), [len(ids)], u.candidates.astype(np.float32), obs[-self.k :]]
        ).astype(np.float32)

    def reset(self, **kwargs):
        obs, info = self.env.reset(**kwargs)
        return self._context(obs), info

    def step(self, action):
        obs, reward, terminated, truncated, info = self.env.step(action)
        return self._context(obs), reward, terminated, truncated, info


def _split(obs: th.Tensor, positions: int, d: int, k: int):
    """(context (B, P, d), lengths (B,), candidate ids (B, k), LM log-probabilities (B, k))."""
    obs = obs.float()
    context = obs[:, : positions * d].view(-1, positions, d)
    lengths = obs[:, positions * d].long()
    ids = obs[:, positions * d + 1 : positions * d + 1 + k].long()
    return context, lengths, ids, obs[:, -k:]


def make_policy(lm_model, positions: int, k: int, temperature: float):
    """:class:`LastBlockPolicy` bound to an HF GPT-2-layout model (``transformer.h``,
    ``transformer.ln_f``, tied or untied LM head)."""
    from stable_baselines3.common.policies import ActorCriticPolicy
    from stable_baselines3.common.torch_layers import BaseFeaturesExtractor

    d = lm_model.config.hidden_size

    class Current(BaseFeaturesExtractor):
        """The value head's input: the current position's state and the LM log-probabilities."""

        def __init__(self, space) -> None:
            super().__init__(space, d + k)

        def forward(self, obs: th.Tensor) -> th.Tensor:
            context, lengths, _, logprobs = _split(obs, positions, d, k)
            current = context[th.arange(len(obs)), lengths - 1]
            return th.cat([current, logprobs], dim=-1)

    class LastBlockPolicy(ActorCriticPolicy):
        def __init__(self, *args, **kwargs) -> None:
            super().__init__(*args, features_extractor_class=Current, **kwargs)

        def _build_mlp_extractor(self) -> None:
            # before the optimizer is made: the block's parameters are trained
            super()._build_mlp_extractor()
            self.block = copy.deepcopy(lm_model.transformer.h[-1]).float().eval()
            for p in self.block.parameters():
                p.requires_grad_(True)
            self.ln_f = copy.deepcopy(lm_model.transformer.ln_f).float().requires_grad_(False)
            head = lm_model.get_output_embeddings().weight.detach().float().clone()
            self.register_buffer("head", head)
            self.heads = lm_model.config.n_head

        def train(self, mode: bool = True):
            super().train(mode)
            self.block.eval()  # no dropout: the rollout's and the update's policy are one
            return self

        def forward(self, obs, deterministic: bool = False):
            self._obs = obs
            return super().forward(obs, deterministic)

        def evaluate_actions(self, obs, actions):
            self._obs = obs
            return super().evaluate_actions(obs, actions)

        def get_distribution(self, obs):
            self._obs = obs
            return super().get_distribution(obs)

        def _get_action_dist_from_latent(self, latent_pi):
            context, lengths, ids, _ = _split(self._obs, positions, d, k)
            b, rows = self.block, th.arange(len(context))
            q, key, value = b.attn.c_attn(b.ln_1(context)).split(d, dim=-1)
            h, hd = self.heads, d // self.heads
            q = q[rows, lengths - 1].view(-1, h, hd)  # only the current position is needed
            scores = th.einsum("bhd,bphd->bhp", q, key.view(-1, positions, h, hd)) / hd**0.5
            valid = th.arange(positions, device=context.device)[None, :] < lengths[:, None]
            attn = scores.masked_fill(~valid[:, None, :], float("-inf")).softmax(-1)
            mixed = th.einsum("bhp,bphd->bhd", attn, value.view(-1, positions, h, hd))
            y = context[rows, lengths - 1] + b.attn.c_proj(mixed.reshape(-1, d))
            y = self.ln_f(y + b.mlp(b.ln_2(y)))
            logits = th.einsum("bd,bkd->bk", y, self.head[ids]) / temperature
            return self.action_dist.proba_distribution(action_logits=logits)

    return LastBlockPolicy


def kl_reward(kl_coef: float, k: int, temperature: float):
    """An SB3 callback: each collected reward minus ``kl_coef * (log pi(a) - log p_LM,T(a))``."""
    from stable_baselines3.common.callbacks import BaseCallback

    class KLReward(BaseCallback):
        def _on_step(self) -> bool:
            obs = self.locals["obs_tensor"].float()
            actions = th.as_tensor(self.locals["actions"]).long().view(-1)
            prior = th.log_softmax(obs[:, -k:] / temperature, dim=-1)
            prior = prior[th.arange(len(obs)), actions].cpu()
            taken = self.locals["log_probs"].float().cpu()
            self.locals["rewards"] -= (kl_coef * (taken - prior)).numpy()  # in place: the buffer's
            return True

    return KLReward()


def train_and_evaluate(args: argparse.Namespace, seed: int) -> dict:
    from stable_baselines3 import PPO
    from stable_baselines3.common.vec_env import DummyVecEnv, VecMonitor

    from agents.sb3 import deterministic_policy, quiet_logger

    env_kwargs = {
        "token_mode": "topk",
        "k": args.k,
        "max_steps": args.max_steps,
        "candidates_obs": True,
    }

    def make(split: str, reward: str | None):
        return lambda: ContextObservation(
            gym.make(args.env_id, split=split, reward=reward, **env_kwargs), args.positions
        )

    venv = VecMonitor(DummyVecEnv([make("train", args.train_reward)] * args.num_envs))
    policy = make_policy(venv.envs[0].unwrapped.lm.model, args.positions, args.k, args.temperature)
    model = PPO(
        policy,
        venv,
        n_steps=32,
        batch_size=64,
        n_epochs=4,
        learning_rate=args.learning_rate,
        gamma=1.0,
        gae_lambda=args.gae_lambda,
        seed=seed,
        verbose=0,
    )
    quiet_logger(model, None)
    start = time.time()
    model.learn(args.steps, callback=kl_reward(args.kl_coef, args.k, args.temperature))
    test = make(args.split, None)()
    result = evaluate_policy(test, deterministic_policy(model), max_samples=args.eval_samples)
    return {
        "seed": seed,
        "metric": result["mean_metric"],
        "metrics": result["metrics"],
        "seconds": round(time.time() - start, 1),
    }


def main(argv: list[str] | None = None) -> dict:
    from benchmarks.run import hierarchical_bootstrap

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--env-id", default="textenvs/Translate-v0")
    p.add_argument("--seeds", type=int, default=5)
    p.add_argument("--steps", type=int, default=49152, help="env steps of training a seed")
    p.add_argument("--k", type=int, default=8)
    p.add_argument("--max-steps", type=int, default=16)
    p.add_argument("--positions", type=int, default=80, help="prompt tokens + max_steps, at most")
    p.add_argument("--num-envs", type=int, default=8)
    p.add_argument("--learning-rate", type=float, default=1e-4)
    p.add_argument("--gae-lambda", type=float, default=0.5)
    p.add_argument("--temperature", type=float, default=0.5)
    p.add_argument("--kl-coef", type=float, default=0.05)
    p.add_argument("--train-reward", default="chrf")
    p.add_argument("--split", default="test")
    p.add_argument("--eval-samples", type=int, default=None)
    p.add_argument("--out", default=None, help="also write the JSON here")
    args = p.parse_args(argv)
    th.set_num_threads(1)
    greedy = evaluate_policy(
        gym.make(
            args.env_id, split=args.split, token_mode="topk", k=args.k, max_steps=args.max_steps
        ),
        lambda obs, mask: 0,
        max_samples=args.eval_samples,
    )
    runs = [train_and_evaluate(args, seed) for seed in range(args.seeds)]
    diff, low, high = hierarchical_bootstrap(
        [np.asarray(r["metrics"]) - np.asarray(greedy["metrics"]) for r in runs]
    )
    report = {
        "config": vars(args),
        "greedy": greedy["mean_metric"],
        "seeds": [{key: r[key] for key in ("seed", "metric", "seconds")} for r in runs],
        "vs_greedy": {"diff": diff, "ci_low": low, "ci_high": high},
    }
    print(json.dumps(report, indent=1))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(report, f, indent=1)
    return report


if __name__ == "__main__":
    main()
