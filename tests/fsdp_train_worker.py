"""A sharded (fsdp=True) token-PPO run of 2 processes, started by ``accelerate launch`` from
tests/test_distributed.py.

``python tests/fsdp_train_worker.py FOLDER ITERATIONS [resume]`` trains ``ITERATIONS`` iterations
of the config in ``FOLDER/config.json`` (after resuming from ``FOLDER/ckpt`` with ``resume``),
saves a checkpoint there, exports the model to ``FOLDER/export`` and writes, from process 0, the
whole parameters (``params.safetensors``) and the report (``report.json``: each process's longest
episode per iteration, so the test sees that the processes ran different numbers of forwards;
the most transformer blocks any process held whole at once during its rollouts and evaluation).
"""

import json
import sys
from pathlib import Path

import torch
from accelerate import Accelerator
from ddp_update_worker import policy_parameters  # the same folder (the script's)
from safetensors.torch import save_file

from agents.token_ppo import TokenPPO, TokenPPOConfig


def watch_whole_blocks(blocks, seen: list[int], watching: dict) -> None:
    """At each block's forward while ``watching["on"]``, record how many ``blocks`` hold their
    whole parameters (FSDP2 swaps a sharded block's DTensors for plain tensors while it is
    gathered)."""
    from torch.distributed.tensor import DTensor

    def count(module, args):
        if watching["on"]:
            seen.append(sum(not isinstance(next(b.parameters()), DTensor) for b in blocks))

    for block in blocks:
        block.register_forward_pre_hook(count)


def main(folder: str, iterations: str, resume: str = "") -> None:
    folder = Path(folder)
    config = TokenPPOConfig(**json.loads((folder / "config.json").read_text()))
    accelerator = Accelerator(cpu=True)
    trainer = TokenPPO(config, accelerator=accelerator)
    if resume:
        trainer.load_checkpoint(folder / "ckpt")
    longest = []  # this process's longest episode in each rollout: its number of forwards
    collect = trainer.collect
    whole_blocks, watching = [], {"on": False}
    blocks = trainer.units[:-2]  # every block, then the LM's root and the value head
    watch_whole_blocks(blocks, whole_blocks, watching)

    def recorded():
        watching["on"] = True
        rollout = collect()
        watching["on"] = False
        longest.append(int(rollout.mask.sum(1).max()))
        return rollout

    trainer.collect = recorded
    trainer.train(progress=False, stop_after=int(iterations))
    trainer.save_checkpoint(folder / "ckpt")
    trainer.export(folder / "export")
    watching["on"] = True
    metric = trainer.evaluate(max_samples=2)
    watching["on"] = False
    everyone = [None] * trainer.world
    torch.distributed.all_gather_object(everyone, longest)
    most = [None] * trainer.world
    torch.distributed.all_gather_object(most, max(whole_blocks, default=0))
    params = policy_parameters(trainer)
    if trainer.is_main:
        save_file(params, folder / "params.safetensors")
        report = {
            "longest": everyone,
            "iteration": trainer.iteration,
            "metric": metric,
            "most_blocks_whole": most,
            "blocks": len(blocks),
        }
        (folder / "report.json").write_text(json.dumps(report))
    accelerator.wait_for_everyone()
    accelerator.end_training()  # the process group torn down, not left to the exit


if __name__ == "__main__":
    main(*sys.argv[1:])
