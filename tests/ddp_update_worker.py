"""One data-parallel token-PPO update on this process's share of a saved rollout.

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

from agents.token_ppo import Rollout, TokenPPO, TokenPPOConfig


def main(folder: str) -> None:
    folder = Path(folder)
    config = TokenPPOConfig(**json.loads((folder / "config.json").read_text()))
    accelerator = Accelerator(cpu=True)
    trainer = TokenPPO(config, accelerator=accelerator)
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
    if trainer.is_main:
        (folder / "stats_2.json").write_text(json.dumps({**stats, "world": trainer.world}))
        params = {k: v.detach().clone() for k, v in trainer.model.named_parameters()}
        params.update(
            {f"value_head.{k}": v.clone() for k, v in trainer.value_head.state_dict().items()}
        )
        save_file(params, folder / "params_2.safetensors")
    accelerator.wait_for_everyone()


if __name__ == "__main__":
    main(sys.argv[1])
