"""``python -m agents.token_ppo``: train, evaluate before and after, report (JSON), checkpoint,
export. Every config field is a flag whose ``--help`` is the field's docstring."""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path

import numpy as np

from agents.checkpoint import check_save_target
from agents.cli import add_config_arguments, config_from_args
from agents.token_ppo.config import FIELD_CHECKS, TokenPPOConfig
from agents.token_ppo.runtime import make_accelerator
from agents.token_ppo.trainer import TokenPPO


def main(argv: list[str] | None = None) -> dict | None:
    """The CLI; under ``accelerate launch`` / ``torchrun`` every process runs it, process 0
    evaluates, prints and writes the report.
    """
    p = argparse.ArgumentParser(description="Token-level PPO: the language model is the policy.")
    add_config_arguments(p, TokenPPOConfig, FIELD_CHECKS)
    p.add_argument("--resume", help="a checkpoint folder to resume from")
    p.add_argument("--json-out", help="write the final report (JSON) here")
    p.add_argument(
        "--export",
        help="save the trained policy here as a plain save_pretrained folder (LoRA: merged)",
    )
    args = vars(p.parse_args(argv))
    resume, json_out, export = args.pop("resume"), args.pop("json_out"), args.pop("export")
    config = config_from_args(TokenPPOConfig, args)
    if export:
        check_save_target(export)  # before any work, not after training
    trainer = TokenPPO(config, accelerator=make_accelerator(config))
    if resume:
        trainer.load_checkpoint(resume)
    evaluates = trainer.is_main or bool(trainer.units)  # sharded: every process gathers
    before = trainer.evaluate() if not resume and evaluates else None
    trainer.runtime.wait()
    start = time.time()
    history = trainer.train()
    train_seconds = round(time.time() - start, 1)
    if export:
        trainer.export(export)
    after = trainer.evaluate() if evaluates else None
    report = None
    if trainer.is_main:
        report = {
            "env_id": trainer.config.env_id,
            "test_metric_before": before,
            "test_metric_after": after,
            "episodes": trainer.iteration * trainer.episodes_per_iteration,
            "processes": trainer.world,
            "lora_r": trainer.config.lora_r,
            "fsdp": trainer.config.fsdp,
            "train_seconds": train_seconds,
            "final_kl": history[-1]["kl"] if history else None,
            "max_kl": max(h["kl"] for h in history) if history else None,
            "completions_per_s": float(np.mean([h["completions_per_s"] for h in history]))
            if history
            else None,
        }
        print(json.dumps(report))
        if json_out:
            saved = {**report, "config": dataclasses.asdict(trainer.config), "history": history}
            Path(json_out).write_text(json.dumps(saved, indent=1))
    trainer.runtime.close()
    return report
