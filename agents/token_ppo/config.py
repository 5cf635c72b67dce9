"""The token trainer's configuration: one dataclass in titled sections, every field documented
(its docstring is its ``--help``) and checked in one place (:meth:`TokenPPOConfig.validate`)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from textenvs.checks import (
    SEED,
    check_bool,
    check_choice,
    check_optional_str,
    floats,
    ints,
    optional,
)

ESTIMATOR_CHOICES = {
    "estimator": ("gae", "grpo", "rloo"),
    "kl_placement": ("auto", "reward", "loss"),
    "kl_estimator": ("auto", "k1", "k3"),
    "ratio_level": ("token", "sequence"),
    "group_credit": ("episode", "to_go"),
}
FSDP_ROLLOUTS = ("gathered", "sharded")

# the wall-clock figures of a history record (the rest is a function of the seed and the data)
TIMING_STATS = ("completions_per_s", "iteration_s", "rollout_s", "reference_s", "update_s")

# what a checkpoint must share with the run that resumes it
ESTIMATOR_FIELDS = (
    "estimator",
    "group_size",
    "kl_placement",
    "kl_estimator",
    "ratio_level",
    "group_credit",
    "nlpo_top_p",
    "nlpo_mu",
)


# The learning rate of learning_rate=None, by the policy's size in parameters (the first row whose
# bound it does not pass). 3e-4 is the built-in 1M-parameter model's tuned rate; on a GPT-2 of
# the 124M layout it moved the policy 4.1 nats (per 16-token episode) from the reference in ONE
# update, 1e-5 (TRL's classic PPO rate for GPT-2) 0.0 (`python -m benchmarks.first_update_kl`).
AUTO_LEARNING_RATES = ((10_000_000, 3e-4), (None, 1e-5))


# Every numeric field's type and range: checked by TokenPPOConfig.validate() and by the command
# line's flags (the same message, before any work).
FIELD_CHECKS = {
    "num_envs": ints(1),
    "max_new_tokens": ints(1),
    "total_episodes": ints(1),
    "num_epochs": ints(1),
    "minibatch_size": ints(1),
    "group_size": ints(1),
    "nlpo_mu": ints(1),
    "kl_horizon": ints(1),
    "eval_samples": ints(1),
    "seed": SEED,
    "save_every": ints(0),
    "lora_r": ints(0),
    "learning_rate": optional(floats(0, low_open=True)),
    "max_approx_kl": optional(floats(0, low_open=True)),
    "clip_range": floats(0, low_open=True),
    "clip_range_value": floats(0, low_open=True),
    "temperature": floats(0, low_open=True),
    "max_grad_norm": floats(0, low_open=True),
    "kl_target": floats(0, low_open=True),
    "lora_alpha": floats(0, low_open=True),
    "vf_coef": floats(0),
    "ent_coef": floats(0),
    "kl_coef": floats(0),
    "gamma": floats(0, 1),
    "gae_lambda": floats(0, 1),
    "nlpo_top_p": floats(0, 1),
}


@dataclass
class TokenPPOConfig:
    """Hyper-parameters of token-level PPO (and GRPO, RLOO, NLPO), in sections: the env, the
    rollout, optimisation, the estimator and the KL, NLPO, scale-out, I/O. Every field is a
    ``--flag`` of ``python -m agents.token_ppo`` whose help is its docstring; every number is
    checked by :data:`FIELD_CHECKS`."""

    # -- the env -----------------------------------------------------------------------------------
    env_id: str = "textenvs/Summarize-v0"
    """A generation or dialogue env id (its action space must be the vocabulary). On a dialogue
    id the rows are whole conversations: the loss, the KL and the values are taken on the agent's
    tokens only, the other party's turns are state (never actions), and a group (GRPO, RLOO) is
    several conversations from the same opening; ``max_new_tokens`` caps the agent's tokens over
    all its turns."""
    env_kwargs: dict = dataclasses.field(default_factory=dict)
    """More keyword arguments of every env the trainer makes (rollouts and evaluation), as JSON on
    the command line: a benchmark id's ``dataset_kwargs`` (local files), ``reward_kwargs`` (a
    classifier or BERTScore model), ``chat_template``, ``too_long``, ``task``, ..."""
    model: str = "textenvs/tiny"
    """The starting policy: ``textenvs/tiny``, a ``save_pretrained`` folder or a hub name."""
    reward: str | None = None
    """The env's reward metric (None: the task's default)."""
    dense: bool | None = None
    """Dense rewards (the metric's change every token) or the metric once at the end; None: the
    reward's own default (dense for the text metrics, terminal for the model-based ones, whose
    score every token would cost a model forward per token)."""
    device: str = "cpu"
    """Torch device."""
    dtype: str | None = None
    """Weights' dtype (``float32``, ``bfloat16``, ``float16``; None: the checkpoint's). A large
    model with LoRA: ``bfloat16`` base weights, the adapter stays float32 (peft's default)."""
    seed: int = 0
    """Seeds the env resets, the sampling and the minibatch order of every iteration."""

    # -- the rollout -------------------------------------------------------------------------------
    num_envs: int = 32
    """Episodes per rollout: sub-envs of the batched env, one episode each."""
    max_new_tokens: int = 16
    """Tokens per episode at most."""
    total_episodes: int = 4096
    """Training budget in episodes (completions)."""
    temperature: float = 1.0
    """Sampling temperature of the rollout (1.0 samples the LM's own distribution)."""

    # -- optimisation ------------------------------------------------------------------------------
    learning_rate: float | None = None
    """Adam learning rate at the start; annealed linearly to 0 when ``anneal_lr``. None: by the
    policy's size (``AUTO_LEARNING_RATES``): 3e-4 up to 10M parameters (the built-in model's
    tuned rate), 1e-5 above (a 124M GPT-2 at 3e-4 drifts nats from its reference in one update;
    the agents guide's recipes)."""
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
    max_approx_kl: float | None = None
    """Stop an update early: once a minibatch's ``approx_kl`` (the policy now against the one that
    collected the rollout, nats per token, over every process's tokens) is past this, its step and
    the update's remaining ones are skipped (SB3's ``target_kl`` check, with the bound itself
    instead of 1.5 times it). None: every epoch runs. The history's ``minibatch_steps`` counts
    the steps taken. A guard for a model whose learning rate is not yet known (agents guide)."""
    gamma: float = 1.0
    """Discount per token."""
    gae_lambda: float = 0.95
    """GAE lambda. The main job's suite uses 0.5 (``TOKEN_PPO`` in
    ``benchmarks/suite/settings.py``): with a reward paid every token it learned faster on
    Translate and Summarize (the results page's "Tuning history")."""
    whiten_advantages: bool = True
    """Masked whitening of advantages over the rollout's tokens (``gae`` only: the group
    estimators normalise within each group)."""

    # -- the estimator and the KL ------------------------------------------------------------------
    estimator: str = "gae"
    """The advantage estimator: ``gae`` (the value head and per-token GAE: PPO), ``grpo`` (each
    episode's return normalised within its group of completions of one prompt; no value head) or
    ``rloo`` (each episode's return minus the mean of its group's others)."""
    group_size: int = 4
    """Completions per prompt for ``grpo`` / ``rloo``: consecutive sub-envs play the same sample
    (it must divide ``num_envs``)."""
    group_credit: str = "episode"
    """What a group estimator credits each token with: ``episode`` (the completion's whole
    return on every token, GRPO's and RLOO's) or ``to_go`` (our extension for dense rewards: each
    token's return from itself on, against the group's mean return-to-go at the same position,
    the others' only for ``rloo``; ``grpo`` divides by the std of the group's returns). With a
    terminal reward the two are the same."""
    ratio_level: str = "token"
    """The importance ratio of the clipped loss: ``token`` (one per token, the loss averaged over
    the batch's tokens: PPO, GRPO with TRL's ``loss_type="bnpo"``) or ``sequence`` (one per
    completion, the loss averaged over completions: RLOO as TRL's ``RLOOTrainer``; group
    estimators only)."""
    kl_coef: float = 0.02
    """Initial coefficient of the per-token KL penalty to the reference."""
    kl_estimator: str = "auto"
    """The per-token KL estimate: ``k1`` (``log pi - log pi_ref``) or ``k3``
    (``exp(r) - r - 1``, ``r = log pi_ref - log pi``: never negative); ``auto``: ``k3`` where the
    KL is in the loss, else ``k1``."""
    kl_placement: str = "auto"
    """Where the KL to the reference goes: ``reward`` (``kl_coef`` times each token's KL subtracted
    from its reward, PPO-RLHF's) or ``loss`` (``kl_coef`` times the mean per-token KL of the
    current policy added to the loss, TRL GRPO's); ``auto``: ``loss`` for ``grpo`` (in the
    reward, GRPO's division by the group's std turns KL differences of 0.01 between completions
    of equal score into advantages of +-1), ``reward`` for ``gae`` and ``rloo``."""
    adaptive_kl: bool = False
    """Adapt ``kl_coef`` towards ``kl_target`` (Ziegler et al. 2019)."""
    kl_target: float = 2.0
    """Target KL per episode (nats) for the adaptive controller."""
    kl_horizon: int = 10_000
    """Horizon (episodes) of the adaptive controller."""

    # -- NLPO --------------------------------------------------------------------------------------
    nlpo_top_p: float = 0.0
    """NLPO (Ramamurthy et al. 2023, RL4LMs): sample only among the tokens of the masking
    policy's top-p nucleus (the log-probs of the update renormalised over the same tokens); 0
    turns it off. The masking policy is a copy of the policy, refreshed every ``nlpo_mu``
    iterations; it runs one incremental forward of its own per step."""
    nlpo_mu: int = 5
    """Iterations between refreshes of NLPO's masking policy."""

    # -- scale-out ---------------------------------------------------------------------------------
    lora_r: int = 0
    """LoRA rank (peft); 0 trains every weight. With LoRA the reference is the base model with the
    adapter switched off (no second copy of the weights) and checkpoints hold the adapter."""
    lora_alpha: float = 16.0
    """LoRA scaling numerator (the update is scaled by ``lora_alpha / lora_r``)."""
    lora_target_modules: str | None = None
    """Comma-separated names of the modules LoRA adapts (None: peft's default for the model type,
    ``c_attn`` for GPT-2)."""
    mixed_precision: str = "no"
    """``no``, ``bf16`` or ``fp16`` (autocast through accelerate; fp16 needs CUDA). Under
    ``accelerate launch``, ``no`` leaves the choice to the launcher's ``--mixed_precision``."""
    fsdp: bool = False
    """Shard the parameters, gradients and optimizer states of the policy (and of the frozen
    reference) over the processes of a distributed launch with FSDP2, one unit per transformer
    block (``agents.fsdp``): full fine-tuning of a model larger than one device's memory. Each
    rollout gathers the parameters once and frees them after it (``fsdp_rollout``); checkpoints
    are sharded
    (``torch.distributed.checkpoint``) and resume on the same number of processes; ``--export``
    writes the whole model. Needs ``accelerate launch`` (or ``torchrun``); bf16 or full
    precision; not with NLPO or Ray rollouts."""
    fsdp_rollout: str = "gathered"
    """How a sharded run's rollouts and evaluations run: ``gathered`` (every parameter gathered
    once per rollout, then forwards with no collective: fast, but each process holds the whole
    model during it) or ``sharded`` (each forward gathers one block at a time and frees it, the
    processes stepping in lockstep, one all-reduce per forward: no process ever holds the whole
    model, for one whose parameters do not fit a process; slower, ``benchmarks.scale``'s
    ``sharded_vs_gathered_step``). With ``fsdp`` only."""
    gradient_checkpointing: bool = False
    """Activation checkpointing in the update: each transformer block keeps only its input for the
    backward and runs its forward again there (:func:`checkpoint_blocks`), so the activations the
    update holds fall from every block's to about one block's, for one more forward of the blocks
    per minibatch. The gradients are the same (no dropout runs in the update). Rollouts, the
    reference pass and evaluations build no graph and run as they are. With LoRA, DDP and
    ``fsdp``."""

    # -- I/O: evaluation, checkpoints, logs --------------------------------------------------------
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

    def learning_rate_for(self, parameters: int) -> float:
        """The learning rate of a policy of ``parameters`` weights: ``learning_rate``, or where it
        is None the first of :data:`AUTO_LEARNING_RATES` whose bound it is under."""
        if self.learning_rate is not None:
            return self.learning_rate
        return next(r for bound, r in AUTO_LEARNING_RATES if bound is None or parameters <= bound)

    def kl_settings(self) -> tuple[str, str]:
        """``(kl_placement, kl_estimator)`` with ``auto`` resolved (see the fields)."""
        placement = self.kl_placement
        if placement == "auto":
            placement = "loss" if self.estimator == "grpo" else "reward"
        estimator = self.kl_estimator
        if estimator == "auto":
            estimator = "k3" if placement == "loss" else "k1"
        return placement, estimator

    def validate(self) -> None:
        if self.dense is not None:
            check_bool("dense", self.dense)
        for name in (
            "anneal_lr",
            "adaptive_kl",
            "whiten_advantages",
            "fsdp",
            "gradient_checkpointing",
        ):
            check_bool(name, getattr(self, name))
        for name, choices in ESTIMATOR_CHOICES.items():
            if getattr(self, name) not in choices:
                raise ValueError(
                    f"{name}={getattr(self, name)!r} is not valid: choose one of {list(choices)}."
                )
        if self.estimator != "gae" and not (
            isinstance(self.group_size, int)
            and self.group_size >= 2
            and isinstance(self.num_envs, int)
            and self.num_envs % self.group_size == 0
        ):
            raise ValueError(
                f"estimator={self.estimator!r} needs group_size >= 2 dividing num_envs; got "
                f"group_size={self.group_size!r}, num_envs={self.num_envs!r}."
            )
        top_p_ok = isinstance(self.nlpo_top_p, (int, float)) and 0.0 <= self.nlpo_top_p <= 1.0
        if not top_p_ok or not (isinstance(self.nlpo_mu, int) and self.nlpo_mu >= 1):
            raise ValueError(
                f"nlpo_top_p must be in [0, 1] (0: off) and nlpo_mu an int >= 1; got "
                f"nlpo_top_p={self.nlpo_top_p!r}, nlpo_mu={self.nlpo_mu!r}."
            )
        if self.group_credit == "to_go" and (
            self.estimator == "gae" or self.ratio_level == "sequence"
        ):
            raise ValueError(
                "group_credit='to_go' gives each token its own advantage from its group: use it "
                "with estimator='grpo' or 'rloo' and ratio_level='token'."
            )
        if self.ratio_level == "sequence" and self.estimator == "gae":
            raise ValueError(
                "ratio_level='sequence' needs one advantage per completion: use it with "
                "estimator='grpo' or 'rloo' (GAE's advantages are per token)."
            )
        if not isinstance(self.env_kwargs, dict):
            raise ValueError(f"env_kwargs must be a dict, got {self.env_kwargs!r}.")
        for name, check in FIELD_CHECKS.items():
            check(name, getattr(self, name))
        for name in ("reward", "dtype", "eval_reward", "checkpoint_dir", "tensorboard_log"):
            check_optional_str(name, getattr(self, name))
        if self.mixed_precision not in ("no", "bf16", "fp16"):
            raise ValueError(
                f"mixed_precision must be 'no', 'bf16' or 'fp16', got {self.mixed_precision!r}."
            )
        if self.fsdp and self.mixed_precision == "fp16":
            raise ValueError(
                "fsdp=True runs in bf16 or full precision: fp16 needs a loss scaler for sharded "
                "gradients, which this trainer does not run. Use --mixed-precision bf16."
            )
        check_choice("fsdp_rollout", self.fsdp_rollout, FSDP_ROLLOUTS)
        if self.fsdp_rollout != "gathered" and not self.fsdp:
            raise ValueError(
                f"fsdp_rollout={self.fsdp_rollout!r} is how a sharded run rolls out: it needs "
                "--fsdp true (without it the parameters are whole in every process)."
            )
        if self.fsdp and self.nlpo_top_p:
            raise ValueError(
                "fsdp=True does not run NLPO: its masking policy is a whole copy of the policy "
                "on every process, which sharding is there to avoid. Use estimator='gae' (PPO), "
                "'grpo' or 'rloo' with --fsdp, or NLPO without it."
            )
