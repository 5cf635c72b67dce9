"""The token trainer's loop: collect a rollout, update, log, checkpoint; evaluate greedily.

What varies between runs is chosen once in ``__init__`` and then only called: the runtime (one
process, DDP or FSDP: :mod:`agents.token_ppo.runtime`), the advantage estimator, the policy
loss's ratio level and the KL's placement (:mod:`agents.token_ppo.estimators`). The update has no
branch on any of them.
"""

from __future__ import annotations

import functools
import itertools
import math
import os
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from agents.checkpoint import check_save_target
from agents.common import greedy_evaluation
from agents.token_ppo import checkpoint
from agents.token_ppo.config import TokenPPOConfig
from agents.token_ppo.estimators import Advantages, make_estimator, make_kl, make_policy_loss
from agents.token_ppo.losses import AdaptiveKLController, masked_share
from agents.token_ppo.policy import (
    PolicyWithValue,
    batch_sequences,
    build_policy,
    checkpoint_blocks,
    load_sharded_policy,
    sequence_outputs,
)
from agents.token_ppo.rollout import (
    NLPOMasker,
    Rollout,
    RolloutSeeds,
    make_rollout_envs,
    run_rollout,
)
from agents.token_ppo.runtime import make_runtime

LOSS_STATS = ("loss", "policy_loss", "value_loss", "entropy", "clipfrac", "approx_kl")


@dataclass
class Batch:
    """A rollout as the update reads it, on the trainer's device: ``prompt + completion`` ids
    ``(B, L)``, their attention ``(B, L)``, the position scoring each generated token
    ``(B, T)``, the tokens, their mask, NLPO's action masks ``(B, T, V)`` or None, and the
    rollout's log-probs and values ``(B, T)``."""

    ids: torch.Tensor
    attention: torch.Tensor
    positions: torch.Tensor
    tokens: torch.Tensor
    mask: torch.Tensor
    allowed: torch.Tensor | None
    old_logp: torch.Tensor
    old_values: torch.Tensor

    @classmethod
    def of(cls, rollout: Rollout, pad: int, device) -> Batch:
        ids, attention, positions = batch_sequences(
            rollout.prompts, rollout.tokens, rollout.mask, pad, rollout.sequences, rollout.positions
        )
        allowed = rollout.action_masks
        return cls(
            ids.to(device),
            attention.to(device),
            positions.to(device),
            rollout.tokens.to(device),
            rollout.mask.to(device),
            None if allowed is None else allowed.to(device),
            rollout.logprobs.to(device),
            rollout.values.to(device),
        )


