"""SB3 checkpoint folders: ``model.zip``, ``sb3_config.json`` and the observation statistics,
saved crash-consistently and loaded without unpickling anything (:func:`load`): the zip's pickled
fields are rebuilt from the checked config, its plain fields must equal what the config builds,
its members' sizes are capped before anything inflates."""

from __future__ import annotations

import json
import warnings
import zipfile
from dataclasses import asdict
from pathlib import Path

import gymnasium as gym
import numpy as np

from agents.checkpoint import check_zip_sizes, read_json_object, recover, save_atomically
from agents.sb3.build import _algo_class, _model_on, make_vec_env, normalizes, quiet_logger
from agents.sb3.config import SB3Config
from textenvs.checks import check_float


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
