"""``python -m agents.sb3``: train an SB3 agent on a textenvs id, evaluate it on the test split,
save it."""

from __future__ import annotations

import argparse
import json
import time

from agents.checkpoint import check_save_target
from agents.cli import add_config_arguments, config_from_args
from agents.common import result_line, with_text_stats
from agents.runs import add_output_flags, run_folder
from agents.sb3.build import (
    build,
    default_algo,
    evaluate,
    metric_callback,
    policy_env_kwargs,
    train_callbacks,
)
from agents.sb3.checkpoint import save
from agents.sb3.config import ALGOS, FIELD_CHECKS, POLICIES, PRIOR_POLICIES, SB3Config
from textenvs.cli import float_arg, int_arg, json_object


def parser() -> argparse.ArgumentParser:
    """The command line's flags: the env's (the same as every agent CLI's: ``--env-id``,
    ``--model``, ``--env-kwargs``), every :class:`SB3Config` field (its docstring its help), the
    run's (``--total-steps``, ``--save``, ``--eval-samples``)."""
    p = argparse.ArgumentParser(
        description="Stable-Baselines3 PPO / MaskablePPO on a textenvs env."
    )
    p.add_argument("--env-id", default="textenvs/Summarize-v0")
    p.add_argument(
        "--model",
        help="the env's LM: textenvs/tiny, a save_pretrained folder or a hub name "
        "(default: the id's own)",
    )
    p.add_argument(
        "--env-kwargs",
        type=json_object,
        default={},
        help="JSON of more env keyword arguments, e.g. '{\"dense\": false}' (over the flags)",
    )
    p.add_argument("--k", type=int_arg(), default=4, help="top-k actions / tokens")
    p.add_argument(
        "--max-steps", type=int_arg(), default=16, help="tokens / edits per episode at most"
    )
    p.add_argument(
        "--algo",
        choices=ALGOS,
        default=None,
        help="default: maskable_ppo where the env offers action_masks() (edit envs), else ppo",
    )
    p.add_argument(
        "--policy",
        choices=POLICIES,
        default="mlp",
        help="lm_prior: start where the LM is (PPO on generation envs: its distribution; "
        "MaskablePPO on edit envs: its draft); adds candidates_obs=True to the env, and "
        "flat_actions=True to an edit env; last_block (generation envs): train a copy of the LM's "
        "last block, starting at the LM; adds obs='context', layer=-2, candidates_obs=True",
    )
    add_config_arguments(p, SB3Config, FIELD_CHECKS, skip=("algo", "policy"))
    p.add_argument(
        "--prior-temperature",
        type=float_arg(0, low_open=True),
        default=None,
        help="sample the LM prior at this temperature (lm_prior / last_block with PPO)",
    )
    p.add_argument(
        "--context-positions",
        type=int_arg(),
        default=None,
        help="positions of the last_block policy's context observation (default: the longest "
        "prompt of the train and test splits plus --max-steps)",
    )
    p.add_argument("--total-steps", type=int_arg(), default=20_000)
    p.add_argument(
        "--save",
        help="write the trained agent into this folder (agents.sb3.load reads it; default: a new "
        "run folder, see --runs-dir)",
    )
    add_output_flags(p, "sb3")
    p.add_argument("--eval-samples", type=int_arg(), default=200)
    return p


def config_of(p: argparse.ArgumentParser, args: argparse.Namespace) -> tuple[SB3Config, dict]:
    """The SB3Config and env keyword arguments the flags ask for (a flag that does not apply to
    the policy is refused by ``p.error``)."""
    env_kwargs = {"token_mode": "topk", "k": args.k, "max_steps": args.max_steps}
    if args.model is not None:
        env_kwargs["model"] = args.model
    env_kwargs.update(args.env_kwargs)
    env_kwargs.update(policy_env_kwargs(args.policy, args.env_id))
    if args.context_positions is not None and args.policy != "last_block":
        p.error("--context-positions applies to --policy last_block")
    if args.policy == "last_block":
        from agents.last_block import fitting_positions

        env_kwargs["context_positions"] = args.context_positions or fitting_positions(
            args.env_id, **env_kwargs
        )
    fields = vars(args).copy()
    fields["algo"] = args.algo or default_algo(args.env_id)
    if args.prior_temperature is not None:
        if args.policy not in PRIOR_POLICIES or fields["algo"] != "ppo":
            p.error("--prior-temperature applies to PPO with --policy lm_prior or last_block")
        temperature = {"prior_temperature": args.prior_temperature}
        fields["policy_kwargs"] = {**args.policy_kwargs, **temperature}
    return config_from_args(SB3Config, fields), env_kwargs


def main(argv: list[str] | None = None) -> dict:
    """Train, save (``--save``), evaluate on the test split; the report as JSON."""
    p = parser()
    args = p.parse_args(argv)
    config, env_kwargs = config_of(p, args)  # flag refusals before any folder is made
    if args.save:
        check_save_target(args.save)  # before training, not after
    save_to = run_folder(p, args, "sb3", args.save) or args.save  # refuses --no-save + --save
    model = build(args.env_id, config, **env_kwargs)
    start = time.time()
    model.learn(
        args.total_steps, callback=[metric_callback(), *train_callbacks(config)], progress_bar=True
    )
    train_s = time.time() - start
    if save_to:
        save(model, save_to, config, args.env_id, env_kwargs)
    result = evaluate(model, args.env_id, "test", args.eval_samples, **env_kwargs)
    result.pop("metrics", None)
    with_text_stats(result)
    result.update(train_seconds=round(train_s, 1), steps=args.total_steps, algo=config.algo)
    if save_to:
        result["saved"] = str(save_to)
    print(json.dumps(result))
    print(result_line(result, "test samples"))
    if save_to:
        print(
            f"saved the agent in {save_to}; load it with\n"
            f"  from agents.sb3 import load; model, meta = load({str(save_to)!r})\n"
            "  action, _ = model.predict(obs, deterministic=True)"
        )
    return result
