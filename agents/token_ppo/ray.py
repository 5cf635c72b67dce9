"""Envs on a Ray cluster: Ray actors that each hold a batched vector env, collecting token-PPO
rollouts for one learner.

* ``RolloutWorker`` (a Ray actor, one CPU or GPU each) holds ``gym.make_vec(env_id, num_envs)`` of
  a registered id (one batched forward per token for all its sub-envs) and its own copy of the
  policy and value head.
* ``RayTokenPPO`` is :class:`agents.token_ppo.TokenPPO` with rollouts collected by ``W`` workers:
  every iteration the learner puts its trainable weights in Ray's object store once (with LoRA,
  only the adapter), each worker loads them and collects ``num_envs`` episodes, exactly the ones
  process ``r`` of a ``W``-process data-parallel run collects, and the learner runs the PPO update
  on the ``W * num_envs`` episodes. Checkpoints, logs and the report are the learner's, as in one
  process.

Locally: ``python -m agents.ray_rollouts --workers 2 --total-episodes 256`` (``ray.init`` with
``--num-cpus``, default 2). On a cluster: ``ray start --head`` on one machine, ``ray start
--address <head>:6379`` on the others, then the same command with ``--address auto``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time

import numpy as np
import torch

from agents.checkpoint import check_save_target
from agents.cli import add_config_arguments, config_from_args
from agents.token_ppo.config import FIELD_CHECKS, TokenPPOConfig
from agents.token_ppo.estimators import make_estimator
from agents.token_ppo.policy import build_policy
from agents.token_ppo.rollout import (
    NLPOMasker,
    Rollout,
    RolloutSeeds,
    concat_rollouts,
    make_rollout_envs,
    run_rollout,
)
from agents.token_ppo.runtime import require
from agents.token_ppo.trainer import TokenPPO
from textenvs.cli import int_arg, run_cli

# the command line's defaults where they are not the trainer's: a short run of 16 sub-envs a worker
RAY_DEFAULTS = TokenPPOConfig(num_envs=16, total_episodes=256, eval_samples=50)


class RolloutWorker:
    """A batched env and a copy of the policy; :meth:`collect` runs one iteration's episodes.

    Made a Ray actor by :class:`RayTokenPPO` (``ray.remote(RolloutWorker)``); plain Python here.
    """

    def __init__(self, config: dict, rank: int, world: int, threads: int = 1) -> None:
        torch.set_num_threads(threads)
        self.config = TokenPPOConfig(**config)
        self.rank, self.world = rank, world
        # the learner's builder: the same LM, LoRA and value head (no reference: nothing here
        # scores against it)
        parts = build_policy(self.config, self.config.device, with_reference=False)
        self.lm, self.value_head = parts.lm, parts.value_head
        self.envs = make_rollout_envs(self.config, self.lm)
        self.estimator = make_estimator(self.config)
        self.masker = (
            NLPOMasker(self.lm, self.config.num_envs, self.config.nlpo_top_p)
            if self.config.nlpo_top_p
            else None
        )

    def collect(
        self, weights: dict[str, torch.Tensor], iteration: int, refresh_masker: bool = False
    ) -> Rollout:
        """Load the learner's trainable weights, then collect this worker's episodes (NLPO: the
        masking policy becomes the loaded policy first where the learner's did, and the
        rollout's action masks go back with it)."""
        value_head = {
            k[len("value_head.") :]: v for k, v in weights.items() if k.startswith("value_head.")
        }
        policy = {k: v for k, v in weights.items() if not k.startswith("value_head.")}
        result = self.lm.model.load_state_dict(policy, strict=False)
        if result.unexpected_keys:
            raise ValueError(
                f"The learner sent weights this worker's model does not have: "
                f"{result.unexpected_keys[:3]}; learner and workers must use the same config."
            )
        self.value_head.load_state_dict(value_head)
        if self.masker is not None and refresh_masker:
            self.masker.refresh(self.lm.model)
        seeds = RolloutSeeds.of(self.config, iteration, self.config.num_envs, self.rank, self.world)
        return run_rollout(
            self.envs, self.value_head, self.config, seeds, self.estimator.reset, self.masker
        )


class RayTokenPPO(TokenPPO):
    """Token PPO whose rollouts ``workers`` Ray actors collect, ``config.num_envs`` episodes each.

    ``ray.init`` must have run. ``config.num_envs`` is per worker; an iteration trains on
    ``workers * num_envs`` episodes and ``total_episodes`` counts them all.
    """

    def __init__(self, config: TokenPPOConfig, workers: int, worker_threads: int = 1) -> None:
        ray = require("ray", "ray", "Rollouts on Ray actors")
        if workers < 1:
            raise ValueError(f"workers must be >= 1, got {workers}.")
        config.validate()  # each worker's own num_envs must hold whole groups, for instance
        if config.fsdp:
            raise ValueError(
                "Ray rollouts run whole copies of the policy on their workers; fsdp=True shards "
                "it over a distributed launch instead. Use one or the other."
            )
        if not ray.is_initialized():
            raise RuntimeError("Call ray.init() (or ray.init(address='auto')) first.")
        self.workers_config = config
        super().__init__(dataclasses.replace(config, num_envs=config.num_envs * workers))
        gpus = 1 if torch.device(config.device).type == "cuda" else 0
        actor = ray.remote(num_cpus=worker_threads, num_gpus=gpus)(RolloutWorker)
        options = dataclasses.asdict(config)
        self.workers = [
            actor.remote(options, rank, workers, worker_threads) for rank in range(workers)
        ]
        self._ray = ray

    def trainable_weights(self) -> dict[str, torch.Tensor]:
        """What a worker needs to act as the current policy: the trainable LM weights (with LoRA
        the adapter alone) and the value head, on the CPU.
        """
        weights = {
            name: p.detach().cpu() for name, p in self.model.named_parameters() if p.requires_grad
        }
        weights.update(
            {f"value_head.{k}": v.detach().cpu() for k, v in self.value_head.state_dict().items()}
        )
        return weights

    def collect(self) -> Rollout:
        weights = self._ray.put(self.trainable_weights())  # once in the object store, shared
        # NLPO: the learner refreshed its masking policy before this rollout; so do the workers
        refresh = bool(
            self.masker is not None and self.iteration and self.iteration % self.config.nlpo_mu == 0
        )
        parts = self._ray.get(
            [w.collect.remote(weights, self.iteration, refresh) for w in self.workers]
        )
        return concat_rollouts(parts)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description="Token PPO with rollouts on Ray actors.")
    p.add_argument("--workers", type=int_arg(), default=2, help="Ray actors, each a batched env")
    p.add_argument("--address", help="a running Ray cluster ('auto'); default: start one here")
    p.add_argument("--num-cpus", type=int_arg(), default=2, help="CPUs of the local Ray instance")
    p.add_argument("--json-out", help="write the final report (JSON) here")
    # every TokenPPOConfig field, the token trainer's flags (num_envs: per worker)
    add_config_arguments(p, TokenPPOConfig, FIELD_CHECKS, defaults=RAY_DEFAULTS)
    args = vars(p.parse_args(argv))
    config = config_from_args(TokenPPOConfig, args)
    args = argparse.Namespace(**args)
    if config.checkpoint_dir:
        check_save_target(config.checkpoint_dir)  # before any work
    config.validate()
    ray = require("ray", "ray", "Rollouts on Ray actors")
    if args.address:
        ray.init(address=args.address)
    else:
        ray.init(num_cpus=args.num_cpus, include_dashboard=False, log_to_driver=False)
    try:
        trainer = RayTokenPPO(config, workers=args.workers)
        before = trainer.evaluate()
        start = time.time()
        history = trainer.train()
        report = {
            "env_id": config.env_id,
            "workers": args.workers,
            "episodes": trainer.iteration * trainer.config.num_envs,
            "test_metric_before": before,
            "test_metric_after": trainer.evaluate(),
            "train_seconds": round(time.time() - start, 1),
            "completions_per_s": float(np.mean([h["completions_per_s"] for h in history])),
        }
    finally:
        ray.shutdown()
    print(json.dumps(report))
    if args.json_out:
        with open(args.json_out, "w") as f:
            json.dump({**report, "history": history}, f, indent=1)
    return report


if __name__ == "__main__":
    run_cli(main)  # a user error as one line, "error: ...", exit status 2
