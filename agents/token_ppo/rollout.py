"""Rollouts: whole episodes through the batched generation env, sampling each token from the
env's own forward (its logits), the value head reading the env's observation; NLPO's masking
policy stepped beside it."""

from __future__ import annotations

import copy
from dataclasses import dataclass

import gymnasium as gym
import numpy as np
import torch

from agents.token_ppo.config import TokenPPOConfig
from agents.token_ppo.losses import top_p_mask
from textenvs.lm import LanguageModel


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
    action_masks: torch.Tensor | None = None  # (B, T, V) NLPO: the tokens sampling could pick
    # Conversations (dialogue envs): each row's ids after its prompt (the agent's tokens and the
    # other party's turns between them, which are state, never actions), and (B, T) the index in
    # prompt + those ids of the output that predicts agent token t (its position - 1)
    sequences: list[list[int]] | None = None
    positions: torch.Tensor | None = None


def reset_groups(envs, group_size: int, seed: int) -> tuple[np.ndarray, list[str]]:
    """Reset the batched env so that each run of ``group_size`` consecutive sub-envs plays one
    sample (drawn with ``seed``): one reset, every row prefilled in one batched forward.

    Returns the observations ``(N, d)`` and the sub-envs' prompts.
    """
    n = envs.num_envs
    samples = len(envs.unwrapped.envs[0].samples)
    groups = np.random.default_rng(seed).integers(samples, size=n // group_size)
    obs, infos = envs.reset(seed=seed, options={"index": np.repeat(groups, group_size).tolist()})
    return obs, [str(p) for p in infos["prompt"]]


class NLPOMasker:
    """NLPO's masking policy: a frozen copy of the policy, refreshed every ``nlpo_mu`` iterations,
    stepped alongside the env over its own batch cache (one incremental forward per token, as the
    env's), whose top-p nucleus is the set of tokens the rollout may sample.
    """

    def __init__(self, lm: LanguageModel, n: int, top_p: float) -> None:
        # the tokenizer and settings over a frozen copy of the weights (copy.copy would not do: a
        # LanguageModel pickles, and copies, as its name, which is the process's shared model)
        self.lm = lm.with_model(copy.deepcopy(lm.model).eval().requires_grad_(False))
        self.n, self.top_p = n, top_p
        self.logits: torch.Tensor | None = None

    def refresh(self, model: torch.nn.Module) -> None:
        """The masking policy becomes the current policy."""
        self.lm.model.load_state_dict(model.state_dict())

    @torch.no_grad()
    def start(self, prompts: list[list[int]]) -> None:
        """Prefill every row's prompt; ``logits`` then holds each row's next-token logits."""
        from textenvs.batching import LockstepBatch, prefill_batch

        self.batch = LockstepBatch(self.lm, self.n)
        rows = prefill_batch(self.lm, prompts)
        for i, (seq, _, _) in enumerate(rows):
            self.batch.adopt(i, seq)
        # each row's logits at its last prompt token: (V,) or (positions, V) by the model
        last = [logits.reshape(-1, logits.shape[-1])[-1] for _, _, logits in rows]
        self.logits = torch.stack(last).float()  # (N, V)

    @torch.no_grad()
    def mask(self) -> torch.Tensor:
        """``(N, V)``: True on each row's top-p tokens."""
        return top_p_mask(self.logits, self.top_p)

    @torch.no_grad()
    def follow(self, sub_envs, stepping: list[int]) -> None:
        """Append to each row in ``stepping`` what its sub-env appended at this step: the agent's
        token (one forward of the persistent batch for all rows), and in a conversation whose
        turn ended the other party's turn too (those rows in one padded forward over their own
        caches, then put back), so the masking policy reads exactly the env's ids."""
        tails = {i: sub_envs[i].sequence.ids[len(self.batch.rows[i]) :] for i in stepping}
        single = [i for i in stepping if len(tails[i]) == 1]
        if single:
            tokens = [tails[i][0] if i in single else 0 for i in range(self.n)]
            _, logits = self.batch.advance(tokens, single)
            self.logits[single] = logits[single].float()
        turns = [i for i in stepping if len(tails[i]) > 1]
        for i, (_, logits) in zip(turns, self.batch.extend_rows(turns, [tails[i] for i in turns])):
            self.logits[i] = logits[-1].float()


@dataclass(frozen=True)
class RolloutSeeds:
    """The two seeds of one rollout: the env reset's (which samples the sub-envs play) and the
    token sampler's. In a data-parallel run process ``rank`` of ``world`` draws the samples that
    sub-envs ``rank * n ...`` of one ``world * n`` batched env would draw, and samples tokens
    from its own stream; with one process both are as they always were."""

    reset: int
    sampling: int

    @classmethod
    def of(cls, config: TokenPPOConfig, iteration: int, n: int, rank: int = 0, world: int = 1):
        return cls(
            reset=config.seed * 1_000_003 + (iteration * world + rank) * n,
            sampling=config.seed * 7919 + iteration + rank * 1_000_000_007,
        )


def collect_rollout(
    envs,
    value_head: torch.nn.Module,
    config: TokenPPOConfig,
    iteration: int,
    rank: int = 0,
    world: int = 1,
    masker: NLPOMasker | None = None,
) -> Rollout:
    """:func:`run_rollout` of iteration ``iteration`` (its seeds worked out here) for process
    ``rank`` of ``world``, the env reset as the config's estimator needs."""
    from agents.token_ppo.estimators import make_estimator

    seeds = RolloutSeeds.of(config, iteration, envs.num_envs, rank, world)
    return run_rollout(envs, value_head, config, seeds, make_estimator(config).reset, masker)


@torch.no_grad()
def run_rollout(
    envs,
    value_head: torch.nn.Module,
    config: TokenPPOConfig,
    seeds: RolloutSeeds,
    reset,
    masker: NLPOMasker | None = None,
) -> Rollout:
    """One episode per sub-env: a sub-env whose episode ended sits out the rest of the rollout
    (``step_unfinished``: no new episode is prefilled to be dropped). ``reset(envs, seed) ->
    obs`` starts the episodes (the estimator's: every sub-env its own sample, or groups of one
    sample). ``masker`` (NLPO): tokens are sampled among its top-p nucleus only, and the masks
    are kept for the update.
    """
    obs = reset(envs, seeds.reset)
    lm = envs.unwrapped.lm
    # the ids each sub-env prefilled (chat template and truncation included), not re-encoded
    prompts = [list(env.sequence.ids) for env in envs.unwrapped.envs]
    gen = torch.Generator(device="cpu").manual_seed(seeds.sampling)
    n, T = envs.num_envs, config.max_new_tokens
    tokens = torch.full((n, T), lm.eos_token_id, dtype=torch.long)
    mask, logprobs, values, rewards = (torch.zeros(n, T) for _ in range(4))
    active = np.ones(n, dtype=bool)
    metrics, texts = [0.0] * n, [""] * n
    device = next(value_head.parameters()).device
    masks = None
    if masker is not None:
        masker.start(prompts)
        masks = torch.zeros(n, T, lm.vocab_size, dtype=torch.bool)
    for t in range(T):
        logits = envs.unwrapped.logits.float() / config.temperature  # (N, V): the env's own forward
        if masker is not None:
            allowed = masker.mask().to(logits.device)  # (N, V)
            # the rows still running only: an ended row's positions keep no mask, so the update
            # leaves them unmasked (its padding token may lie outside a stale nucleus: -inf)
            running = torch.as_tensor(active)
            masks[running, t] = allowed.cpu()[running]
            logits = logits.masked_fill(~allowed, float("-inf"))
        logits[torch.as_tensor(~active, device=logits.device)] = 0.0  # ended rows: step dropped
        logp_all = torch.log_softmax(logits, dim=-1).cpu()
        action = torch.multinomial(logp_all.exp(), 1, generator=gen)[:, 0]  # (N,)
        value = value_head(torch.as_tensor(obs, device=device)).squeeze(-1).cpu()
        stepping = np.flatnonzero(active).tolist()
        obs, reward, terminated, truncated, infos = envs.unwrapped.step_unfinished(action.numpy())
        if masker is not None:  # the masking policy reads the same tokens
            masker.follow(envs.unwrapped.envs, stepping)
        for i in np.flatnonzero(active):
            tokens[i, t], mask[i, t] = action[i], 1.0
            logprobs[i, t], values[i, t], rewards[i, t] = (
                logp_all[i, action[i]],
                value[i],
                float(reward[i]),
            )
            if terminated[i] or truncated[i]:
                active[i] = False
                metrics[i] = float(infos["metric"][i])
                texts[i] = str(infos["text"][i])
        if not active.any():
            break
    sequences, positions = conversation_layout(envs.unwrapped.envs, prompts, mask)
    return Rollout(
        prompts,
        tokens,
        mask,
        logprobs,
        values,
        rewards,
        metrics,
        texts,
        masks,
        sequences=sequences,
        positions=positions,
    )


def conversation_layout(sub_envs, prompts: list[list[int]], mask: torch.Tensor):
    """For dialogue envs, each conversation's ids after its prompt and the ``(B, T)`` position
    that predicts each agent token (the env's loss mask says where the agent's tokens are);
    ``(None, None)`` for generation envs, whose rows are ``prompt + tokens``."""
    if not hasattr(sub_envs[0], "agent_mask"):
        return None, None
    sequences, positions = [], torch.zeros(mask.shape, dtype=torch.long)
    for b, (env, prompt) in enumerate(zip(sub_envs, prompts)):
        ids, agent = env.sequence.ids, np.flatnonzero(env.agent_mask())
        n = int(mask[b].sum())
        if len(agent) != n:
            raise RuntimeError(f"Sub-env {b} holds {len(agent)} agent tokens for {n} steps.")
        sequences.append(list(ids[len(prompt) :]))
        predicting = torch.as_tensor(agent - 1, dtype=torch.long)
        positions[b, :n] = predicting
        positions[b, n:] = predicting[-1] if n else len(prompt) - 1
    return sequences, positions


def make_rollout_envs(config: TokenPPOConfig, lm: LanguageModel):
    """The batched env that runs ``lm`` (the policy) for rollouts: ``config.num_envs`` sub-envs of
    ``config.env_id`` in vocabulary mode; refuses an env whose actions are not the vocabulary.
    """
    env_kwargs = {
        **config.env_kwargs,
        "model": lm,
        "token_mode": "vocab",
        "max_steps": config.max_new_tokens,
        "device": str(lm.device),
        "text_infos": True,  # the completions' texts, for logs and samples
    }
    if config.dense is not None:  # None: the reward's own default
        env_kwargs["dense"] = config.dense
    if config.reward is not None:
        env_kwargs["reward"] = config.reward
    try:
        envs = gym.make_vec(
            config.env_id,
            num_envs=config.num_envs,
            autoreset_mode=gym.vector.AutoresetMode.NEXT_STEP,
            **env_kwargs,
        )
    except TypeError as e:  # an env that takes no token_mode / max_steps: not a textenvs env
        raise ValueError(
            "Token PPO needs a generation env whose actions are the vocabulary; "
            f"{config.env_id} is not one ({e}). Use textenvs/Summarize-v0, Translate-v0 or "
            "Generate-v0."
        ) from e
    space = envs.single_action_space
    if not (isinstance(space, gym.spaces.Discrete) and space.n == lm.vocab_size):
        raise ValueError(
            "Token PPO needs an env whose action space is the vocabulary "
            f"(Discrete({lm.vocab_size})), got {space} from {config.env_id}: use a "
            "generation or dialogue env (textenvs/Summarize-v0, Translate-v0, Generate-v0, "
            "Dialogue-v0, Chat-v0)."
        )
    if not hasattr(type(envs.unwrapped), "logits"):
        raise ValueError(
            f"{config.env_id} does not expose next-token logits: use a textenvs generation env."
        )
    return envs


def concat_rollouts(parts: list[Rollout]) -> Rollout:
    """One rollout of the parts' episodes, in order (all parts have the same token budget T;
    NLPO's action masks kept where the parts have them)."""
    masks = [part.action_masks for part in parts]
    conversations = all(part.sequences is not None for part in parts)
    return Rollout(
        prompts=[p for part in parts for p in part.prompts],
        tokens=torch.cat([part.tokens for part in parts]),
        mask=torch.cat([part.mask for part in parts]),
        logprobs=torch.cat([part.logprobs for part in parts]),
        values=torch.cat([part.values for part in parts]),
        env_rewards=torch.cat([part.env_rewards for part in parts]),
        metrics=[m for part in parts for m in part.metrics],
        texts=[t for part in parts for t in part.texts],
        action_masks=None if any(m is None for m in masks) else torch.cat(masks),
        sequences=[q for part in parts for q in part.sequences] if conversations else None,
        positions=torch.cat([part.positions for part in parts]) if conversations else None,
    )
