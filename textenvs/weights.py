"""Model folders and safetensors files checked before anything is allocated.

A ``config.json`` decides how much memory ``from_pretrained`` allocates before a single weight
is read: a folder whose config names another architecture, or sizes far beyond its weights,
would allocate tens of GB for a file of a few MB. Here the safetensors headers are read (their
shapes only, no tensor), the model the config describes is built on the ``meta`` device (no
memory), and the two must agree before the real load; a damaged file (truncated, a dangling
symlink, a device or FIFO posing as weights) gets a message that names it.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import torch

MAX_CONFIG_BYTES = 16 * 2**20


def read_config(folder: str | os.PathLike) -> dict:
    """``<folder>/config.json`` as a JSON object; a ValueError naming the file otherwise."""
    path = Path(folder) / "config.json"
    regular_file(path, "model config")
    if path.stat().st_size > MAX_CONFIG_BYTES:
        raise ValueError(f"{path}: larger than {MAX_CONFIG_BYTES} bytes; not a model config.")
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        raise ValueError(f"{path}: not readable JSON ({e}); save the model again.") from e
    if not isinstance(config, dict):
        raise ValueError(
            f"{path}: expected a JSON object of model settings, got {type(config).__name__}; "
            "save the model again with save_pretrained."
        )
    return config


def regular_file(path: Path, what: str) -> Path:
    """``path`` if it is (or links to) a regular file; a ValueError that says what it is else."""
    if path.is_symlink() and not path.exists():
        raise ValueError(f"{path}: a symlink to {os.readlink(path)!r}, which does not exist.")
    if not path.exists():
        raise ValueError(f"{path}: missing; a {what} is needed there.")
    if not path.is_file():  # a folder, a device, a FIFO: reading it could hang or never end
        raise ValueError(f"{path}: not a regular file; a {what} must be one.")
    return path


def safetensors_shapes(path: str | os.PathLike) -> dict[str, tuple[int, ...]]:
    """Every tensor's shape in a safetensors file, from its header only (no tensor is read);
    a ValueError naming the file for a truncated or foreign one."""
    from safetensors import safe_open

    path = regular_file(Path(path), "safetensors weights file")
    try:
        with safe_open(str(path), framework="pt") as f:
            return {key: tuple(f.get_slice(key).get_shape()) for key in f.keys()}
    except Exception as e:  # SafetensorError (truncated, bad header), OSError
        raise ValueError(
            f"{path}: not a readable safetensors file ({type(e).__name__}: {e}); it may be "
            "truncated. Save or download it again."
        ) from e


def weight_files(folder: str | os.PathLike) -> list[Path]:
    """The safetensors files of a ``save_pretrained`` folder (one file, or the shards its index
    names, each a file inside the folder)."""
    folder = Path(folder)
    single = folder / "model.safetensors"
    if single.exists() or single.is_symlink():
        return [regular_file(single, "safetensors weights file")]
    index = folder / "model.safetensors.index.json"
    if not (index.exists() or index.is_symlink()):
        raise ValueError(
            f"{folder}: no model.safetensors (or model.safetensors.index.json); textenvs loads "
            "safetensors weights only. Save the model with "
            "save_pretrained(safe_serialization=True)."
        )
    regular_file(index, "safetensors index")
    try:
        weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        names = sorted(set(weight_map.values()))
    except (UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, AttributeError) as e:
        raise ValueError(f"{index}: not a safetensors index with a 'weight_map' ({e}).") from e
    for name in names:
        if not isinstance(name, str) or Path(name).name != name:
            raise ValueError(f"{index}: names {name!r}, which is not a file in {folder}.")
    return [regular_file(folder / name, "safetensors shard") for name in names]


def check_model_folder(folder: str | os.PathLike) -> None:
    """A local model folder's config describes the weights it holds: every weight the config's
    model has is present with its shape, and the model is no larger than its files (tied
    weights counted once). Checked on the ``meta`` device: nothing is allocated."""
    from transformers import AutoConfig, AutoModelForCausalLM

    folder = Path(folder)
    read_config(folder)
    shapes: dict[str, tuple[int, ...]] = {}
    for file in weight_files(folder):
        shapes.update(safetensors_shapes(file))
    try:
        config = AutoConfig.from_pretrained(folder, trust_remote_code=False)
        with torch.device("meta"):
            skeleton = AutoModelForCausalLM.from_config(config, trust_remote_code=False)
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise ValueError(
            f"{folder / 'config.json'}: not the config of a causal LM transformers ships ({e})."
        ) from e
    expected = skeleton.state_dict()
    present = sum(math.prod(s) for s in shapes.values())
    needed = sum(p.numel() for p in skeleton.parameters())  # tied weights once
    other = [k for k in expected if k in shapes and tuple(expected[k].shape) != shapes[k]]
    if other or needed > present:
        detail = (
            f"{other[0]} is {shapes[other[0]]} in the weights but "
            f"{tuple(expected[other[0]].shape)} by the config"
            if other
            else f"the config's model has {needed:,} parameters, the weights {present:,}"
        )
        raise ValueError(
            f"{folder}: config.json does not describe the weights beside it ({detail}); "
            "nothing was allocated. Save the model and its config together with save_pretrained."
        )


def load_matching(
    path: str | os.PathLike, expected: dict[str, torch.Tensor], device: str | torch.device
) -> dict[str, torch.Tensor]:
    """A safetensors file read as a state dict for a module whose state dict is ``expected``:
    names and shapes checked from the header first (nothing read if they differ); a name the
    file leaves out because its tensor is tied to another (``save_pretrained`` writes a tied
    embedding once) is filled from that one."""
    from safetensors.torch import load_file

    path = Path(path)
    shapes = safetensors_shapes(path)
    tied = _tied_names(expected)
    extra = sorted(set(shapes) - set(expected))
    missing = sorted(k for k in set(expected) - set(shapes) if not tied.get(k, set()) & set(shapes))
    other = sorted(k for k in set(shapes) & set(expected) if shapes[k] != tuple(expected[k].shape))
    if missing or extra or other:
        raise ValueError(
            f"{path}: does not fit this model (missing {missing[:3]}, unexpected {extra[:3]}, "
            f"other shapes {other[:3]}); nothing was loaded."
        )
    loaded = load_file(str(path), device=str(device))
    for name in set(expected) - set(loaded):
        loaded[name] = loaded[next(iter(tied[name] & set(loaded)))]
    return loaded


def _tied_names(state: dict[str, torch.Tensor]) -> dict[str, set[str]]:
    """For each name, the other names whose tensor shares its storage."""
    by_storage: dict[tuple, set[str]] = {}
    for name, tensor in state.items():
        key = (tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape))
        by_storage.setdefault(key, set()).add(name)
    return {name: group - {name} for group in by_storage.values() for name in group}
