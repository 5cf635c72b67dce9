"""Sharded token PPO (FSDP2): parameters, gradients and optimizer states split over the processes.

``torch.distributed.fsdp.fully_shard`` shards each transformer block, then the LM as the root
of the blocks (its embeddings, final norm and LM head), and the value head as a root of its own.
A sharded forward gathers each block's parameters from every process, so every process must run
the same forwards. The update does (each process holds ``num_envs`` episodes: the same number of
minibatches), the rollout does not: each process generates its own episodes, which end after
different numbers of tokens.

Rollouts therefore run inside :func:`gathered`: every parameter is gathered once (one collective
per FSDP unit, the same on every process), the rollout's token-by-token forwards run on whole
parameters with no collective at all, so processes whose episodes end early simply stop, and the
parameters are freed again after it. Measured against the other way (every process steps until
all are done, one all-reduce of "any still running" per token plus the per-block gathers of
every forward), gathering once costs one full copy of the parameters during the rollout only,
while gradients and Adam states (three quarters of full fine-tuning's state) stay sharded
throughout, and it runs no collective per token (``benchmarks/scale.py`` reports both figures).

``fsdp_rollout="sharded"`` is that other way, for a model whose whole parameters do not fit a
process (:func:`in_lockstep`): the rollout's and the evaluation's forwards run on the sharded
units, each gathering one block at a time and freeing it after (the LM's root, its embeddings and
head, stays whole during the rollout), and the processes run their forwards in step, those that
finished early running stand-in forwards until every process has.

Checkpoints go through ``torch.distributed.checkpoint`` (each process writes its shards; the
metadata is JSON and nothing is unpickled on load: :mod:`agents.shards`) inside
the same write-aside, mark-complete, swap protocol as every other checkpoint
(:func:`agents.checkpoint.save_atomically_together`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch


def transformer_blocks(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The model's transformer blocks: modules of the classes transformers names in
    ``_no_split_modules`` (``GPT2Block``, ``LlamaDecoderLayer``, ...), the unit FSDP shards.
    """
    names = set(getattr(model, "_no_split_modules", None) or [])
    blocks = [m for m in model.modules() if type(m).__name__ in names]
    if not blocks:
        raise ValueError(
            f"{type(model).__name__} names no transformer block class (_no_split_modules is "
            f"{sorted(names)}): FSDP needs one to shard per block. Use a transformers causal LM "
            "that declares it, or train without --fsdp."
        )
    return blocks


def shard(model: torch.nn.Module, *heads: torch.nn.Module) -> list[torch.nn.Module]:
    """``fully_shard`` every transformer block of ``model``, then ``model`` itself (the
    embeddings, the final norm, the LM head), then each of ``heads`` (the value head) as a root
    of its own; returns the FSDP units, blocks first. Parameters become DTensors sharded on
    dim 0 over the default process group; build the optimizer after this.

    ``model`` is a root so that its first forward, whether the update's or the env's (which
    calls it directly), initialises every block under it.
    """
    from torch.distributed.fsdp import fully_shard

    units = []
    for block in transformer_blocks(model):
        fully_shard(block)
        units.append(block)
    for root in (model, *heads):
        fully_shard(root)
        units.append(root)
    return units


def weight_files(folder: str) -> dict[str, str]:
    """Each tensor name of a ``save_pretrained`` folder and the safetensors file that holds it
    (``model.safetensors``, or the files of ``model.safetensors.index.json``)."""
    import json
    import os

    index = os.path.join(folder, "model.safetensors.index.json")
    if os.path.isfile(index):
        with open(index, encoding="utf-8") as f:
            mapping = json.load(f).get("weight_map")
        if not isinstance(mapping, dict):
            raise ValueError(f"{index} has no weight_map: it is not a safetensors index.")
        return {name: os.path.join(folder, file) for name, file in mapping.items()}
    single = os.path.join(folder, "model.safetensors")
    if not os.path.isfile(single):
        raise ValueError(f"{folder} holds no model.safetensors: sharded loading reads safetensors.")
    from safetensors import safe_open

    with safe_open(single, framework="pt") as f:
        return {name: single for name in f.keys()}


@torch.no_grad()
def load_local_shards(model: torch.nn.Module, folder: str, device) -> None:
    """Fill a model that was built on the meta device and sharded (:func:`shard`) with its
    weights from ``folder``, each process reading only the rows of its own shards: no process
    ever holds the whole model.

    The parameters are first given empty storage on ``device`` (their local shards only); each is
    then read from the safetensors file as a slice: FSDP2 shards dim 0 as ``torch.chunk`` does,
    so process ``r`` of ``w`` holds rows ``r * ceil(n / w)`` onwards. Buffers keep their values.
    Raises a ValueError for a parameter the files lack or hold in another shape.
    """
    import math
    from contextlib import ExitStack

    import torch.distributed as dist
    from safetensors import safe_open
    from torch.distributed.tensor import DTensor, Shard

    buffers = {name: b.clone() for name, b in model.named_buffers() if b.device.type != "meta"}
    model.to_empty(device=device)
    if getattr(model.config, "tie_word_embeddings", False) and (
        model.get_output_embeddings().weight is not model.get_input_embeddings().weight
    ):  # the head would keep the empty storage's garbage: the file holds the embeddings only
        raise RuntimeError(
            "Giving the sharded model storage untied its LM head from its input embeddings."
        )
    for name, buffer in model.named_buffers():
        if name in buffers:
            buffer.copy_(buffers[name])
    files = weight_files(folder)
    rank, world = dist.get_rank(), dist.get_world_size()
    with ExitStack() as stack:
        opened = {}
        for name, param in model.named_parameters():
            if name not in files:
                raise ValueError(
                    f"{folder} has no tensor {name!r}: sharded loading reads a save_pretrained "
                    "folder of this model class, whose tensor names are its parameter names."
                )
            path = files[name]
            if path not in opened:
                opened[path] = stack.enter_context(safe_open(path, framework="pt"))
            stored = opened[path].get_slice(name)
            if tuple(stored.get_shape()) != tuple(param.shape):
                raise ValueError(
                    f"{name}: {tuple(stored.get_shape())} in {path}, {tuple(param.shape)} in the "
                    "model's config: save the model and its config together."
                )
            local = param.to_local() if isinstance(param, DTensor) else param
            if isinstance(param, DTensor):
                if tuple(param.placements) != (Shard(0),):
                    raise ValueError(f"{name} is sharded as {param.placements}, not on dim 0.")
                rows = math.ceil(param.shape[0] / world)
                start = min(rank * rows, param.shape[0])
                part = stored[start : start + local.shape[0]]
            else:
                part = stored[:]
            local.copy_(part)


