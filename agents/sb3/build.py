"""Building, training and evaluating SB3 models on textenvs: the batched vector env through
``gym.make_vec`` and the SB3 adapter, the policy a config names, the callbacks (the task metric
in TensorBoard, the KL penalty), deterministic evaluation on a split."""

from __future__ import annotations

import gymnasium as gym
import numpy as np

import textenvs
from agents.common import evaluate_policy
from agents.sb3.config import PRIOR_POLICIES, SB3Config
from textenvs.vector import as_sb3_vec_env


def make_vec_env(
    env_id: str, num_envs: int, split: str = "train", normalize_obs: bool = False, **env_kwargs
):
    """An SB3 VecEnv over the batched textenvs vector env, with episode statistics (VecMonitor) and,
    optionally, observation normalisation (VecNormalize, rewards left as they are)."""
    from stable_baselines3.common.vec_env import VecMonitor, VecNormalize

    envs = gym.make_vec(env_id, num_envs=num_envs, split=split, **env_kwargs)
    venv = VecMonitor(as_sb3_vec_env(envs))
    return VecNormalize(venv, norm_obs=True, norm_reward=False) if normalize_obs else venv


def metric_callback():
    """A callback that logs the task metric of finished episodes (``rollout/metric_mean``)."""
    from stable_baselines3.common.callbacks import BaseCallback

    class MetricCallback(BaseCallback):
        def __init__(self) -> None:
            super().__init__()
            self.recent: list[float] = []
            self.history: list[tuple[int, float]] = []

        def _on_step(self) -> bool:
            for done, info in zip(self.locals["dones"], self.locals["infos"]):
                if done and "metric" in info:
                    value = float(info["metric"])
                    self.recent = (self.recent + [value])[-100:]
                    self.history.append((self.num_timesteps, value))
            return True

        def _on_rollout_end(self) -> None:
            if self.recent:
                self.logger.record("rollout/metric_mean", float(np.mean(self.recent)))

    return MetricCallback()


def train_callbacks(config: SB3Config) -> list:
    """The callbacks ``model.learn`` needs for ``config`` (the KL penalty where ``kl_coef`` > 0)."""
    if not config.kl_coef:
        return []
    from agents.lm_prior import KLPenalty

    return [KLPenalty(config.kl_coef)]


def build(env_id: str, config: SB3Config | None = None, **env_kwargs):
    """The SB3 model for ``env_id`` on its train split (train it with ``callback=``
    :func:`train_callbacks` ``(config)``)."""
    config = config or SB3Config()
    config.validate()
    if config.policy in PRIOR_POLICIES and not env_kwargs.get("candidates_obs"):
        raise ValueError(
            f"policy={config.policy!r} reads the actions' log-probabilities from the observation: "
            "make the env with candidates_obs=True (pass it in env_kwargs)."
        )
    if config.policy == "last_block":
        wanted = {"obs": "context", "layer": -2, "token_mode": "topk"}
        if textenvs.is_edit_env(env_id) or any(env_kwargs.get(k) != v for k, v in wanted.items()):
            raise ValueError(
                f"policy='last_block' reads the input of the LM's last block: make a generation "
                f"env with {wanted} (agents.sb3.policy_env_kwargs gives them), got {env_id} with "
                f"{ {k: env_kwargs.get(k) for k in wanted} }."
            )
    venv = make_vec_env(env_id, config.num_envs, "train", normalizes(config), **env_kwargs)
    return quiet_logger(_model_on(venv, env_id, config, env_kwargs), config.tensorboard_log)


