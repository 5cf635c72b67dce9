"""A CleanRL-style PPO loop (one file, top to bottom, as cleanrl/ppo.py) over a batched textenvs
vector env: an MLP actor-critic on the LM's hidden state picks among the LM's top-k tokens.

    python examples/cleanrl_style.py --iterations 20
"""

import argparse

import gymnasium as gym
import numpy as np
import torch
from torch import nn


def main(argv=None):
    p = argparse.ArgumentParser(
        description=" ".join(__doc__.split("\n\n")[0].split()),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--iterations", type=int, default=20, help="PPO iterations (rollout + update)")
    p.add_argument("--num-envs", type=int, default=8, help="sub-envs of the batched env")
    p.add_argument("--num-steps", type=int, default=16, help="steps per env per rollout")
    p.add_argument("--seed", type=int, default=0, help="seed of the env resets and the policy")
    args = p.parse_args(argv)
    torch.manual_seed(args.seed)

    # SameStep autoreset, as CleanRL's loop expects: the obs after a done is the next episode's
    envs = gym.make_vec(
        "textenvs/Summarize-v0",
        num_envs=args.num_envs,
        token_mode="topk",
        k=4,
        max_steps=8,
        autoreset_mode="SameStep",
    )
    n_actions, d = envs.single_action_space.n, envs.single_observation_space.shape[0]
    actor = nn.Sequential(nn.Linear(d, 64), nn.Tanh(), nn.Linear(64, n_actions))
    critic = nn.Sequential(nn.Linear(d, 64), nn.Tanh(), nn.Linear(64, 1))
    optimizer = torch.optim.Adam([*actor.parameters(), *critic.parameters()], lr=3e-4)
    N, T = args.num_envs, args.num_steps
    obs_buf, act_buf = torch.zeros(T, N, d), torch.zeros(T, N, dtype=torch.long)
    logp_buf, rew_buf, done_buf, val_buf = (torch.zeros(T, N) for _ in range(4))

    next_obs = torch.as_tensor(envs.reset(seed=args.seed)[0])
    next_done = torch.zeros(N)
    for iteration in range(args.iterations):
        metrics = []
        for t in range(T):  # rollout
            obs_buf[t], done_buf[t] = next_obs, next_done
            with torch.no_grad():
                dist = torch.distributions.Categorical(logits=actor(next_obs))
                action = dist.sample()
                logp_buf[t], val_buf[t] = dist.log_prob(action), critic(next_obs)[:, 0]
            act_buf[t] = action
            obs, reward, terminated, truncated, infos = envs.step(action.numpy())
            rew_buf[t] = torch.as_tensor(reward, dtype=torch.float32)
            next_obs = torch.as_tensor(obs)
            next_done = torch.as_tensor(terminated | truncated, dtype=torch.float32)
            if "final_info" in infos:
                final = infos["final_info"]
                metrics += list(final["metric"][final["_metric"]])
        with torch.no_grad():  # GAE (gamma 1, lambda 0.95)
            advantages, last = torch.zeros(T, N), torch.zeros(N)
            next_value = critic(next_obs)[:, 0]
            for t in reversed(range(T)):
                nonterminal = 1.0 - (next_done if t == T - 1 else done_buf[t + 1])
                value_after = next_value if t == T - 1 else val_buf[t + 1]
                delta = rew_buf[t] + nonterminal * value_after - val_buf[t]
                last = delta + 0.95 * nonterminal * last
                advantages[t] = last
            returns = advantages + val_buf
        b_obs, b_act = obs_buf.reshape(-1, d), act_buf.reshape(-1)
        b_logp, b_adv, b_ret = logp_buf.reshape(-1), advantages.reshape(-1), returns.reshape(-1)
        for _ in range(4):  # PPO epochs, one minibatch each
            dist = torch.distributions.Categorical(logits=actor(b_obs))
            ratio = (dist.log_prob(b_act) - b_logp).exp()
            adv = (b_adv - b_adv.mean()) / (b_adv.std() + 1e-8)
            policy_loss = -torch.min(ratio * adv, ratio.clamp(0.8, 1.2) * adv).mean()
            value_loss = 0.5 * (critic(b_obs)[:, 0] - b_ret).pow(2).mean()
            loss = policy_loss + 0.5 * value_loss - 0.01 * dist.entropy().mean()
            optimizer.zero_grad()
            loss.backward()
            nn.utils.clip_grad_norm_([*actor.parameters(), *critic.parameters()], 0.5)
            optimizer.step()
        mean = f"{np.mean(metrics):.4f}" if metrics else "-"
        print(f"iteration {iteration}: {len(metrics)} episodes, mean ROUGE-L {mean}")
    envs.close()


if __name__ == "__main__":
    main()
