"""Stable-Baselines3 PPO (and sb3-contrib MaskablePPO for the edit envs) on textenvs.

The helpers stay thin: they build the batched vector env through ``gym.make_vec`` and the SB3
adapter, SB3 does the RL, and a callback logs the task metric to TensorBoard beside SB3's own
scalars. Evaluation plays the deterministic policy once on each test-split sample.

Run ``python -m agents.sb3 --env-id textenvs/Summarize-v0 --total-steps 20000``: it trains on the
train split with a progress bar, then prints the mean metric over the test split.
"""

from __future__ import annotations

import argparse
import json
import time
import warnings
import zipfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

import gymnasium as gym
import numpy as np

import textenvs  # noqa: F401  (registers the ids)
from agents.checkpoint import (
    check_save_target,
    check_zip_sizes,
    read_json_object,
    recover,
    save_atomically,
)
from agents.common import evaluate_policy
from textenvs.checks import check_float, check_int, check_optional_str
from textenvs.cli import float_arg, int_arg, run_cli
from textenvs.envs.base import check_bool
from textenvs.vector import as_sb3_vec_env

ALGOS = ("ppo", "maskable_ppo")
POLICIES = ("mlp", "lm_prior", "last_block")
PRIOR_POLICIES = ("lm_prior", "last_block")  # they read the LM's log-probabilities: no VecNormalize
MAX_NUM_ENVS = 1024
MAX_ROLLOUT_STEPS = 2**20
"""num_envs * n_steps at most: SB3's rollout buffer holds that many observations."""
MAX_LAYER_WIDTH = 8192
MAX_LAYERS = 16


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