def _model_on(venv, env_id: str, config: SB3Config, env_kwargs: dict):
    """A new SB3 model of ``config`` on ``venv``: what :func:`build` trains and what
    :func:`load` rebuilds a checkpoint's serialized fields from."""
    cls = _algo_class(config.algo)
    if config.algo == "maskable_ppo":
        try:
            venv.get_attr("action_masks", indices=[0])
        except AttributeError as e:
            raise ValueError(
                f"MaskablePPO needs action_masks(), which {env_id} does not have: use algo='ppo', "
                "or an edit env."
            ) from e
    policy, policy_kwargs = "MlpPolicy", dict(config.policy_kwargs)
    if config.policy == "lm_prior" and config.algo == "maskable_ppo":
        if not env_kwargs.get("flat_actions"):
            raise ValueError(
                "policy='lm_prior' with MaskablePPO scores each flat edit: make the edit env with "
                "flat_actions=True (pass it in env_kwargs)."
            )
        from agents.edit_prior import EditPriorPolicy as policy

        for name in ("max_len", "k"):  # the env's layout of actions and candidate block
            policy_kwargs.setdefault(name, venv.get_attr(name, indices=[0])[0])
    elif config.policy == "lm_prior":
        from agents.lm_prior import LMPriorPolicy as policy
    elif config.policy == "last_block":
        from agents.last_block import LastBlockPolicy as policy

        policy_kwargs.setdefault("model", venv.get_attr("lm", indices=[0])[0])
    model = cls(
        policy,
        venv,
        n_steps=config.n_steps,
        batch_size=config.batch_size,
        n_epochs=config.n_epochs,
        learning_rate=config.learning_rate,
        gamma=config.gamma,
        gae_lambda=config.gae_lambda,
        ent_coef=config.ent_coef,
        seed=config.seed,
        policy_kwargs=policy_kwargs or None,
        tensorboard_log=config.tensorboard_log,
        verbose=0,
    )
    return model


def quiet_logger(model, tensorboard_log: str | None):
    """Give a model that logs nowhere a logger without a folder.

    Without TensorBoard, SB3's ``learn()`` still makes an empty ``SB3-<date>`` folder in the
    system's temp directory at every call (``configure_logger`` -> ``configure``). A benchmark
    that calls ``learn()`` once per learning-curve point would leave hundreds of them.
    """
    if tensorboard_log is None:
        from stable_baselines3.common.logger import Logger

        model.set_logger(Logger(folder=None, output_formats=[]))
    return model


def policy_env_kwargs(policy: str, env_id: str) -> dict:
    """The env keyword arguments a policy reads: ``lm_prior`` needs the candidate block
    (``candidates_obs=True``), and on an edit env one action per distinct edit
    (``flat_actions=True``); ``last_block`` the input of the LM's last block (``obs="context"``,
    ``layer=-2``) too."""
    if policy == "last_block":
        return {"candidates_obs": True, "obs": "context", "layer": -2}
    if policy != "lm_prior":
        return {}
    return {
        "candidates_obs": True,
        **({"flat_actions": True} if textenvs.is_edit_env(env_id) else {}),
    }


def normalizes(config: SB3Config) -> bool:
    """Whether the model's env normalises observations (never under the LM-prior policy, whose
    observation carries log-probabilities that must stay as they are)."""
    return config.normalize_obs and config.policy not in PRIOR_POLICIES


def default_algo(env_id: str) -> str:
    """``maskable_ppo`` for an env that offers ``action_masks()`` (sb3-contrib's convention), else
    ``ppo``.
    """
    from gymnasium.envs.registration import load_env_creator

    entry_point = gym.spec(env_id).entry_point
    creator = load_env_creator(entry_point) if isinstance(entry_point, str) else entry_point
    return "maskable_ppo" if callable(getattr(creator, "action_masks", None)) else "ppo"


def _algo_class(algo: str):
    if algo == "ppo":
        from stable_baselines3 import PPO

        return PPO
    try:
        from sb3_contrib import MaskablePPO
    except ImportError as e:
        raise ImportError(
            "algo='maskable_ppo' needs sb3-contrib: pip install 'textenvs[sb3]'."
        ) from e
    return MaskablePPO


def evaluate(
    model, env_id: str, split: str = "test", max_samples: int | None = None, **env_kwargs
) -> dict:
    """The deterministic policy on each sample of ``split`` (a single env, one episode a sample)."""
    env = gym.make(env_id, split=split, **env_kwargs)
    return evaluate_policy(env, deterministic_policy(model), max_samples=max_samples)


def deterministic_policy(model):
    """``policy(obs, mask) -> action`` of a trained model for a single env, with the model's
    observation
    normalisation (frozen at evaluation) and its action masks where it is a MaskablePPO."""
    from stable_baselines3.common.vec_env import VecNormalize

    masked = type(model).__name__ == "MaskablePPO"
    normalizer = model.get_env() if isinstance(model.get_env(), VecNormalize) else None

    def policy(obs, mask):
        if normalizer is not None:
            obs = normalizer.normalize_obs(obs)
        kwargs = {"action_masks": mask} if masked and mask is not None else {}
        action, _ = model.predict(obs, deterministic=True, **kwargs)
        return action

    return policy
