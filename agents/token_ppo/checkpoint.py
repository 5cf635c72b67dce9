"""Token-trainer checkpoints: whole (process 0 writes safetensors weights, the value head, the
optimizer and the trainer state) or sharded (every process writes its shards through
``torch.distributed.checkpoint``, the metadata JSON: :mod:`agents.shards`), and ``export`` (a
plain ``save_pretrained`` folder). Every save is crash-consistent
(:mod:`agents.checkpoint`); every load reads and checks every file against the trainer first
(names, shapes, ranges, finiteness) and replaces nothing unless all of it fits.

The trainer's :meth:`~agents.token_ppo.trainer.TokenPPO.save_checkpoint`,
:meth:`~agents.token_ppo.trainer.TokenPPO.load_checkpoint` and
:meth:`~agents.token_ppo.trainer.TokenPPO.export` call these.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import os
from pathlib import Path

import torch

from agents.checkpoint import (
    check_zip_sizes,
    read_json_object,
    recover,
    save_atomically,
)
from agents.token_ppo.config import ESTIMATOR_FIELDS, TokenPPOConfig
from agents.token_ppo.policy import add_lora
from textenvs.checks import check_float
from textenvs.lm import quiet_loading


def save(trainer, folder: str | os.PathLike) -> Path:
    """The policy (``save_pretrained``; with LoRA the adapter only), the value head
    (safetensors) and the trainer state; process 0 writes, the others wait for it.

    Crash-consistent (:func:`agents.checkpoint.save_atomically`): a process killed at any
    instant of the save leaves the previous or the new checkpoint complete and loadable.
    """
    from safetensors.torch import save_file, save_model

    if trainer.units:
        return save_sharded(trainer, folder)

    def write(tmp: Path) -> None:
        if trainer.peft is not None:  # adapter_model.safetensors + adapter_config.json
            trainer.peft.save_pretrained(tmp, safe_serialization=True)
        else:
            trainer.model.save_pretrained(tmp, safe_serialization=True)
            torch.save(trainer.reference.state_dict(), tmp / "reference.pt")
        trainer.lm.tokenizer.save_pretrained(tmp)
        save_file(
            {k: v.contiguous() for k, v in trainer.value_head.state_dict().items()},
            tmp / "value_head.safetensors",
        )
        torch.save(trainer.optimizer.state_dict(), tmp / "optimizer.pt")
        if trainer.masker is not None:  # NLPO's masking policy (tied weights written once)
            save_model(trainer.masker.lm.model, str(tmp / "nlpo_masker.safetensors"))
        (tmp / "trainer_state.json").write_text(json.dumps(trainer_state(trainer)))

    if trainer.is_main:
        with quiet_loading():  # no "Writing model shards" bar per checkpoint
            save_atomically(folder, write)
    trainer.runtime.wait()
    return Path(folder)


def trainer_state(trainer) -> dict:
    return {
        "iteration": trainer.iteration,
        "kl_coef": trainer.kl.value,
        "config": dataclasses.asdict(trainer.config),
        "model_signature": model_signature(trainer),
        "history": trainer.history,
        "sharded_processes": trainer.world if trainer.units else None,
    }


def sharded_modules(trainer) -> dict[str, torch.nn.Module]:
    modules = {"policy": trainer.policy}
    if trainer.reference is not None:
        modules["reference"] = trainer.reference
    return modules


def save_sharded(trainer, folder: str | os.PathLike) -> Path:
    """fsdp=True: every process writes its shards of the policy (value head included), the
    reference and the optimizer into ``shards/`` (``torch.distributed.checkpoint``); process
    0 adds the tokenizer and the trainer state; crash-consistent as every checkpoint."""
    from agents.checkpoint import save_atomically_together
    from agents.fsdp import save_shards, sharded_state

    state = sharded_state(sharded_modules(trainer), trainer.optimizer, "policy")

    def write_rest(tmp: Path) -> None:
        trainer.lm.tokenizer.save_pretrained(tmp)
        (tmp / "trainer_state.json").write_text(json.dumps(trainer_state(trainer)))

    save_atomically_together(
        folder,
        lambda tmp: save_shards(tmp / "shards", state),
        write_rest,
        trainer.is_main,
        trainer.runtime.wait,
    )
    return Path(folder)


def export(trainer, folder: str | os.PathLike | None) -> Path | None:
    """The trained policy as a plain ``save_pretrained`` folder (safetensors + tokenizer) that
    transformers and ``gym.make(id, model=folder)`` load; with LoRA, the adapter merged into a
    copy of the base weights (this trainer keeps its adapter and can go on training). Process 0
    writes ``folder``; the others may pass None (under FSDP they take part in the gathering).
    """
    if trainer.units:  # the whole model gathered onto process 0's CPU (collective)
        model = gathered_model(trainer)
    elif trainer.is_main:
        model = (
            trainer.model
            if trainer.peft is None
            else copy.deepcopy(trainer.peft).merge_and_unload()
        )
    if trainer.is_main:

        def write(tmp: Path) -> None:
            model.save_pretrained(tmp, safe_serialization=True)
            trainer.lm.tokenizer.save_pretrained(tmp)

        with quiet_loading():
            save_atomically(folder, write)
    trainer.runtime.wait()
    return Path(folder) if folder is not None else None


def gathered_model(trainer) -> torch.nn.Module | None:
    """fsdp=True: a plain (unsharded) copy of the policy's LM on process 0's CPU, LoRA merged;
    None on the other processes. Collective."""
    from transformers import AutoModelForCausalLM

    from agents.fsdp import full_state_dict

    whole = full_state_dict(trainer.policy)
    if not trainer.is_main:
        return None
    with quiet_loading():
        model = AutoModelForCausalLM.from_config(trainer.model.config)
    adapted = add_lora(model, trainer.config) if trainer.peft is not None else None
    model.load_state_dict(
        {k[len("model.") :]: v for k, v in whole.items() if k.startswith("model.")}
    )
    return model if adapted is None else adapted.merge_and_unload()


def load(trainer, folder: str | os.PathLike) -> None:
    """Resume from :func:`save`: same results as an uninterrupted run for the same seed.

    All or nothing: every file is read and checked against this trainer first (fields,
    tensor names and shapes, the optimizer's parameter groups), and only then is anything
    replaced; a damaged checkpoint raises ``ValueError`` naming the file and leaves the
    trainer as it was.
    """
    folder, state = _located(trainer, folder)
    if trainer.units:
        load_sharded(trainer, folder, state)
        return
    weights, optimizer, masker = _read_whole(trainer, folder)
    # Everything is readable and fits: now replace, in an order that cannot fail half-way.
    if trainer.peft is not None:
        from peft import set_peft_model_state_dict

        set_peft_model_state_dict(trainer.peft, weights["adapter_model.safetensors"])
    else:
        trainer.model.load_state_dict(weights["model.safetensors"])
        trainer.reference.load_state_dict(weights["reference.pt"])
    trainer.value_head.load_state_dict(weights["value_head.safetensors"])
    trainer.optimizer.load_state_dict(optimizer)
    if masker is not None:
        trainer.masker.lm.model = masker
    _set_progress(trainer, state)


def _located(trainer, folder: str | os.PathLike) -> tuple[Path, dict]:
    """The checkpoint folder (an interrupted save finished or undone first: process 0 puts the
    complete one in place) and its checked trainer state; refuses one written by another kind
    of run (sharded or not, another number of processes)."""
    if trainer.is_main:
        recover(folder)
    trainer.runtime.wait()
    if recover(folder) is None:
        raise FileNotFoundError(f"No checkpoint in {folder}: train with --checkpoint-dir first.")
    folder = Path(folder)
    if not (folder / "trainer_state.json").exists():
        raise FileNotFoundError(
            f"{folder} holds no token-PPO checkpoint (no trainer_state.json): pass a folder "
            "written by --checkpoint-dir (TokenPPO.save_checkpoint)."
        )
    state = read_trainer_state(trainer, folder / "trainer_state.json")
    written_by = state.get("sharded_processes")
    if bool(written_by) != bool(trainer.units) or (trainer.units and written_by != trainer.world):
        wrote = f"a sharded run on {written_by} processes" if written_by else "an unsharded run"
        runs = f"a sharded run on {trainer.world}" if trainer.units else "an unsharded run"
        raise ValueError(
            f"The checkpoint in {folder} was written by {wrote}; this is {runs}: resume with "
            "the same --fsdp and number of processes, or start from its --export (a plain "
            "model folder, --model)."
        )
    return folder, state


def _reader(folder: Path):
    """``read(name, loader)``: ``loader(folder / name)``, any failure a ValueError naming it."""

    def read(name: str, loader):
        try:
            return loader(folder / name)
        except Exception as e:  # any damage: a missing, truncated or foreign file
            raise ValueError(
                f"{folder / name}: cannot be read as part of a checkpoint ({type(e).__name__}: "
                f"{e}); the trainer was left unchanged. Resume from an intact checkpoint."
            ) from e

    return read


def _read_whole(trainer, folder: Path) -> tuple[dict, dict, torch.nn.Module | None]:
    """Every file of a whole checkpoint, read and checked: the state dicts by file name, the
    optimizer state, NLPO's masking model (a scratch copy) or None."""
    from safetensors.torch import load_file, load_model

    from textenvs.weights import load_matching

    read, device = _reader(folder), trainer.lm.device
    # the .pt files are zips: no member may inflate past what this trainer writes
    weight_bytes = sum(p.numel() * p.element_size() for p in trainer.model.parameters())
    trainable_bytes = sum(p.numel() * p.element_size() for p in trainer.trainable)
    for name, limit in (
        ("reference.pt", weight_bytes + 2**20),
        ("optimizer.pt", 2 * trainable_bytes + 2**20),  # Adam's two moments
    ):
        if (folder / name).is_file():
            read(name, lambda p, limit=limit: check_zip_sizes(p, lambda _: limit, "checkpoint"))
    expected, loaders = {}, {}
    if trainer.peft is not None:
        from peft import get_peft_model_state_dict

        expected["adapter_model.safetensors"] = get_peft_model_state_dict(trainer.peft)
        loaders["adapter_model.safetensors"] = lambda p: load_file(p, device=str(device))
    else:  # model.safetensors is checked against this model, never its config.json
        expected["model.safetensors"] = trainer.model.state_dict()
        expected["reference.pt"] = trainer.reference.state_dict()
        loaders["model.safetensors"] = lambda p: load_matching(
            p, expected["model.safetensors"], device
        )
        loaders["reference.pt"] = lambda p: torch.load(p, weights_only=True, map_location=device)
    expected["value_head.safetensors"] = trainer.value_head.state_dict()
    loaders["value_head.safetensors"] = lambda p: load_file(p, device=str(device))
    weights = {name: read(name, loader) for name, loader in loaders.items()}
    optimizer = read(
        "optimizer.pt", lambda p: torch.load(p, weights_only=True, map_location=device)
    )
    for name, loaded in weights.items():
        _check_state_dict(folder / name, loaded, expected[name])
    check_adam_state(folder / "optimizer.pt", optimizer, trainer.optimizer)
    masker = None
    if trainer.masker is not None:  # into a scratch copy: checked before anything is replaced
        masker = copy.deepcopy(trainer.masker.lm.model)
        read("nlpo_masker.safetensors", lambda p: load_model(masker, str(p), strict=True))
    return weights, optimizer, masker


def _set_progress(trainer, state: dict) -> None:
    trainer.iteration, trainer.kl.value, trainer.history = (
        state["iteration"],
        state["kl_coef"],
        state["history"],
    )


def load_sharded(trainer, folder: Path, state: dict) -> None:
    """fsdp=True: read every shard into copies first (a damaged checkpoint leaves the trainer
    as it was), then replace. Collective."""
    from agents.fsdp import apply_state, load_shards

    modules = sharded_modules(trainer)
    try:
        loaded = load_shards(folder / "shards", modules, trainer.optimizer, "policy")
    except Exception as e:  # missing shards, other keys or shapes, truncated files
        raise ValueError(
            f"{folder / 'shards'}: cannot be read as this run's sharded checkpoint "
            f"({type(e).__name__}: {e}); the trainer was left unchanged."
        ) from e
    apply_state(modules, trainer.optimizer, "policy", loaded)
    _set_progress(trainer, state)


def read_trainer_state(trainer, path: Path) -> dict:
    """``trainer_state.json``, every field checked; an error names the field and the file."""
    state = read_json_object(path, "trainer state")
    checks = {
        "iteration": lambda v: type(v) is int and 0 <= v <= trainer.iterations,
        "kl_coef": lambda v: type(v) in (int, float) and math.isfinite(v) and v >= 0,
        "history": lambda v: (
            isinstance(v, list)
            and len(v) == state.get("iteration")
            and all(_is_history_record(h, i) for i, h in enumerate(v))
        ),
        "config": lambda v: isinstance(v, dict),
        "model_signature": lambda v: isinstance(v, dict),
    }
    expected = {
        "iteration": f"an int in [0, {trainer.iterations}] (this run's iterations)",
        "kl_coef": "a finite number >= 0",
        "history": "one record per iteration done, each with its iteration, episodes, "
        "metric and kl (finite numbers), every value a number",
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
    processes = state.get("sharded_processes")
    if processes is not None and not (type(processes) is int and processes >= 1):
        raise ValueError(
            f"{path}: field 'sharded_processes' is {processes!r}; expected null or an int >= 1."
        )
    if state["model_signature"] != model_signature(trainer):
        raise ValueError(
            f"The checkpoint in {path.parent} is for another model "
            f"({state['model_signature']}), not {model_signature(trainer)}: resume with the same "
            "--model it was trained from."
        )
    for name, trained, ours in estimator_differences(state["config"], trainer.config):
        raise ValueError(  # a checkpoint of another algorithm is not this run's
            f"The checkpoint in {path.parent} was trained with {name}={trained!r}, this "
            f"run has {name}={ours!r}: resume with the same --{name.replace('_', '-')}."
        )
    trained_r = state["config"].get("lora_r", 0)
    if trained_r != trainer.config.lora_r:
        raise ValueError(
            f"The checkpoint in {path.parent} was trained with lora_r={trained_r}, this "
            f"trainer has lora_r={trainer.config.lora_r}: resume with the same --lora-r."
        )
    return state


def model_signature(trainer) -> dict:
    cfg = trainer.model.config
    return {
        "model_type": cfg.model_type,
        "vocab_size": trainer.lm.vocab_size,
        "hidden_size": trainer.lm.hidden_size,
        "num_hidden_layers": trainer.lm.n_layers,
    }


ADAM_GROUP_CHECKS = {
    "lr": lambda v: check_float("lr", v, 0, low_open=True),
    "eps": lambda v: check_float("eps", v, 0, low_open=True),
    "weight_decay": lambda v: check_float("weight_decay", v, 0),
    "betas": lambda v: [check_float("betas", b, 0, 1, high_open=True) for b in _pair(v)],
    "initial_lr": lambda v: check_float("initial_lr", v, 0, low_open=True),
}


def _pair(value) -> tuple:
    if not (isinstance(value, (tuple, list)) and len(value) == 2):
        raise ValueError(f"betas must be a pair of numbers, got {value!r}.")
    return tuple(value)


def check_adam_state(path: Path, loaded, optimizer: torch.optim.Optimizer) -> None:
    """An Adam ``state_dict`` read from ``path`` fits ``optimizer`` exactly: the same groups,
    keys and parameters, every hyperparameter in range (lr, eps > 0, betas in [0, 1), ...), every
    moment of its parameter's shape, finite (the second moment >= 0), every step a finite count;
    else a ValueError naming the file and the field, before anything is replaced."""

    def fail(field: str, problem: str):
        raise ValueError(f"{path}: field {field} {problem}; the trainer was left unchanged.")

    expected = optimizer.state_dict()
    if not isinstance(loaded, dict) or set(loaded) != {"state", "param_groups"}:
        fail("(top level)", "is not an optimizer state (keys 'state' and 'param_groups')")
    groups, state = loaded["param_groups"], loaded["state"]
    if not isinstance(groups, list) or len(groups) != len(expected["param_groups"]):
        fail("'param_groups'", f"is not a list of {len(expected['param_groups'])} groups")
    params = [p for group in optimizer.param_groups for p in group["params"]]
    ids = [i for group in expected["param_groups"] for i in group["params"]]
    shapes = {i: tuple(p.shape) for i, p in zip(ids, params)}
    for g, (group, want) in enumerate(zip(groups, expected["param_groups"])):
        if not isinstance(group, dict) or set(group) != set(want):
            fail(f"'param_groups'[{g}]", f"does not have the keys {sorted(want)}")
        if group["params"] != want["params"]:
            fail(f"'param_groups'[{g}]['params']", "names other parameters than this trainer's")
        for key, value in group.items():
            try:
                if key in ADAM_GROUP_CHECKS:
                    ADAM_GROUP_CHECKS[key](value)
                elif key != "params" and type(value) is not type(want[key]):
                    raise ValueError(f"expected a {type(want[key]).__name__}, got {value!r}")
            except ValueError as e:
                fail(f"'param_groups'[{g}][{key!r}]", f"is out of range ({e})")
    if not isinstance(state, dict) or not set(state) <= set(shapes):
        fail("'state'", "names parameters this trainer does not have")
    for index, entry in state.items():
        where = f"'state'[{index}]"
        if not isinstance(entry, dict) or not {"step", "exp_avg", "exp_avg_sq"} <= set(entry):
            fail(where, "is not an Adam state (step, exp_avg, exp_avg_sq)")
        for key, value in entry.items():
            if not isinstance(value, torch.Tensor) or not value.is_floating_point():
                fail(f"{where}[{key!r}]", f"is not a float tensor ({type(value).__name__})")
            wanted = () if key == "step" else shapes[index]
            if tuple(value.shape) != wanted:
                fail(f"{where}[{key!r}]", f"has shape {tuple(value.shape)}, not {wanted}")
            if not torch.isfinite(value).all() or (key != "exp_avg" and (value < 0).any()):
                fail(f"{where}[{key!r}]", "holds a non-finite or negative value")


HISTORY_KEYS = ("iteration", "episodes", "metric", "kl")


def _is_history_record(record, i: int) -> bool:
    """Record ``i`` of a trainer's history: its iteration ``i``, the keys reports read (finite),
    numbers only (a figure with nothing to measure, GRPO's explained variance, is NaN)."""
    return (
        isinstance(record, dict)
        and all(k in record and type(record[k]) in (int, float) for k in HISTORY_KEYS)
        and all(math.isfinite(record[k]) for k in HISTORY_KEYS)
        and record["iteration"] == i
        and all(type(v) in (int, float) for v in record.values())
    )


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
    broken = sorted(
        k for k, v in loaded.items() if v.is_floating_point() and not torch.isfinite(v).all()
    )
    if broken:
        raise ValueError(
            f"{path}: weights {broken[:3]} hold NaN or infinite values; the trainer was left "
            "unchanged. Resume from an intact checkpoint."
        )


# what a checkpoint's config meant by a field it lacks: the defaults of the version that wrote it
_BEFORE_AUTO_KL = {"kl_placement": "reward", "kl_estimator": "k1"}


def estimator_differences(
    trained: dict, config: TokenPPOConfig
) -> list[tuple[str, object, object]]:
    """``(field, the checkpoint's value, this run's)`` of each :data:`ESTIMATOR_FIELDS` field in
    which a checkpoint's algorithm differs from this run's, the KL's ``auto`` resolved on both
    sides (a checkpoint with ``kl_placement="loss"`` resumes under ``auto`` with GRPO)."""
    defaults = TokenPPOConfig()
    fields = {
        name: trained.get(name, _BEFORE_AUTO_KL.get(name, getattr(defaults, name)))
        for name in ESTIMATOR_FIELDS
    }
    theirs = dataclasses.replace(defaults, **fields)
    resolved = {
        "kl_placement": (theirs.kl_settings()[0], config.kl_settings()[0]),
        "kl_estimator": (theirs.kl_settings()[1], config.kl_settings()[1]),
    }
    out = []
    for name in ESTIMATOR_FIELDS:
        pair = resolved.get(name, (fields[name], getattr(config, name)))
        if pair[0] != pair[1]:
            out.append((name, *pair))
    return out