@dataclass
class SB3Config:
    """How to build and train the SB3 model (anything else goes through ``policy_kwargs``)."""

    algo: str = "ppo"
    """``ppo`` (stable_baselines3.PPO) or ``maskable_ppo`` (sb3_contrib.MaskablePPO, edit envs)."""
    policy: str = "mlp"
    """``mlp`` (SB3's MlpPolicy) or ``lm_prior``: a policy that starts where the LM is, reading the
    env's ``candidates_obs=True`` block (no observation normalisation). With PPO on generation
    envs :class:`agents.lm_prior.LMPriorPolicy` (the LM's distribution over the actions); with
    MaskablePPO on edit envs made with ``flat_actions=True``
    :class:`agents.edit_prior.EditPriorPolicy` (stop at once: the LM's draft). ``last_block``
    (PPO, generation envs): :class:`agents.last_block.LastBlockPolicy`, a trainable copy of the
    LM's last block over the env's ``obs="context"`` observation, also starting at the LM."""
    num_envs: int = 8
    """Sub-envs of the batched vector env (one LM forward per step for all of them)."""
    n_steps: int = 64
    """Steps per sub-env per rollout (SB3's ``n_steps``)."""
    batch_size: int = 128
    """Minibatch size of the PPO update."""
    n_epochs: int = 4
    """Epochs over each rollout."""
    learning_rate: float = 3e-4
    """Adam learning rate."""
    gamma: float = 1.0
    """Discount; the metric is paid within short episodes."""
    gae_lambda: float = 0.95
    """GAE lambda."""
    ent_coef: float = 0.0
    """Entropy bonus. Keep it 0 or tiny: a whole episode's metric is at most 1, while 0.01 times the
    entropy of a few actions, paid every token, outweighs it."""
    kl_coef: float = 0.0
    """Token PPO's KL penalty in the reward (:class:`agents.lm_prior.KLPenalty`): each collected
    reward minus ``kl_coef * (log pi - log prior)`` of the action taken; PPO with the ``lm_prior``
    or ``last_block`` policy (0: none). :func:`train_callbacks` makes the callback."""
    seed: int = 0
    """Seed of SB3 and of the env resets."""
    normalize_obs: bool = True
    """Running mean / std normalisation of the hidden-state observations (SB3's VecNormalize):
    hidden states are unbounded and unevenly scaled across dimensions."""
    policy_kwargs: dict = field(default_factory=dict)
    """Passed to the policy (``net_arch``, ...)."""
    tensorboard_log: str | None = None
    """Folder for TensorBoard logs (None: no logging)."""

    def validate(self) -> None:
        check_bool("normalize_obs", self.normalize_obs)
        if self.algo not in ALGOS:
            raise ValueError(f"algo={self.algo!r} is not valid: choose one of {list(ALGOS)}.")
        if self.policy not in POLICIES:
            raise ValueError(
                f"policy={self.policy!r} is not valid: choose one of {list(POLICIES)}."
            )
        check_float("learning_rate", self.learning_rate, 0, 1, low_open=True)
        check_int("num_envs", self.num_envs, 1, MAX_NUM_ENVS)
        check_int("n_steps", self.n_steps, 1, MAX_ROLLOUT_STEPS)
        if self.num_envs * self.n_steps > MAX_ROLLOUT_STEPS:
            raise ValueError(
                f"num_envs * n_steps = {self.num_envs * self.n_steps} steps per rollout; at most "
                f"{MAX_ROLLOUT_STEPS} fit a rollout buffer: lower one of them."
            )
        check_int("batch_size", self.batch_size, 1, MAX_ROLLOUT_STEPS)
        check_int("n_epochs", self.n_epochs, 1, 10_000)
        check_float("gamma", self.gamma, 0, 1)
        check_float("gae_lambda", self.gae_lambda, 0, 1)
        check_float("ent_coef", self.ent_coef, 0)
        check_float("kl_coef", self.kl_coef, 0)
        check_int("seed", self.seed, 0, 2**32 - 1)
        check_optional_str("tensorboard_log", self.tensorboard_log)
        check_policy_kwargs(self.policy, self.algo, self.policy_kwargs)
        if self.kl_coef and (self.policy not in PRIOR_POLICIES or self.algo != "ppo"):
            raise ValueError(
                f"kl_coef={self.kl_coef} penalises the KL to the LM prior, which only PPO with "
                f"policy='lm_prior' or 'last_block' has (got algo={self.algo!r}, "
                f"policy={self.policy!r}): set kl_coef=0 or change the policy."
            )
        if self.policy == "last_block" and self.algo != "ppo":
            raise ValueError(
                "policy='last_block' acts on generation envs with PPO: use algo='ppo' (edit envs "
                "have policy='lm_prior' with MaskablePPO)."
            )


# The policy_kwargs each policy takes, by kind of value: classes (only from Python, never from a
# JSON config), objects, and the checks of plain values.
_CLASS_KWARGS = ("activation_fn", "features_extractor_class", "optimizer_class")
_DICT_KWARGS = ("features_extractor_kwargs", "optimizer_kwargs")
_SB3_KWARGS = {
    "net_arch": lambda v: _check_net_arch(v),
    "ortho_init": lambda v: check_bool("policy_kwargs['ortho_init']", v),
    "share_features_extractor": lambda v: check_bool(
        "policy_kwargs['share_features_extractor']", v
    ),
    "normalize_images": lambda v: check_bool("policy_kwargs['normalize_images']", v),
    "log_std_init": lambda v: check_float("policy_kwargs['log_std_init']", v),
}
_POLICY_KWARGS = {
    "mlp": {},
    "lm_prior": {
        "max_correction": lambda v: (
            v is None or check_float("policy_kwargs['max_correction']", v, 0, low_open=True)
        ),
        "candidate_features": lambda v: check_int(
            "policy_kwargs['candidate_features']", v, 0, 4096
        ),
        "prior_temperature": lambda v: check_float(
            "policy_kwargs['prior_temperature']", v, 0, low_open=True
        ),
        "kl_to_prior": lambda v: check_bool("policy_kwargs['kl_to_prior']", v),
        # EditPriorPolicy (MaskablePPO on an edit env)
        "max_len": lambda v: check_int("policy_kwargs['max_len']", v, 1, 1 << 16),
        "k": lambda v: check_int("policy_kwargs['k']", v, 1, 1 << 16),
        "stop_logit": lambda v: check_float("policy_kwargs['stop_logit']", v, 0, low_open=True),
    },
}
_POLICY_KWARGS["last_block"] = {
    **_POLICY_KWARGS["lm_prior"],
    "model": lambda v: v if isinstance(v, str) or hasattr(v, "model") else _bad_model(v),
}