class TokenPPO:
    """Token-level PPO on a textenvs generation env; the policy is ``self.lm`` itself.

    ``accelerator`` (an ``accelerate.Accelerator``, see
    :func:`~agents.token_ppo.runtime.make_accelerator`) runs it data parallel: each process
    collects ``num_envs`` episodes through its own batched env, every loss and statistic is a
    mean over all processes' tokens, the engine all-reduces the gradients, and process 0 alone
    writes checkpoints, logs and the progress bar. ``total_episodes`` counts the episodes of all
    processes. None: one process, plain PyTorch. ``fsdp=True`` shards it (FSDP2).

    With ``lora_r > 0`` the LM gets a peft LoRA adapter in place: the env's forwards run the
    adapted model, the value head reads the adapted trunk, the reference is the same weights with
    the adapter switched off, and only the adapter and the value head train.
    """

    def __init__(self, config: TokenPPOConfig, accelerator=None) -> None:
        config.validate()
        if config.checkpoint_dir:  # a user's folder is refused now, not after training
            check_save_target(config.checkpoint_dir)
        self.config = config
        self.runtime = make_runtime(config, accelerator)
        # sharded full fine-tuning never holds the whole model: built on the meta device, sharded,
        # then each process reads its own shards (with LoRA the base is loaded whole, as before)
        empty = self.runtime.sharded and not config.lora_r
        parts = build_policy(config, self.runtime.checked_device(config.device), empty=empty)
        self.lm, self.model, self.peft = parts.lm, parts.model, parts.peft
        self.reference, self.value_head = parts.reference, parts.value_head
        if config.gradient_checkpointing:  # the policy only: nothing else builds a graph
            checkpoint_blocks(self.model)
        self.policy = PolicyWithValue(self.model, self.value_head)
        self.units = self.runtime.shard(self.model, self.value_head, self.reference)
        if empty:
            load_sharded_policy(parts, self.runtime.for_rollouts)
        self.envs = make_rollout_envs(config, self.lm)
        self.masker = (
            NLPOMasker(self.lm, config.num_envs, config.nlpo_top_p) if config.nlpo_top_p else None
        )
        self.trainable = [p for p in self.policy.parameters() if p.requires_grad]
        # the LM's own size (LoRA's frozen base included; on the meta device or sharded, the
        # whole shape's): what learning_rate=None is chosen by
        self.model_parameters = sum(p.numel() for p in self.lm.model.parameters())
        self.learning_rate = config.learning_rate_for(self.model_parameters)
        self.optimizer = torch.optim.Adam(self.trainable, lr=self.learning_rate, eps=1e-5)
        self.policy, self.optimizer = self.runtime.prepare(self.policy, self.optimizer)
        self.estimator = make_estimator(config)
        self.policy_loss = make_policy_loss(config)
        self.kl_term = make_kl(config)
        self.kl = AdaptiveKLController(config.kl_coef, config.kl_target, config.kl_horizon)
        self.iteration = 0
        self.history: list[dict] = []
        self.writer = None
        if config.tensorboard_log and self.is_main:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(config.tensorboard_log)

    # -- where it runs ---------------------------------------------------------------------
    @property
    def accelerator(self):
        return self.runtime.accelerator

    @property
    def rank(self) -> int:
        return self.runtime.rank

    @property
    def world(self) -> int:
        return self.runtime.world

    @property
    def is_main(self) -> bool:
        """Process 0 (the only one in a plain run): it writes checkpoints, logs and reports."""
        return self.runtime.is_main

    @property
    def episodes_per_iteration(self) -> int:
        return self.config.num_envs * self.world

    @property
    def iterations(self) -> int:
        return math.ceil(self.config.total_episodes / self.episodes_per_iteration)

    # -- rollout -------------------------------------------------------------------------------
    def collect(self) -> Rollout:
        """This iteration's episodes (this process's share), through this process's batched env.
        A subclass may collect them elsewhere (:mod:`agents.token_ppo.ray`: on Ray actors).
        """
        seeds = RolloutSeeds.of(
            self.config, self.iteration, self.config.num_envs, self.rank, self.world
        )
        with self.runtime.for_rollouts(), self.runtime.autocast():
            return run_rollout(
                self.envs, self.value_head, self.config, seeds, self.estimator.reset, self.masker
            )

    # -- update --------------------------------------------------------------------------------
    def update(self, rollout: Rollout) -> dict:
        """KL-penalised rewards, the estimator's advantages, then PPO epochs over shuffled
        minibatches of episodes. Every mean (whitening, losses, logged figures) is over the
        tokens of all processes.
        """
        c = self.config
        batch = Batch.of(rollout, self.lm.eos_token_id, self.lm.device)
        started = time.time()
        with torch.no_grad():
            with self.runtime.autocast():
                ref_logp = self._reference_logprobs(batch)
            reference_s = time.time() - started
            kl = self.kl_term.estimate(batch.old_logp, ref_logp) * batch.mask  # (B, T)
            rewards = self.kl_term.shape_rewards(
                rollout.env_rewards.to(self.lm.device), kl, self.kl.value
            )
            advantages = self.estimator.advantages(
                rewards, batch.old_values, batch.mask, self.runtime.sum
            )
        self._anneal_learning_rate()
        rng = np.random.default_rng(c.seed * 1_000_003 + self.iteration)
        stats = {k: [] for k in LOSS_STATS[1:]}
        B, size = batch.tokens.shape[0], c.minibatch_size
        orders = [rng.permutation(B) for _ in range(c.num_epochs)]  # one shuffle per epoch
        steps = 0
        for epoch, start in itertools.product(range(c.num_epochs), range(0, B, size)):
            mb = torch.as_tensor(orders[epoch][start : start + size], device=batch.mask.device)
            figures, stepped = self._minibatch_step(batch, advantages, ref_logp, mb)
            if not all(math.isfinite(f) for f in figures):
                raise FloatingPointError(
                    f"Non-finite loss or statistic ({dict(zip(LOSS_STATS, figures))}) at "
                    f"iteration {self.iteration}, epoch {epoch}, minibatch {start // size}: "
                    "training stopped. The last good checkpoint "
                    f"({c.checkpoint_dir or 'none configured'}) is intact; lower "
                    "learning_rate or check the reward."
                )
            for name, value in zip(LOSS_STATS[1:], figures[1:]):
                stats[name].append(value)
            steps += stepped
            if not stepped:  # past max_approx_kl: the rest of the update is skipped
                break
        record = self._update_stats(rollout, batch, stats, kl, advantages, reference_s, started)
        record["minibatch_steps"] = steps  # optimizer steps taken (max_approx_kl may stop early)
        return record

    def _reference_logprobs(self, batch: Batch) -> torch.Tensor:
        """The frozen reference's log-probs of the rollout's tokens: one full-sequence pass (with
        LoRA, the same weights with the adapter switched off: no second copy of the model)."""
        model = self.reference if self.peft is None else self.model
        adapter_off = self.peft.disable_adapter() if self.peft is not None else nullcontext()
        with adapter_off:
            logp = sequence_outputs(
                model,
                batch.ids,
                batch.attention,
                batch.positions,
                batch.tokens,
                self.config.temperature,
                False,
            )[0]
        self.runtime.after_reference(self.reference)
        return logp

    def _anneal_learning_rate(self) -> None:
        if self.config.anneal_lr:  # linearly to 0 over the run
            for g in self.optimizer.param_groups:
                g["lr"] = self.learning_rate * (1 - self.iteration / self.iterations)

    def _minibatch_step(
        self, batch: Batch, advantages: Advantages, ref_logp: torch.Tensor, mb: torch.Tensor
    ) -> tuple[list[float], bool]:
        """One optimizer step on the episodes ``mb``: the loss and its parts averaged over every
        process (one all-reduce), in :data:`LOSS_STATS` order, and whether the step was taken
        (not with a non-finite figure, nor past ``max_approx_kl``: every process decides alike
        on the same global figures)."""
        c, m = self.config, batch.mask[mb]
        logp, entropy, values = self.policy(
            batch.ids[mb],
            batch.attention[mb],
            batch.positions[mb],
            batch.tokens[mb],
            c.temperature,
            None if batch.allowed is None else batch.allowed[mb],
        )
        mean = functools.partial(masked_share, total=self.runtime.sum(m.sum()), world=self.world)
        pg_loss, clipfrac = self.policy_loss(
            logp, batch.old_logp[mb], advantages, mb, m, c.clip_range, mean, self.runtime
        )
        v_loss = self.estimator.value_loss(
            values, batch.old_values[mb], advantages.returns[mb], m, c.clip_range_value, mean
        )
        ent = mean(entropy, m)
        loss = pg_loss + c.vf_coef * v_loss - c.ent_coef * ent
        loss = self.kl_term.add_to_loss(loss, logp, ref_logp[mb], m, self.kl.value, mean)
        with torch.no_grad():  # one all-reduce: global figures, and one verdict on NaN
            approx_kl = mean(batch.old_logp[mb] - logp, m)
            parts = torch.stack([loss, pg_loss, v_loss, ent, clipfrac, approx_kl])
            figures = (self.runtime.sum(parts.float()) / self.world).tolist()
        over = c.max_approx_kl is not None and figures[LOSS_STATS.index("approx_kl")] > (
            c.max_approx_kl
        )
        if over or not all(math.isfinite(f) for f in figures):
            return figures, False
        self.optimizer.zero_grad()
        self.runtime.backward_and_clip(loss, self.trainable, c.max_grad_norm)
        self.optimizer.step()
        return figures, True

    def _update_stats(self, rollout, batch, stats, kl, advantages, reference_s, started) -> dict:
        """The iteration's record: the losses' means, the KL (and its adaptive coefficient's
        step), the value head's explained variance, the reward and metric, the timings."""
        mean_over = functools.partial(self.runtime.mean_over_processes, device=self.lm.device)
        episode_kl = mean_over(kl.sum(1).mean())
        if self.config.adaptive_kl:
            self.kl.update(episode_kl, batch.tokens.shape[0] * self.world)
        out = {k: float(np.mean(v)) for k, v in stats.items()}
        out.update(
            kl=episode_kl,
            kl_coef=self.kl.value,
            explained_variance=self.estimator.explained_variance(
                batch.old_values, advantages.returns, batch.mask, self.runtime.sum
            ),
            reward=mean_over(rollout.env_rewards.sum(1).mean()),
            metric=mean_over(torch.tensor(np.mean(rollout.metrics), dtype=torch.float64)),
            lr=self.optimizer.param_groups[0]["lr"],
            reference_s=reference_s,  # the reference model's pass over the rollout
            update_s=time.time() - started - reference_s,  # advantages and the optimizer steps
        )
        return out

    # -- the loop ------------------------------------------------------------------------------
    def train(self, progress: bool = True, stop_after: int | None = None) -> list[dict]:
        """Run the remaining iterations (all of them, or those left after :meth:`load_checkpoint`).

        ``stop_after`` ends the call after that many iterations (the run can be resumed later).
        """
        c = self.config
        per_iteration = self.episodes_per_iteration
        last = (
            self.iterations
            if stop_after is None
            else min(self.iterations, self.iteration + stop_after)
        )
        bar = tqdm(
            total=self.iterations * per_iteration,
            initial=self.iteration * per_iteration,
            disable=not progress or not self.is_main,
            desc="token-ppo episodes",
        )
        while self.iteration < last:
            stats = self._iteration()
            self.history.append(stats)
            if self.writer is not None:
                for key, value in stats.items():
                    self.writer.add_scalar(f"token_ppo/{key}", value, stats["episodes"])
            self.iteration += 1
            bar.update(per_iteration)
            bar.set_postfix(metric=f"{stats['metric']:.3f}", kl=f"{stats['kl']:.2f}")
            if c.checkpoint_dir and c.save_every and self.iteration % c.save_every == 0:
                self.save_checkpoint(c.checkpoint_dir)
        bar.close()
        if c.checkpoint_dir:
            self.save_checkpoint(c.checkpoint_dir)
        return self.history

    def _iteration(self) -> dict:
        """One iteration: (NLPO: refresh the masking policy), collect, update; its record."""
        if self.masker is not None and self.iteration and self.iteration % self.config.nlpo_mu == 0:
            self.masker.refresh(self.model)  # NLPO: the masking policy catches up
        start = time.time()
        rollout = self.collect()
        rollout_s = time.time() - start
        stats = self.update(rollout)
        per_iteration = self.episodes_per_iteration
        stats.update(
            rollout_s=rollout_s,  # the env's forwards and the sampling
            iteration=self.iteration,
            episodes=(self.iteration + 1) * per_iteration,
            tokens=int(self.runtime.sum(rollout.mask.sum().to(self.lm.device))),
            completions_per_s=per_iteration / rollout_s,
            iteration_s=time.time() - start,
        )
        return stats

    # -- evaluation ----------------------------------------------------------------------------
    def evaluate(self, split: str = "test", max_samples: int | None = None) -> float | None:
        """Mean task metric of greedy decoding over the split (the same env, task and reward).

        fsdp=True: collective (every process calls it; the parameters are gathered, or the
        others stand in for process 0's sharded forwards); process 0 evaluates and the others
        return None.
        """
        result = self.evaluation(split, max_samples)
        return None if result is None else float(np.mean(result["metrics"]))

    def evaluation(self, split: str = "test", max_samples: int | None = None) -> dict | None:
        """Greedy decoding over the split, whole: each sample's metric, text and prompt
        (:func:`agents.common.greedy_evaluation`); collective as :meth:`evaluate`."""
        with self.runtime.for_rollouts():
            if self.runtime.sharded and not self.is_main:
                return None
            return greedy_evaluation(
                self.lm,
                self.config.env_id,
                split,
                max_samples or self.config.eval_samples,
                self.config.max_new_tokens,
                self.config.eval_reward or self.config.reward,
                self.config.env_kwargs,
            )

    # -- checkpoints (agents/token_ppo/checkpoint.py) ------------------------------------------
    def save_checkpoint(self, folder: str | os.PathLike) -> Path:
        """The policy (``save_pretrained``; with LoRA the adapter only), the value head
        (safetensors), the optimizer and the trainer state; sharded runs write their shards.
        Crash-consistent: a process killed at any instant of the save leaves the previous or the
        new checkpoint complete and loadable (:func:`agents.token_ppo.checkpoint.save`)."""
        return checkpoint.save(self, folder)

    def load_checkpoint(self, folder: str | os.PathLike) -> None:
        """Resume from :meth:`save_checkpoint`: the same results as an uninterrupted run. All or
        nothing: a damaged checkpoint raises ``ValueError`` naming the file and field and leaves
        the trainer as it was (:func:`agents.token_ppo.checkpoint.load`)."""
        checkpoint.load(self, folder)

    def export(self, folder: str | os.PathLike) -> Path:
        """The trained policy as a plain ``save_pretrained`` folder (safetensors + tokenizer)
        that transformers and ``gym.make(id, model=folder)`` load; with LoRA, the adapter merged
        into a copy of the base weights (:func:`agents.token_ppo.checkpoint.export`)."""
        return checkpoint.export(self, folder)
