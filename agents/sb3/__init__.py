"""Stable-Baselines3 PPO (and sb3-contrib MaskablePPO for the edit envs) on textenvs.

The helpers stay thin: they build the batched vector env through ``gym.make_vec`` and the SB3
adapter, SB3 does the RL, and a callback logs the task metric to TensorBoard beside SB3's own
scalars. Evaluation plays the deterministic policy once on each test-split sample.

Run ``python -m agents.sb3 --env-id textenvs/Summarize-v0 --total-steps 20000``: it trains on the
train split with a progress bar, then prints the mean metric over the test split.

The package: ``config.py`` (:class:`SB3Config`, every field checked), ``build.py`` (envs, models,
callbacks, evaluation), ``checkpoint.py`` (save / load without unpickling), ``cli.py``.
"""

from agents.sb3.build import (
    build,
    default_algo,
    deterministic_policy,
    evaluate,
    make_vec_env,
    metric_callback,
    normalizes,
    policy_env_kwargs,
    quiet_logger,
    train_callbacks,
)
from agents.sb3.checkpoint import (
    REBUILT_FIELDS,
    load,
    normalizer,
    save,
    serialized_fields,
)
from agents.sb3.cli import main
from agents.sb3.config import (
    ALGOS,
    MAX_NUM_ENVS,
    POLICIES,
    PRIOR_POLICIES,
    SB3Config,
    check_policy_kwargs,
)


def __getattr__(name: str):
    # ``from agents.sb3 import LMPriorPolicy`` without importing SB3 when this module loads
    if name == "LMPriorPolicy":
        from agents.lm_prior import LMPriorPolicy

        return LMPriorPolicy
    if name == "EditPriorPolicy":
        from agents.edit_prior import EditPriorPolicy

        return EditPriorPolicy
    if name == "LastBlockPolicy":
        from agents.last_block import LastBlockPolicy

        return LastBlockPolicy
    raise AttributeError(f"module 'agents.sb3' has no attribute {name!r}")


__all__ = [
    "ALGOS",
    "MAX_NUM_ENVS",
    "POLICIES",
    "PRIOR_POLICIES",
    "REBUILT_FIELDS",
    "SB3Config",
    "build",
    "check_policy_kwargs",
    "default_algo",
    "deterministic_policy",
    "evaluate",
    "load",
    "main",
    "make_vec_env",
    "metric_callback",
    "normalizer",
    "normalizes",
    "policy_env_kwargs",
    "quiet_logger",
    "save",
    "serialized_fields",
    "train_callbacks",
]
