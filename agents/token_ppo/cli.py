"""``python -m agents.token_ppo``: train, evaluate before and after, report (JSON), checkpoint,
export. Every config field is a flag whose ``--help`` is the field's docstring."""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import time
from pathlib import Path

import numpy as np

from agents.checkpoint import check_save_target
from agents.cli import add_config_arguments, config_from_args
from agents.common import with_text_stats
from agents.runs import add_output_flags, run_folder
from agents.token_ppo.config import FIELD_CHECKS, TokenPPOConfig
from agents.token_ppo.runtime import make_accelerator
from agents.token_ppo.trainer import TokenPPO


def parser() -> argparse.ArgumentParser:
    """Every :class:`TokenPPOConfig` field a flag, and the run's: ``--resume``, ``--json-out``,
    ``--export``, ``--runs-dir``, ``--no-save``."""
    p = argparse.ArgumentParser(description="Token-level PPO: the language model is the policy.")
    add_config_arguments(p, TokenPPOConfig, FIELD_CHECKS)
    p.add_argument("--resume", help="a checkpoint folder to resume from")
    p.add_argument(
        "--json-out",
        help="write the final report (JSON) here (default: report.json in the run folder)",
    )
    p.add_argument(
        "--export",
        help="save the trained policy here as a plain save_pretrained folder (LoRA: merged); "
        "default: policy/ in a new run folder, see --runs-dir",
    )
    add_output_flags(p, "token_ppo")
    return p


def main(argv: list[str] | None = None) -> dict | None:
    """The CLI; under ``accelerate launch`` / ``torchrun`` every process runs it, process 0
    evaluates, prints and writes the report.
    """
    p = parser()
    namespace = p.parse_args(argv)
    args = vars(namespace).copy()
    resume, json_out, export = args.pop("resume"), args.pop("json_out"), args.pop("export")
    for name in ("runs_dir", "no_save"):
        args.pop(name)
    config = config_from_args(TokenPPOConfig, args)
    if export:
        check_save_target(export)  # before any work, not after training
    # the run folder is process 0's (the one that writes); the others write nothing
    rank = int(os.environ.get("RANK", "0"))
    run = run_folder(p, namespace, "token_ppo", export) if rank == 0 else None
    export = export or (run / "policy" if run else None)
    json_out = json_out or (run / "report.json" if run else None)
    trainer = TokenPPO(config, accelerator=make_accelerator(config))
    if resume:
        trainer.load_checkpoint(resume)
    evaluates = trainer.is_main or bool(trainer.units)  # sharded: every process gathers
    before = trainer.evaluate() if not resume and evaluates else None
    trainer.runtime.wait()
    start = time.time()
    history = trainer.train()
    train_seconds = round(time.time() - start, 1)
    if not namespace.no_save:
        trainer.export(export)  # collective under FSDP: every process takes part
    final = trainer.evaluation() if evaluates else None
    after = float(np.mean(final["metrics"])) if final else None
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
            "learning_rate": trainer.learning_rate,  # learning_rate=None: chosen by size
            "model_parameters": trainer.model_parameters,
            "train_seconds": train_seconds,
            "final_kl": history[-1]["kl"] if history else None,
            "max_kl": max(h["kl"] for h in history) if history else None,
            "completions_per_s": float(np.mean([h["completions_per_s"] for h in history]))
            if history
            else None,
        }
        if final and "texts" in final:  # what the trained policy's greedy texts look like
            texts = {"texts": final["texts"], "prompts": final["prompts"]}
            report["test_text_stats"] = with_text_stats(texts, trainer.config.model)["text_stats"]
        if export:
            report["saved"] = str(export)
        print(json.dumps(report))
        if json_out:
            saved = {**report, "config": dataclasses.asdict(trainer.config), "history": history}
            Path(json_out).write_text(json.dumps(saved, indent=1))
        if after is not None:
            name = trainer.envs.unwrapped.envs[0].unwrapped.shaper.name
            if trainer.config.eval_reward:
                name = trainer.config.eval_reward
            print(
                f"test {name} {before if before is not None else float('nan'):.4f} -> "
                f"{after:.4f} (greedy decoding, mean over the first {trainer.config.eval_samples} "
                "test samples)"
            )
        if export:
            print(
                f"exported the policy to {export}; use it with\n"
                f"  gym.make({trainer.config.env_id!r}, model={str(export)!r})\n"
                f"  transformers.AutoModelForCausalLM.from_pretrained({str(export)!r})"
            )
    trainer.runtime.close()
    return report
