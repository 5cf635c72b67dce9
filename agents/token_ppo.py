"""Token-level PPO whose policy is the language model itself (RL4LMs / TRL style, through textenvs).

Read top to bottom: the config, the math (small pure functions), the rollout, the update, the
training loop with checkpoints and logging, the CLI.

* Policy: the causal LM; an action is a token sampled from the LM's own next-token logits. The
  rollout runs through the batched generation env (``gym.make_vec``, ``token_mode="vocab"``) whose
  model IS the policy: each generated token costs the env's one incremental forward, whose logits
  we sample from and whose observation (the final hidden state) the value head reads. No second
  computation of the same hidden state.
* Value head: one linear layer on the policy's final hidden state (one trunk, no third model).
* Reference: a frozen copy of the starting LM; its log-probs of the generated tokens come from ONE
  full-sequence forward per rollout batch. The per-token reward is the env's (dense metric) reward
  minus ``kl_coef * (log pi - log pi_ref)`` (Ziegler et al. 2019), with a fixed or adaptive
  coefficient (their proportional controller).
* Update: token-level GAE, masked advantage whitening, clipped policy loss, clipped value loss,
  entropy bonus, gradient clipping, several epochs over shuffled minibatches of episodes, a linear
  learning-rate schedule. Log-probs are recomputed once per minibatch in one full-sequence pass.

Run ``python -m agents.token_ppo --env-id textenvs/Summarize-v0 --total-episodes 4096``.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path

import gymnasium as gym
import numpy as np
import torch
from tqdm import tqdm

import textenvs  # noqa: F401  (registers the ids)
from agents.checkpoint import read_json_object, recover, save_atomically
from agents.common import evaluate_policy
from textenvs.lm import LanguageModel


@dataclass
class TokenPPOConfig:
    """Hyper-parameters of token-level PPO."""

    env_id: str = "textenvs/Summarize-v0"
    """A generation env id (its action space must be the vocabulary)."""
    model: str = "textenvs/tiny"
    """The starting policy: ``textenvs/tiny``, a ``save_pretrained`` folder or a hub name."""
    reward: str | None = None
    """The env's reward metric (None: the task's default)."""
    dense: bool = True
    """Dense rewards (the metric's change every token) or the metric once at the end."""
    num_envs: int = 32
    """Episodes per rollout: sub-envs of the batched env, one episode each."""
    max_new_tokens: int = 16
    """Tokens per episode at most."""
    total_episodes: int = 4096
    """Training budget in episodes (completions)."""
    learning_rate: float = 3e-4
    """Adam learning rate at the start; annealed linearly to 0 when ``anneal_lr``."""
    anneal_lr: bool = True
    """Linear learning-rate decay over the run."""
    num_epochs: int = 4
    """PPO epochs over each rollout."""
    minibatch_size: int = 16
    """Episodes per minibatch."""
    clip_range: float = 0.2
    """PPO ratio clip epsilon."""
    clip_range_value: float = 0.2
    """Value clip: the new value stays within this of the rollout value."""
    vf_coef: float = 0.5
    """Weight of the value loss."""
    ent_coef: float = 0.0
    """Weight of the entropy bonus."""
    max_grad_norm: float = 1.0
    """Gradient-norm clip."""
    gamma: float = 1.0
    """Discount per token."""
    gae_lambda: float = 0.95
    """GAE lambda."""
    kl_coef: float = 0.02
    """Initial coefficient of the per-token KL penalty to the reference."""
    adaptive_kl: bool = False
    """Adapt ``kl_coef`` towards ``kl_target`` (Ziegler et al. 2019)."""
    kl_target: float = 2.0
    """Target KL per episode (nats) for the adaptive controller."""
    kl_horizon: int = 10_000
    """Horizon (episodes) of the adaptive controller."""
    whiten_advantages: bool = True
    """Masked whitening of advantages over the rollout's tokens."""
    temperature: float = 1.0
    """Sampling temperature of the rollout (1.0 samples the LM's own distribution)."""
    seed: int = 0
    """Seeds the env resets, the sampling and the minibatch order of every iteration."""
    device: str = "cpu"
    """Torch device."""
    eval_samples: int = 200
    """Test-split samples of the greedy evaluation before and after training."""
    eval_reward: str | None = None
    """Metric of the greedy evaluation (None: the training reward), e.g. train on chrF, report BLEU.
    """
    checkpoint_dir: str | None = None
    """Where checkpoints go (None: no checkpoints)."""
    save_every: int = 0
    """Checkpoint every this many iterations (0: only at the end)."""
    tensorboard_log: str | None = None
    """TensorBoard log folder (None: no logging)."""

    def validate(self) -> None:
        for name in (
            "num_envs",
            "max_new_tokens",
            "total_episodes",
            "num_epochs",
            "minibatch_size",
        ):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}.")
        for name in ("learning_rate", "clip_range", "temperature"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}.")
        if self.kl_coef < 0:
            raise ValueError(f"kl_coef must be >= 0, got {self.kl_coef}.")