def _bad_model(value) -> None:
    raise ValueError(
        f"policy_kwargs['model'] must be a model name, folder or LanguageModel, got {value!r}."
    )


def _check_net_arch(value) -> None:
    layers = value
    if isinstance(value, dict):
        if not set(value) <= {"pi", "vf"}:
            raise ValueError(
                f"policy_kwargs['net_arch'] as an object takes keys 'pi' and 'vf', got {value!r}."
            )
        layers = [*value.get("pi", []), *value.get("vf", [])]
        if not all(isinstance(v, list) for v in value.values()):
            raise ValueError(f"policy_kwargs['net_arch'] values must be lists, got {value!r}.")
    if not isinstance(layers, list) or len(layers) > 2 * MAX_LAYERS:
        raise ValueError(
            f"policy_kwargs['net_arch'] must be a list of at most {MAX_LAYERS} layer widths (or "
            f"{{'pi': [...], 'vf': [...]}}), got {value!r}."
        )
    for width in layers:
        check_int("a policy_kwargs['net_arch'] width", width, 1, MAX_LAYER_WIDTH)


def check_policy_kwargs(policy: str, algo: str, kwargs) -> None:
    """Every entry of ``policy_kwargs`` is one the policy takes, of the right type and range
    (a class only where a class goes: a JSON config cannot hold one)."""
    if not isinstance(kwargs, dict):
        raise ValueError(f"policy_kwargs must be a dict, got {kwargs!r}.")
    takes = {**_SB3_KWARGS, **_POLICY_KWARGS[policy]}
    for name, value in kwargs.items():
        if name in _CLASS_KWARGS:
            if not isinstance(value, type):
                raise ValueError(
                    f"policy_kwargs[{name!r}] must be a class (e.g. torch.nn.Tanh), got "
                    f"{value!r}: classes are passed from Python, a JSON config cannot name one."
                )
        elif name in _DICT_KWARGS:
            if not isinstance(value, dict):
                raise ValueError(f"policy_kwargs[{name!r}] must be a dict, got {value!r}.")
        elif name in takes:
            takes[name](value)
        else:
            known = sorted([*takes, *_CLASS_KWARGS, *_DICT_KWARGS])
            raise ValueError(
                f"policy_kwargs has {name!r}, which policy={policy!r} does not take: use one of "
                f"{known}."
            )


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


def save(model, path: str | Path, config: SB3Config, env_id: str, env_kwargs: dict) -> Path:
    """A checkpoint folder: SB3's ``model.zip``, ``sb3_config.json`` (how it was built) and, with
    observation normalisation, its statistics in ``obs_normalization.npz`` (no pickle).

    Crash-consistent (:func:`agents.checkpoint.save_atomically`): a process killed at any instant
    leaves the previous or the new checkpoint complete.
    """

    def write(folder: Path) -> None:
        model.save(folder / "model.zip")
        if normalizes(config):
            rms, venv = model.get_env().obs_rms, model.get_env()
            with open(folder / "obs_normalization.npz", "wb") as f:
                np.savez(
                    f,
                    mean=rms.mean,
                    var=rms.var,
                    count=rms.count,
                    clip_obs=venv.clip_obs,
                    epsilon=venv.epsilon,
                )
        meta = {"config": asdict(config), "env_id": env_id, "env_kwargs": env_kwargs}
        (folder / "sb3_config.json").write_text(json.dumps(meta, indent=1))

    return save_atomically(path, write)


