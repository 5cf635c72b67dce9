"""One data-parallel (DDP, or sharded with fsdp=True) token-PPO update on this process's share of
a saved rollout.

Started by ``accelerate launch`` from tests/test_distributed.py: every process loads the same saved
global rollout, keeps its own rows (process r of W: rows r*n .. (r+1)*n), runs ``TokenPPO.update``
under an ``accelerate.Accelerator`` and process 0 writes the figures and the parameters.
"""

import json
import sys
from pathlib import Path

import torch
from accelerate import Accelerator
from safetensors.torch import save_file

from agents.fsdp import full_state_dict
from agents.token_ppo import Rollout, TokenPPO, TokenPPOConfig


def policy_parameters(trainer: TokenPPO) -> dict[str, torch.Tensor]:
    """The LM's parameters (tied ones once) and the value head's, whole, on process 0 (a sharded
    run gathers them: every process calls this)."""
    names = [name for name, _ in trainer.model.named_parameters()]
    if trainer.units:
        whole = full_state_dict(trainer.policy)
        lm = {name: whole[f"model.{name}"] for name in names} if trainer.is_main else {}
    else:
        lm = {name: p.detach().clone() for name, p in trainer.model.named_parameters()}
    values = {f"value_head.{k}": v.clone() for k, v in trainer.value_head.state_dict().items()}
    if trainer.units:
        values = {k: whole[k] for k in values} if trainer.is_main else {}
    return {**lm, **values}


def main(folder: str) -> None:
    folder = Path(folder)
    config = TokenPPOConfig(**json.loads((folder / "config.json").read_text()))
    accelerator = Accelerator(cpu=True)
    if config.fsdp and not config.lora_r:  # sharded full fine-tuning reads shards, never the whole
        from textenvs.lm import LanguageModel

        def whole_load(*args, **kwargs):
            raise AssertionError("a sharded run loaded the whole model in one process")

        LanguageModel._load = whole_load
    trainer = TokenPPO(config, accelerator=accelerator)
    if config.fsdp:  # really sharded: each process holds a part of every parameter
        p = trainer.model.transformer.h[0].attn.c_attn.weight
        assert type(p).__name__ == "DTensor" and p.to_local().numel() < p.numel(), type(p)
    whole = torch.load(folder / "rollout.pt", weights_only=True)
    n, r = config.num_envs, accelerator.process_index
    rows = slice(r * n, (r + 1) * n)
    rollout = Rollout(
        prompts=whole["prompts"][rows],
        tokens=whole["tokens"][rows],
        mask=whole["mask"][rows],
        logprobs=whole["logprobs"][rows],
        values=whole["values"][rows],
        env_rewards=whole["env_rewards"][rows],
        metrics=whole["metrics"][rows],
        texts=[""] * n,
    )
    stats = trainer.update(rollout)
    if config.fsdp:  # nothing stays gathered after the update: the reference's root included
        modules = [trainer.model] + ([trainer.reference] if trainer.reference is not None else [])
        whole = [
            n for m in modules for n, p in m.named_parameters() if type(p).__name__ != "DTensor"
        ]
        assert not whole, whole[:3]
    params = policy_parameters(trainer)  # collective when sharded
    if trainer.is_main:
        (folder / "stats_2.json").write_text(json.dumps({**stats, "world": trainer.world}))
        save_file(params, folder / "params_2.safetensors")
    accelerator.wait_for_everyone()
    accelerator.end_training()  # the process group torn down, not left to the exit


if __name__ == "__main__":
    main(sys.argv[1])
