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