def load(path: str | Path):
    """A model saved by :func:`save`, attached to a fresh train-split env; returns (model, meta).

    ``path`` is the checkpoint folder (or its ``model.zip``, which loads the folder). Every field of
    ``sb3_config.json`` and of the normalisation statistics is checked; an error names the file
    and the field. SB3's own ``PPO.load("folder/model.zip")`` gets the weights but not the
    observation statistics, so such a policy sees raw hidden states and scores far lower: load
    through here, or see :func:`normalizer`.
    """
    path = Path(path)
    if path.suffix == ".zip" and path.is_file():
        if path.name != "model.zip":
            raise ValueError(
                f"{path}: agents.sb3.load reads a checkpoint folder written by agents.sb3.save "
                f"(its model.zip beside sb3_config.json), not another zip; nothing was loaded. "
                f"Pass the folder, or load this file with SB3's own "
                f"{{PPO,MaskablePPO}}.load({str(path)!r}, env=...) if you trust it."
            )
        if not (path.parent / "sb3_config.json").is_file():
            raise ValueError(
                f"{path} has no sb3_config.json beside it, so the env it was trained on and its "
                "observation statistics are unknown: load it with SB3's own "
                f"{{PPO,MaskablePPO}}.load({str(path)!r}, env=...) and know that a model trained "
                "with observation normalisation scores lower without its statistics."
            )
        path = path.parent
    if recover(path) is None:
        raise FileNotFoundError(f"No SB3 checkpoint in {path}: write one with agents.sb3.save.")
    path = Path(path)
    meta = _read_meta(path / "sb3_config.json")
    config = SB3Config(**meta["config"])
    venv = make_vec_env(meta["env_id"], config.num_envs, "train", **meta["env_kwargs"])
    if normalizes(config):
        if not (path / "obs_normalization.npz").is_file():
            raise ValueError(
                f"{path}: sb3_config.json says normalize_obs but obs_normalization.npz is missing; "
                "the model cannot be evaluated as trained without it."
            )
        venv = normalizer(path, venv)
    zip_path = path / "model.zip"
    members = _zip_members(zip_path)
    _check_weights_present(zip_path, members, config, venv)
    data = _zip_data(zip_path, members)
    # SB3 keeps these fields of model.zip as cloudpickle, which runs code when unpickled: each is
    # rebuilt from sb3_config.json instead (custom_objects win over the pickled value and stop
    # SB3 from unpickling it), and a zip holding any other pickled field is refused unread.
    serialized = {k for k, v in data.items() if isinstance(v, dict) and ":serialized:" in v}
    unknown = sorted(serialized - set(REBUILT_FIELDS))
    if unknown:
        raise ValueError(
            f"{zip_path} holds pickled fields {unknown} that textenvs does not rebuild "
            "from sb3_config.json; unpickling them could run code, so nothing was loaded. Load "
            "only checkpoints written by agents.sb3.save (or SB3's PPO.load on a file you trust)."
        )
    fresh = _model_on(venv, meta["env_id"], config, meta["env_kwargs"])
    _check_member_sizes(zip_path, members, fresh)
    # SB3 sets every field of `data` on the model: each must be what sb3_config.json built (the
    # fresh model's value) or, for the training counters, a count in range.
    custom = {name: getattr(fresh, name) for name in REBUILT_FIELDS}
    custom.update(_checked_data_fields(zip_path, data, fresh, serialized))
    model = _algo_class(config.algo).load(zip_path, env=venv, custom_objects=custom)
    return quiet_logger(model, config.tensorboard_log), meta