@contextlib.contextmanager
def gathered(units: list[torch.nn.Module]) -> Iterator[None]:
    """Every unit's parameters whole for the duration (one all-gather per unit, collective: every
    process enters together); forwards inside run no collective and may differ in number
    between processes. The shards are freed on exit.
    """
    for unit in units:
        unit.set_reshard_after_forward(False)  # a block's forward keeps them whole
        unit.unshard()
    try:
        yield
    finally:
        for unit in units:
            unit.reshard()
            unit.set_reshard_after_forward(True)


@contextlib.contextmanager
def in_lockstep(model: torch.nn.Module, units: list[torch.nn.Module]) -> Iterator[None]:
    """Forwards of the sharded ``model`` that may differ in number between processes
    (collective: every process enters together).

    Inside, each forward of ``model`` first says so to the others (one all-reduce of "I run a
    forward"), then runs on the sharded units: FSDP gathers each block for its forward and frees
    it after, so no process holds the whole model. On leaving, a process whose forwards are
    done runs stand-in forwards (one token) for as long as any other process still runs a real
    one, so every process issues the same gathers in the same order; it leaves when every
    process is done. Only ``model``'s forwards may run inside (another unit's forward would not
    pair up with the others' gathers). On leaving, every unit is resharded.
    """
    import torch.distributed as dist

    device = next(p.device for p in model.parameters())
    state = {"standing_in": False}

    def announce(module, args, kwargs):
        if not state["standing_in"]:
            dist.all_reduce(torch.ones(1, device=device))  # "one more forward of mine"

    handle = model.register_forward_pre_hook(announce, prepend=True, with_kwargs=True)
    try:
        yield
        stand_in = torch.zeros(1, 1, dtype=torch.long, device=device)
        while True:  # done here: stand in while any other process still runs forwards
            running = torch.zeros(1, device=device)
            dist.all_reduce(running)
            if not running.item():
                break
            state["standing_in"] = True
            with torch.no_grad():
                model(input_ids=stand_in, use_cache=False)
            state["standing_in"] = False
    finally:
        handle.remove()
        for unit in units:
            unit.reshard()


def full_state_dict(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The whole (unsharded) state dict on the CPU of process 0, empty elsewhere (collective)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(
        module, options=StateDictOptions(full_state_dict=True, cpu_offload=True)
    )


def sharded_state(modules: dict[str, torch.nn.Module], optimizer, owner: str) -> dict:
    """What a sharded checkpoint holds: each module's sharded state dict, and the optimizer's
    (keyed by the parameter names of ``modules[owner]``, the module it trains).
    """
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_state_dict

    state = {}
    for name, module in modules.items():
        if name == owner:
            state[name], state["optimizer"] = get_state_dict(module, optimizer)
        else:
            state[name] = get_model_state_dict(module)
    return state


def save_shards(folder, state: dict) -> None:
    """Every process writes its shards of ``state`` into ``folder`` (collective); the metadata
    is JSON (:mod:`agents.shards`), so no load of it ever unpickles."""
    from agents import shards

    shards.save(state, folder)


def load_shards(folder, modules: dict[str, torch.nn.Module], optimizer, owner: str) -> dict:
    """Read a :func:`save_shards` checkpoint into copies of this run's sharded state (collective);
    nothing is replaced yet. Nothing is unpickled (:mod:`agents.shards`: JSON metadata, checked
    field by field; non-tensor values through ``torch.load(weights_only=True)``). Raises a
    ValueError for metadata we did not write, and what ``torch.distributed.checkpoint`` raises for
    a missing key or another shape.
    """
    from agents import shards

    state = sharded_state(modules, optimizer, owner)
    state = _copied(state)  # dcp loads in place: into copies, so a failure changes nothing
    shards.load(state, folder)
    return state


def apply_state(modules: dict[str, torch.nn.Module], optimizer, owner: str, state: dict) -> None:
    """Put a :func:`load_shards` state into the modules and the optimizer."""
    from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_state_dict

    for name, module in modules.items():
        if name == owner:
            set_state_dict(
                module,
                optimizer,
                model_state_dict=state[name],
                optim_state_dict=state["optimizer"],
            )
        else:
            set_model_state_dict(module, state[name])


def _copied(state):
    if isinstance(state, dict):
        return {k: _copied(v) for k, v in state.items()}
    if isinstance(state, list):
        return [_copied(v) for v in state]
    if isinstance(state, torch.Tensor):
        return state.detach().clone()
    return state