# ---------------------------------------------------------------------------------------------
# The math: small pure functions, each tested against a hand-computed case
# ---------------------------------------------------------------------------------------------


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return (x * mask).sum() / mask.sum().clamp(min=1)


def masked_var(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Unbiased variance over the masked entries (as TRL's ``masked_var``)."""
    mean = masked_mean(x, mask)
    n = mask.sum()
    var = masked_mean((x - mean) ** 2, mask)
    return var * n / (n - 1).clamp(min=1)


def masked_whiten(x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True) -> torch.Tensor:
    """``(x - mean) / std`` over the masked entries; the mean is added back when ``shift_mean`` is
    False.
    """
    mean, var = masked_mean(x, mask), masked_var(x, mask)
    out = (x - mean) * torch.rsqrt(var + 1e-8)
    return out if shift_mean else out + mean


def gae(
    rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float, lam: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation per token (Schulman et al. 2016).

    Args:
        rewards, values, mask: ``(B, T)``; ``mask`` is 1 on the episode's tokens, which are a prefix
            of each row. The state after the last token is terminal (value 0).

    Returns:
        advantages and returns (advantages + values), ``(B, T)``, zero where ``mask`` is 0.
    """
    B, T = rewards.shape
    advantages = torch.zeros_like(rewards)
    last = torch.zeros(B, dtype=rewards.dtype, device=rewards.device)
    for t in reversed(range(T)):
        next_value = values[:, t + 1] * mask[:, t + 1] if t + 1 < T else torch.zeros_like(last)
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        last = (delta + gamma * lam * last * (mask[:, t + 1] if t + 1 < T else 0)) * mask[:, t]
        advantages[:, t] = last
    return advantages, (advantages + values) * mask


def kl_k1(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """``log pi - log pi_ref`` of the sampled token: unbiased, can be negative (Schulman's k1)."""
    return logp - ref_logp


def clipped_policy_loss(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    clip: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """PPO's clipped surrogate (to minimise) and the fraction of tokens where the clip is active."""
    ratio = torch.exp(logp - old_logp)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1 - clip, 1 + clip)
    loss = masked_mean(torch.maximum(unclipped, clipped), mask)
    clipfrac = masked_mean((clipped > unclipped).float(), mask)
    return loss, clipfrac


def clipped_value_loss(
    values: torch.Tensor,
    old_values: torch.Tensor,
    returns: torch.Tensor,
    mask: torch.Tensor,
    clip: float,
) -> torch.Tensor:
    """``0.5 * max((v - R)^2, (clip(v, v_old +- c) - R)^2)`` averaged over the mask."""
    clipped = old_values + torch.clamp(values - old_values, -clip, clip)
    return 0.5 * masked_mean(torch.maximum((values - returns) ** 2, (clipped - returns) ** 2), mask)


def explained_variance(predicted: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> float:
    var = masked_var(target, mask)
    return float("nan") if var == 0 else float(1 - masked_var(target - predicted, mask) / var)


class AdaptiveKLController:
    """Ziegler et al. (2019): ``beta *= 1 + clip(KL / target - 1, -0.2, 0.2) * n / horizon``."""

    def __init__(self, init: float, target: float, horizon: int) -> None:
        self.value, self.target, self.horizon = init, target, horizon

    def update(self, kl: float, n_episodes: int) -> None:
        error = float(np.clip(kl / self.target - 1, -0.2, 0.2))
        self.value *= 1 + error * n_episodes / self.horizon


# ---------------------------------------------------------------------------------------------
# Rollout: whole episodes through the batched env, sampling from the env's own forward
# ---------------------------------------------------------------------------------------------


@dataclass
class Rollout:
    """One batch of episodes, right-padded to ``T`` generated tokens."""

    prompts: list[list[int]]
    tokens: torch.Tensor  # (B, T) generated token ids (pad = eos)
    mask: torch.Tensor  # (B, T) 1 on generated tokens
    logprobs: torch.Tensor  # (B, T) log pi_old of each token, from the env's forward
    values: torch.Tensor  # (B, T) V(state before the token)
    env_rewards: torch.Tensor  # (B, T)
    metrics: list[float]  # the task metric of each episode
    texts: list[str]


@torch.no_grad()
def collect_rollout(
    envs, value_head: torch.nn.Module, config: TokenPPOConfig, iteration: int
) -> Rollout:
    """One episode per sub-env. Finished sub-envs auto-reset and keep stepping; those steps are
    dropped.
    """
    n, T = envs.num_envs, config.max_new_tokens
    obs, infos = envs.reset(seed=config.seed * 1_000_003 + iteration * n)
    lm = envs.unwrapped.lm
    prompts = [lm.encode(p) for p in infos["prompt"]]  # encoded as the env encodes them
    gen = torch.Generator(device="cpu").manual_seed(config.seed * 7919 + iteration)
    tokens = torch.full((n, T), lm.eos_token_id, dtype=torch.long)
    mask, logprobs, values, rewards = (torch.zeros(n, T) for _ in range(4))
    active = np.ones(n, dtype=bool)
    metrics, texts = [0.0] * n, [""] * n
    device = next(value_head.parameters()).device
    for t in range(T):
        logits = envs.unwrapped.logits.float() / config.temperature  # (N, V): the env's own forward
        logp_all = torch.log_softmax(logits, dim=-1).cpu()
        action = torch.multinomial(logp_all.exp(), 1, generator=gen)[:, 0]  # (N,)
        value = value_head(torch.as_tensor(obs, device=device)).squeeze(-1).cpu()
        obs, reward, terminated, truncated, infos = envs.step(action.numpy())
        for i in np.flatnonzero(active):
            tokens[i, t], mask[i, t] = action[i], 1.0
            logprobs[i, t], values[i, t], rewards[i, t] = (
                logp_all[i, action[i]],
                value[i],
                float(reward[i]),
            )
            if terminated[i] or truncated[i]:
                active[i] = False
                final = infos["final_info"]
                metrics[i] = float(final["metric"][i])
                texts[i] = str(final["text"][i])
        if not active.any():
            break
    return Rollout(prompts, tokens, mask, logprobs, values, rewards, metrics, texts)


# ---------------------------------------------------------------------------------------------
# Full-sequence passes: reference log-probs, and the policy's log-probs / values / entropy
# ---------------------------------------------------------------------------------------------


def batch_sequences(prompts: list[list[int]], tokens: torch.Tensor, mask: torch.Tensor, pad: int):
    """Right-padded ``prompt + generated`` ids, attention mask and the index of each token's logits.

    Returns ids ``(B, L)``, attention ``(B, L)`` and ``positions`` ``(B, T)``: the sequence index
    whose output predicts generated token ``t`` (``len(prompt) + t - 1``).
    """
    B, T = tokens.shape
    lengths = [len(p) + int(m.sum()) for p, m in zip(prompts, mask)]
    L = max(lengths)
    ids = torch.full((B, L), pad, dtype=torch.long)
    attention = torch.zeros(B, L, dtype=torch.long)
    positions = torch.zeros(B, T, dtype=torch.long)
    for b, p in enumerate(prompts):
        n = int(mask[b].sum())
        ids[b, : len(p)] = torch.tensor(p)
        ids[b, len(p) : len(p) + n] = tokens[b, :n]
        attention[b, : len(p) + n] = 1
        positions[b] = len(p) - 1 + torch.arange(T).clamp(max=max(n - 1, 0))
    return ids, attention, positions


def sequence_outputs(
    model, ids, attention, positions, tokens, temperature: float, with_hidden: bool
):
    """Log-probs of ``tokens`` ``(B, T)``, entropy ``(B, T)``, final hidden states ``(B, T, d)``."""
    out = model(input_ids=ids, attention_mask=attention, output_hidden_states=with_hidden)
    index = positions[..., None]
    logits = (
        torch.gather(out.logits, 1, index.expand(-1, -1, out.logits.shape[-1])).float()
        / temperature
    )
    logp_all = torch.log_softmax(logits, dim=-1)
    logp = torch.gather(logp_all, 2, tokens[..., None]).squeeze(-1)
    entropy = -(logp_all.exp() * logp_all).sum(-1)
    hidden = None
    if with_hidden:
        h = out.hidden_states[-1]
        hidden = torch.gather(h, 1, index.expand(-1, -1, h.shape[-1])).float()
    return logp, entropy, hidden


@torch.no_grad()
def greedy_metric(
    lm: LanguageModel | str,
    env_id: str,
    split: str = "test",
    max_samples: int = 200,
    max_new_tokens: int = 16,
    reward: str | None = None,
) -> float:
    """Mean task metric of greedy decoding (top-1 actions) over the first ``max_samples`` of a
    split.
    """
    env = gym.make(
        env_id,
        model=lm,
        split=split,
        token_mode="topk",
        k=1,
        max_steps=max_new_tokens,
        **({"reward": reward} if reward else {}),
    )
    return evaluate_policy(env, lambda obs, mask: 0, max_samples=max_samples)["mean_metric"]


# ---------------------------------------------------------------------------------------------
# The trainer
# ---------------------------------------------------------------------------------------------


class TokenPPO:
    """Token-level PPO on a textenvs generation env; the policy is ``self.lm`` itself."""

    def __init__(self, config: TokenPPOConfig) -> None:
        config.validate()
        self.config = config
        torch.manual_seed(config.seed)
        self.lm = LanguageModel(
            config.model, device=config.device
        )  # our own copy: it will be trained
        self.model = self.lm.model
        self.reference = copy.deepcopy(self.model).eval().requires_grad_(False)
        self.model.requires_grad_(True)
        self.model.eval()  # no dropout: rollout and update must score tokens alike
        self.value_head = torch.nn.Linear(self.lm.hidden_size, 1).to(self.lm.device)
        torch.nn.init.zeros_(self.value_head.weight)
        torch.nn.init.zeros_(self.value_head.bias)
        env_kwargs = {
            "model": self.lm,
            "token_mode": "vocab",
            "max_steps": config.max_new_tokens,
            "device": config.device,
            "dense": config.dense,
            "text_infos": True,  # the completions' texts, for logs and samples
        }
        if config.reward is not None:
            env_kwargs["reward"] = config.reward
        try:
            self.envs = gym.make_vec(config.env_id, num_envs=config.num_envs, **env_kwargs)
        except TypeError as e:  # an env that takes no token_mode / max_steps: not a textenvs env
            raise ValueError(
                "Token PPO needs a generation env whose actions are the vocabulary; "
                f"{config.env_id} is not one ({e}). Use textenvs/Summarize-v0, Translate-v0 or "
                "Generate-v0."
            ) from e
        space = self.envs.single_action_space
        if not (isinstance(space, gym.spaces.Discrete) and space.n == self.lm.vocab_size):
            raise ValueError(
                "Token PPO needs an env whose action space is the vocabulary "
                f"(Discrete({self.lm.vocab_size})), got {space} from {config.env_id}: use a "
                "generation env (textenvs/Summarize-v0, Translate-v0, Generate-v0)."
            )
        if not hasattr(type(self.envs.unwrapped), "logits"):
            raise ValueError(
                f"{config.env_id} does not expose next-token logits: use a textenvs generation env."
            )
        params = list(self.model.parameters()) + list(self.value_head.parameters())
        self.optimizer = torch.optim.Adam(params, lr=config.learning_rate, eps=1e-5)
        self.kl = AdaptiveKLController(config.kl_coef, config.kl_target, config.kl_horizon)
        self.iteration = 0
        self.history: list[dict] = []
        self.writer = None
        if config.tensorboard_log:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(config.tensorboard_log)

    @property
    def iterations(self) -> int:
        return math.ceil(self.config.total_episodes / self.config.num_envs)

    def update(self, rollout: Rollout) -> dict:
        """KL-penalised rewards, GAE, then PPO epochs over shuffled minibatches of episodes."""
        c, device = self.config, self.lm.device
        pad = self.lm.eos_token_id
        ids, attention, positions = batch_sequences(
            rollout.prompts, rollout.tokens, rollout.mask, pad
        )
        ids, attention, positions = ids.to(device), attention.to(device), positions.to(device)
        tokens, mask = rollout.tokens.to(device), rollout.mask.to(device)
        old_logp, old_values = rollout.logprobs.to(device), rollout.values.to(device)
        with torch.no_grad():
            ref_logp, _, _ = sequence_outputs(
                self.reference, ids, attention, positions, tokens, c.temperature, False
            )
            kl = kl_k1(old_logp, ref_logp) * mask  # (B, T)
            rewards = rollout.env_rewards.to(device) - self.kl.value * kl
            advantages, returns = gae(rewards, old_values, mask, c.gamma, c.gae_lambda)
            if c.whiten_advantages:
                advantages = masked_whiten(advantages, mask) * mask
        if c.anneal_lr:
            for g in self.optimizer.param_groups:
                g["lr"] = c.learning_rate * (1 - self.iteration / self.iterations)
        rng = np.random.default_rng(c.seed * 1_000_003 + self.iteration)
        stats = {k: [] for k in ("policy_loss", "value_loss", "entropy", "clipfrac", "approx_kl")}
        B = tokens.shape[0]
        for epoch in range(c.num_epochs):
            order = rng.permutation(B)
            for start in range(0, B, c.minibatch_size):
                mb = torch.as_tensor(order[start : start + c.minibatch_size], device=device)
                logp, entropy, hidden = sequence_outputs(
                    self.model,
                    ids[mb],
                    attention[mb],
                    positions[mb],
                    tokens[mb],
                    c.temperature,
                    True,
                )
                values = self.value_head(hidden).squeeze(-1)
                m = mask[mb]
                pg_loss, clipfrac = clipped_policy_loss(
                    logp, old_logp[mb], advantages[mb], m, c.clip_range
                )
                v_loss = clipped_value_loss(
                    values, old_values[mb], returns[mb], m, c.clip_range_value
                )
                ent = masked_mean(entropy, m)
                loss = pg_loss + c.vf_coef * v_loss - c.ent_coef * ent
                if not torch.isfinite(loss):
                    raise FloatingPointError(
                        f"Non-finite loss ({loss.item()}) at iteration {self.iteration}, epoch "
                        f"{epoch}, minibatch {start // c.minibatch_size}: training stopped. The "
                        f"last good checkpoint ({c.checkpoint_dir or 'none configured'}) is "
                        "intact; lower learning_rate or check the reward."
                    )
                self.optimizer.zero_grad()
                loss.backward()
                torch.nn.utils.clip_grad_norm_(
                    list(self.model.parameters()) + list(self.value_head.parameters()),
                    c.max_grad_norm,
                )
                self.optimizer.step()
                with torch.no_grad():
                    stats["policy_loss"].append(pg_loss.item())
                    stats["value_loss"].append(v_loss.item())
                    stats["entropy"].append(ent.item())
                    stats["clipfrac"].append(clipfrac.item())
                    stats["approx_kl"].append(masked_mean(old_logp[mb] - logp, m).item())
        episode_kl = float((kl.sum(1)).mean())
        if c.adaptive_kl:
            self.kl.update(episode_kl, B)
        out = {k: float(np.mean(v)) for k, v in stats.items()}
        out.update(
            kl=episode_kl,
            kl_coef=self.kl.value,
            explained_variance=explained_variance(old_values, returns, mask),
            reward=float((rollout.env_rewards.sum(1)).mean()),
            metric=float(np.mean(rollout.metrics)),
            lr=self.optimizer.param_groups[0]["lr"],
        )
        return out

    def train(self, progress: bool = True, stop_after: int | None = None) -> list[dict]:
        """Run the remaining iterations (all of them, or those left after :meth:`load_checkpoint`).

        ``stop_after`` ends the call after that many iterations (the run can be resumed later).
        """
        c = self.config
        last = (
            self.iterations
            if stop_after is None
            else min(self.iterations, self.iteration + stop_after)
        )
        bar = tqdm(
            total=self.iterations * c.num_envs,
            initial=self.iteration * c.num_envs,
            disable=not progress,
            desc="token-ppo episodes",
        )
        while self.iteration < last:
            start = time.time()
            rollout = collect_rollout(self.envs, self.value_head, c, self.iteration)
            rollout_s = time.time() - start
            stats = self.update(rollout)
            stats.update(
                iteration=self.iteration,
                episodes=(self.iteration + 1) * c.num_envs,
                tokens=int(rollout.mask.sum()),
                completions_per_s=c.num_envs / rollout_s,
                iteration_s=time.time() - start,
            )
            self.history.append(stats)
            if self.writer is not None:
                for key, value in stats.items():
                    self.writer.add_scalar(f"token_ppo/{key}", value, stats["episodes"])
            self.iteration += 1
            bar.update(c.num_envs)
            bar.set_postfix(metric=f"{stats['metric']:.3f}", kl=f"{stats['kl']:.2f}")
            if c.checkpoint_dir and c.save_every and self.iteration % c.save_every == 0:
                self.save_checkpoint(c.checkpoint_dir)
        bar.close()
        if c.checkpoint_dir:
            self.save_checkpoint(c.checkpoint_dir)
        return self.history

    # -- evaluation ------------------------------------------------------------------------
    def evaluate(self, split: str = "test", max_samples: int | None = None) -> float:
        """Mean task metric of greedy decoding over the split (the same env, task and reward)."""
        return greedy_metric(
            self.lm,
            self.config.env_id,
            split,
            max_samples or self.config.eval_samples,
            self.config.max_new_tokens,
            self.config.eval_reward or self.config.reward,
        )

    # -- checkpoints -------------------------------------------------------------------------
    def save_checkpoint(self, folder: str | os.PathLike) -> Path:
        """``save_pretrained`` of the policy, the value head (safetensors) and the trainer state.

        Crash-consistent (:func:`agents.checkpoint.save_atomically`): a process killed at any
        instant of the save leaves the previous or the new checkpoint complete and loadable.
        """
        from safetensors.torch import save_file

        def write(tmp: Path) -> None:
            self.model.save_pretrained(tmp, safe_serialization=True)
            self.lm.tokenizer.save_pretrained(tmp)
            save_file(
                {k: v.contiguous() for k, v in self.value_head.state_dict().items()},
                tmp / "value_head.safetensors",
            )
            torch.save(self.optimizer.state_dict(), tmp / "optimizer.pt")
            torch.save(self.reference.state_dict(), tmp / "reference.pt")
            state = {
                "iteration": self.iteration,
                "kl_coef": self.kl.value,
                "config": dataclasses.asdict(self.config),
                "model_signature": self._signature(),
                "history": self.history,
            }
            (tmp / "trainer_state.json").write_text(json.dumps(state))

        return save_atomically(folder, write)

    def load_checkpoint(self, folder: str | os.PathLike) -> None:
        """Resume from :meth:`save_checkpoint`: same results as an uninterrupted run for the same
        seed.

        All or nothing: every file is read and checked against this trainer first (fields,
        tensor names and shapes, the optimizer's parameter groups), and only then is anything
        replaced; a damaged checkpoint raises ``ValueError`` naming the file and leaves the
        trainer as it was.
        """
        from safetensors.torch import load_file
        from transformers import AutoModelForCausalLM

        # An interrupted save leaves a complete checkpoint behind: put it in place first.
        if recover(folder) is None:
            raise FileNotFoundError(
                f"No checkpoint in {folder}: train with --checkpoint-dir first."
            )
        folder = Path(folder)
        state = self._read_trainer_state(folder / "trainer_state.json")

        def read(name: str, loader):
            try:
                return loader(folder / name)
            except Exception as e:  # any damage: a missing, truncated or foreign file
                raise ValueError(
                    f"{folder / name}: cannot be read as part of a checkpoint ({type(e).__name__}: "
                    f"{e}); the trainer was left unchanged. Resume from an intact checkpoint."
                ) from e

        device = self.lm.device
        trained = read(
            "model.safetensors",
            lambda p: AutoModelForCausalLM.from_pretrained(
                p.parent, use_safetensors=True, trust_remote_code=False
            ).state_dict(),
        )
        value = read("value_head.safetensors", lambda p: load_file(p, device=str(device)))
        optimizer = read(
            "optimizer.pt", lambda p: torch.load(p, weights_only=True, map_location=device)
        )
        reference = read(
            "reference.pt", lambda p: torch.load(p, weights_only=True, map_location=device)
        )
        for name, loaded, module in (
            ("model.safetensors", trained, self.model),
            ("value_head.safetensors", value, self.value_head),
            ("reference.pt", reference, self.reference),
        ):
            _check_state_dict(folder / name, loaded, module.state_dict())
        scratch = torch.optim.Adam(
            [torch.zeros_like(p) for group in self.optimizer.param_groups for p in group["params"]]
        )
        read("optimizer.pt", lambda p: scratch.load_state_dict(optimizer))  # checks the groups
        # Everything is readable and fits: now replace, in an order that cannot fail half-way.
        self.model.load_state_dict(trained)
        self.value_head.load_state_dict(value)
        self.optimizer.load_state_dict(optimizer)
        self.reference.load_state_dict(reference)
        self.iteration, self.kl.value, self.history = (
            state["iteration"],
            state["kl_coef"],
            state["history"],
        )

    def _read_trainer_state(self, path: Path) -> dict:
        """``trainer_state.json``, every field checked; an error names the field and the file."""
        state = read_json_object(path, "trainer state")
        checks = {
            "iteration": lambda v: type(v) is int and 0 <= v <= self.iterations,
            "kl_coef": lambda v: type(v) in (int, float) and math.isfinite(v) and v >= 0,
            "history": lambda v: isinstance(v, list) and all(isinstance(h, dict) for h in v),
            "config": lambda v: isinstance(v, dict),
            "model_signature": lambda v: isinstance(v, dict),
        }
        expected = {
            "iteration": f"an int in [0, {self.iterations}] (this run's iterations)",
            "kl_coef": "a finite number >= 0",
            "history": "a list of objects",
            "config": "an object",
            "model_signature": "an object",
        }
        for field, ok in checks.items():
            if field not in state:
                raise ValueError(f"{path}: field {field!r} is missing.")
            if not ok(state[field]):
                raise ValueError(
                    f"{path}: field {field!r} is {state[field]!r}; expected {expected[field]}."
                )
        if state["model_signature"] != self._signature():
            raise ValueError(
                f"The checkpoint in {path.parent} is for another model "
                f"({state['model_signature']}), not {self._signature()}: resume with the same "
                "--model it was trained from."
            )
        return state

    def _signature(self) -> dict:
        cfg = self.model.config
        return {
            "model_type": cfg.model_type,
            "vocab_size": self.lm.vocab_size,
            "hidden_size": self.lm.hidden_size,
            "num_hidden_layers": self.lm.n_layers,
        }


def _check_state_dict(path: Path, loaded: dict, expected: dict) -> None:
    """A loaded state dict has exactly the expected tensor names and shapes, else ValueError."""
    missing, extra = sorted(set(expected) - set(loaded)), sorted(set(loaded) - set(expected))
    shapes = [
        k for k in set(expected) & set(loaded) if tuple(loaded[k].shape) != tuple(expected[k].shape)
    ]
    if missing or extra or shapes:
        raise ValueError(
            f"{path}: does not fit this trainer (missing {missing[:3]}, unexpected {extra[:3]}, "
            f"other shapes {sorted(shapes)[:3]}); the trainer was left unchanged."
        )


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description="Token-level PPO: the language model is the policy.")
    defaults = TokenPPOConfig()
    for f in dataclasses.fields(TokenPPOConfig):
        flag = "--" + f.name.replace("_", "-")
        value = getattr(defaults, f.name)
        if isinstance(value, bool):
            p.add_argument(flag, type=lambda s: s.lower() in ("1", "true", "yes"), default=value)
        else:
            p.add_argument(flag, type=type(value) if value is not None else str, default=value)
    p.add_argument("--resume", help="a checkpoint folder to resume from")
    p.add_argument("--json-out", help="write the final report (JSON) here")
    args = vars(p.parse_args(argv))
    resume, json_out = args.pop("resume"), args.pop("json_out")
    trainer = TokenPPO(TokenPPOConfig(**args))
    if resume:
        trainer.load_checkpoint(resume)
    before = trainer.evaluate() if not resume else None
    start = time.time()
    history = trainer.train()
    report = {
        "env_id": trainer.config.env_id,
        "test_metric_before": before,
        "test_metric_after": trainer.evaluate(),
        "episodes": trainer.iteration * trainer.config.num_envs,
        "train_seconds": round(time.time() - start, 1),
        "final_kl": history[-1]["kl"] if history else None,
        "max_kl": max(h["kl"] for h in history) if history else None,
        "completions_per_s": float(np.mean([h["completions_per_s"] for h in history]))
        if history
        else None,
    }
    print(json.dumps(report))
    if json_out:
        Path(json_out).write_text(json.dumps({**report, "history": history}, indent=1))
    return report


if __name__ == "__main__":
    main()