# The fields of an SB3 model.zip that SB3 serialises with cloudpickle and :func:`load` rebuilds
# from the checkpoint's sb3_config.json (a fresh model of the same config and env). The rollout
# state of a model that has trained (its last observation and episode starts, the recent
# episodes' statistics) starts afresh, as in a new model: a further learn() resets the env.
REBUILT_FIELDS = (
    "policy_class",
    "policy_kwargs",
    "observation_space",
    "action_space",
    "lr_schedule",
    "learning_rate",
    "clip_range",
    "clip_range_vf",
    "rollout_buffer_class",
    "rollout_buffer_kwargs",
    "_last_obs",
    "_last_original_obs",
    "_last_episode_starts",
    "ep_info_buffer",
    "ep_success_buffer",
)


# The fields of model.zip's ``data`` that change as a model trains: kept from the file, checked.
COUNTER_FIELDS = {
    "num_timesteps": (0, 2**62),
    "_total_timesteps": (0, 2**62),
    "_num_timesteps_at_start": (0, 2**62),
    "_episode_num": (0, 2**62),
    "_n_updates": (0, 2**62),
    "start_time": (0, 2**63 - 1),
}
MAX_DATA_BYTES = 256 * 2**20
"""model.zip's ``data`` member (JSON; its pickled observations grow with num_envs) at most."""
SMALL_MEMBER_BYTES = 2**20


def _zip_members(zip_path: Path) -> dict[str, int]:
    """The members of an SB3 ``model.zip`` and their uncompressed sizes (read from its
    directory: nothing is inflated)."""
    try:
        with zipfile.ZipFile(zip_path) as archive:
            members = {info.filename: info.file_size for info in archive.infolist()}
    except (OSError, zipfile.BadZipFile) as e:
        raise ValueError(f"{zip_path} is not an SB3 model.zip ({e}).") from e
    if "data" not in members or "policy.pth" not in members:
        raise ValueError(f"{zip_path}: no 'data' or 'policy.pth' member; not an SB3 model.zip.")
    return members


def _zip_data(zip_path: Path, members: dict[str, int]) -> dict:
    """model.zip's ``data`` as JSON (nothing unpickled), read only when its size is sane."""
    if members["data"] > MAX_DATA_BYTES:
        raise ValueError(
            f"{zip_path}: member 'data' inflates to {members['data']} bytes (at most "
            f"{MAX_DATA_BYTES}); not read."
        )
    try:
        with zipfile.ZipFile(zip_path) as archive:
            data = json.loads(archive.read("data").decode("utf-8"))
    except (OSError, zipfile.BadZipFile, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{zip_path} is not an SB3 model.zip ({e}).") from e
    if not isinstance(data, dict):
        raise ValueError(f"{zip_path}: its 'data' entry is not a JSON object.")
    return data


def serialized_fields(zip_path: str | Path) -> set[str]:
    """The names of the pickled (cloudpickle) fields of an SB3 ``model.zip``, read as JSON: nothing
    is unpickled."""
    data = _zip_data(Path(zip_path), _zip_members(Path(zip_path)))
    return {k for k, v in data.items() if isinstance(v, dict) and ":serialized:" in v}


def _mlp_parameters(n_in: int, net_arch, n_out: int) -> int:
    """Parameters of SB3's MLP actor-critic for ``net_arch`` (a list, or {"pi", "vf"})."""
    arch = net_arch if isinstance(net_arch, dict) else {"pi": net_arch, "vf": net_arch}
    total = 0
    for key, head in (("pi", n_out), ("vf", 1)):
        width = n_in
        for layer in arch.get(key, []):
            total += (width + 1) * layer
            width = layer
        total += (width + 1) * head
    return total


def _check_weights_present(zip_path: Path, members: dict[str, int], config, venv) -> None:
    """Before anything is built: an MLP policy of the config's size has its weights in
    ``policy.pth`` (a config that names a huge network over a small file is refused unbuilt)."""
    if config.policy != "mlp":
        return  # the prior policies' trainable parts are small heads over the env's LM
    n_in = int(np.prod(venv.observation_space.shape))
    n_out = int(getattr(venv.action_space, "n", 0) or np.sum(venv.action_space.nvec))
    net_arch = config.policy_kwargs.get("net_arch", {"pi": [64, 64], "vf": [64, 64]})
    need = 4 * _mlp_parameters(n_in, net_arch, n_out)  # float32
    if members["policy.pth"] < need:
        raise ValueError(
            f"{zip_path}: sb3_config.json's policy (net_arch {net_arch}) has {need // 4} "
            f"parameters ({need} bytes), but policy.pth holds {members['policy.pth']} bytes; "
            "the config and the weights do not belong together, nothing was built."
        )


def _check_member_sizes(zip_path: Path, members: dict[str, int], fresh) -> None:
    """Each member inflates to no more than what the model of sb3_config.json writes (a zip
    bomb is refused before SB3 inflates it)."""
    params = sum(p.numel() * p.element_size() for p in fresh.policy.parameters())
    limits = {
        "policy.pth": params + SMALL_MEMBER_BYTES,
        "policy.optimizer.pth": 2 * params + SMALL_MEMBER_BYTES,  # Adam's two moments
        "data": MAX_DATA_BYTES,
    }
    for name, size in members.items():
        limit = limits.get(name, SMALL_MEMBER_BYTES)
        if size > limit:
            raise ValueError(
                f"{zip_path}: member {name!r} inflates to {size} bytes, more than the "
                f"{limit} that the model of sb3_config.json writes; not read."
            )


def _same_value(a, b) -> bool:
    """JSON ``a`` equals ``b`` in value and kind (a bool is not a number, NaN equals nothing)."""
    if isinstance(a, bool) or isinstance(b, bool):
        return a is b
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        return a == b
    return type(a) is type(b) and a == b


def _checked_data_fields(zip_path: Path, data: dict, fresh, serialized: set[str]) -> dict:
    """model.zip's plain fields, checked: a training counter must be an int in range; every
    other field must equal what the model of sb3_config.json holds. Returns the values to load
    (the fresh model's for the settings, so no value of the file reaches the model unchecked)."""
    values = {}
    for name, value in data.items():
        if name in serialized:
            continue  # rebuilt from sb3_config.json, never unpickled
        if name in COUNTER_FIELDS:
            low, high = COUNTER_FIELDS[name]
            if type(value) is not int or not low <= value <= high:
                raise ValueError(
                    f"{zip_path}: field {name!r} of its data is {value!r}; expected an int in "
                    f"[{low}, {high}]."
                )
            continue
        if name == "_current_progress_remaining":  # 1 - steps / total: below 0 past the total
            if type(value) not in (int, float) or not -(2.0**62) <= value <= 1:
                raise ValueError(
                    f"{zip_path}: field {name!r} of its data is {value!r}; expected a finite "
                    "number <= 1."
                )
            continue
        if name == "n_envs":  # SB3 sets it from the env it loads into
            continue
        if not hasattr(fresh, name):
            raise ValueError(
                f"{zip_path}: field {name!r} of its data is not a field of "
                f"{type(fresh).__name__}; not written by agents.sb3.save, nothing was loaded."
            )
        expected = getattr(fresh, name)
        if not _same_value(value, expected):
            raise ValueError(
                f"{zip_path}: field {name!r} of its data is {value!r}, but sb3_config.json "
                f"builds {expected!r}; the two files do not belong together, nothing was loaded."
            )
        values[name] = expected
    return values


def normalizer(path: str | Path, venv):
    """``venv`` wrapped in the observation normalisation saved in the checkpoint folder ``path``
    (frozen statistics), for a model loaded the SB3 way::

        model = MaskablePPO.load("ckpt/model.zip")
        venv = agents.sb3.normalizer("ckpt", agents.sb3.make_vec_env(env_id, 8, "test", **kw))

    ``venv`` is returned unchanged, with a warning, when the checkpoint has no statistics.
    """
    from stable_baselines3.common.vec_env import VecNormalize

    path = Path(path)
    if not (path / "obs_normalization.npz").is_file():
        warnings.warn(
            f"{path} holds no obs_normalization.npz: the model was trained without observation "
            "normalisation (or it was lost), so the env is returned as it is.",
            stacklevel=2,
        )
        return venv
    stats = _read_normalization(path / "obs_normalization.npz", venv.observation_space.shape)
    venv = VecNormalize(
        venv,
        norm_obs=True,
        norm_reward=False,
        clip_obs=float(stats["clip_obs"]),
        epsilon=float(stats["epsilon"]),
    )
    venv.obs_rms.mean, venv.obs_rms.var = stats["mean"], stats["var"]
    venv.obs_rms.count = float(stats["count"])
    venv.training = False
    return venv


def _read_meta(path: Path) -> dict:
    meta = read_json_object(path, "SB3 checkpoint config")
    for name, kind in (("config", dict), ("env_id", str), ("env_kwargs", dict)):
        if not isinstance(meta.get(name), kind):
            raise ValueError(
                f"{path}: field {name!r} is {meta.get(name)!r}; expected a {kind.__name__}."
            )
    if meta["env_id"] not in gym.registry:
        raise ValueError(
            f"{path}: field 'env_id' is {meta['env_id']!r}, which is not a registered id."
        )
    try:
        SB3Config(**meta["config"]).validate()
    except (TypeError, ValueError) as e:
        raise ValueError(f"{path}: field 'config' is not a valid SB3Config ({e}).") from e
    return meta


def _read_normalization(path: Path, shape: tuple[int, ...]) -> dict:
    array_bytes = 8 * int(np.prod(shape)) + 4096  # float64 and the .npy header
    check_zip_sizes(path, lambda _: array_bytes, "observation statistics file")
    try:
        with np.load(path, allow_pickle=False) as data:
            stats = {k: data[k] for k in ("mean", "var", "count", "clip_obs", "epsilon")}
    except (OSError, KeyError, ValueError, EOFError) as e:
        raise ValueError(f"{path}: not readable observation statistics ({e}).") from e
    for name in ("mean", "var"):
        if (
            stats[name].shape != shape
            or not np.issubdtype(stats[name].dtype, np.floating)
            or not np.isfinite(stats[name]).all()
        ):
            raise ValueError(f"{path}: field {name!r} must be finite floats of shape {shape}.")
    if (stats["var"] < 0).any():
        raise ValueError(f"{path}: field 'var' must be >= 0.")
    for name in ("count", "clip_obs", "epsilon"):
        value = stats[name]
        if value.shape != () or not np.issubdtype(value.dtype, np.number):
            raise ValueError(f"{path}: field {name!r} must be one number, got {value!r}.")
        stats[name] = value.item()
    # SB3's VecNormalize: (obs - mean) / sqrt(var + epsilon), clipped to [-clip_obs, clip_obs].
    # A NaN or negative clip makes every observation NaN or 0; epsilon must keep the root real
    # and stay a small stabiliser.
    check_float(f"{path}: field 'count'", stats["count"], 0, low_open=True)
    check_float(f"{path}: field 'clip_obs'", stats["clip_obs"], 0, low_open=True)
    check_float(f"{path}: field 'epsilon'", stats["epsilon"], 0, 1, low_open=True)
    return stats


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(
        description="Stable-Baselines3 PPO / MaskablePPO on a textenvs env."
    )
    p.add_argument("--env-id", default="textenvs/Summarize-v0")
    p.add_argument(
        "--algo",
        choices=ALGOS,
        default=None,
        help="default: maskable_ppo where the env offers action_masks() (edit envs), else ppo",
    )
    p.add_argument(
        "--policy",
        choices=POLICIES,
        default="mlp",
        help="lm_prior: start where the LM is (PPO on generation envs: its distribution; "
        "MaskablePPO on edit envs: its draft); adds candidates_obs=True to the env, and "
        "flat_actions=True to an edit env; last_block (generation envs): train a copy of the LM's "
        "last block, starting at the LM; adds obs='context', layer=-2, candidates_obs=True",
    )
    p.add_argument("--learning-rate", type=float_arg(0, 1, low_open=True), default=3e-4)
    p.add_argument("--gae-lambda", type=float_arg(0, 1), default=0.95)
    p.add_argument(
        "--kl-coef",
        type=float_arg(0),
        default=0.0,
        help="KL penalty to the LM in the reward (lm_prior / last_block with PPO)",
    )
    p.add_argument(
        "--prior-temperature",
        type=float_arg(0, low_open=True),
        default=None,
        help="sample the LM prior at this temperature (lm_prior / last_block with PPO)",
    )
    p.add_argument(
        "--context-positions",
        type=int_arg(),
        default=None,
        help="positions of the last_block policy's context observation (default: the longest "
        "prompt of the train and test splits plus --max-steps)",
    )
    p.add_argument("--total-steps", type=int_arg(), default=20_000)
    p.add_argument("--k", type=int_arg(), default=4, help="top-k actions / tokens")
    p.add_argument(
        "--max-steps", type=int_arg(), default=16, help="tokens / edits per episode at most"
    )
    p.add_argument("--num-envs", type=int_arg(), default=8)
    p.add_argument("--seed", type=int_arg(0, 2**32 - 1), default=0)
    p.add_argument("--tensorboard-log")
    p.add_argument("--save")
    p.add_argument("--eval-samples", type=int_arg(), default=200)
    args = p.parse_args(argv)
    if args.save:
        check_save_target(args.save)  # before training, not after
    env_kwargs = {"token_mode": "topk", "k": args.k, "max_steps": args.max_steps}
    env_kwargs.update(policy_env_kwargs(args.policy, args.env_id))
    if args.context_positions is not None and args.policy != "last_block":
        p.error("--context-positions applies to --policy last_block")
    if args.policy == "last_block":
        from agents.last_block import fitting_positions

        env_kwargs["context_positions"] = args.context_positions or fitting_positions(
            args.env_id, **env_kwargs
        )
    algo = args.algo or default_algo(args.env_id)
    policy_kwargs = {}
    if args.prior_temperature is not None:
        if args.policy not in PRIOR_POLICIES or algo != "ppo":
            p.error("--prior-temperature applies to PPO with --policy lm_prior or last_block")
        policy_kwargs["prior_temperature"] = args.prior_temperature
    config = SB3Config(
        algo=algo,
        policy=args.policy,
        num_envs=args.num_envs,
        learning_rate=args.learning_rate,
        gae_lambda=args.gae_lambda,
        kl_coef=args.kl_coef,
        seed=args.seed,
        policy_kwargs=policy_kwargs,
        tensorboard_log=args.tensorboard_log,
    )
    model = build(args.env_id, config, **env_kwargs)
    start = time.time()
    model.learn(
        args.total_steps, callback=[metric_callback(), *train_callbacks(config)], progress_bar=True
    )
    train_s = time.time() - start
    if args.save:
        save(model, args.save, config, args.env_id, env_kwargs)
    result = evaluate(model, args.env_id, "test", args.eval_samples, **env_kwargs)
    result.pop("metrics", None)
    result.update(train_seconds=round(train_s, 1), steps=args.total_steps, algo=config.algo)
    print(json.dumps(result))
    print(
        f"test {result.get('mean_metric', float('nan')):.4f} mean metric over {result['episodes']} "
        "test samples"
    )
    return result


if __name__ == "__main__":
    run_cli(main)  # a user error as one line, "error: ...", exit status 2
