"""Tabular envs for Q-learning: a textenvs env made tabular (top-k tokens, edits flattened, the
hidden state discretized), and an env described in JSON and rebuilt from it (what a Q-learning
save holds)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import gymnasium as gym
from gymnasium import spaces

from textenvs.wrappers import DiscretizeObservation

_MAKE_WRAPPERS = {"PassiveEnvChecker", "OrderEnforcing", "TimeLimit", "EnvChecker"}


_REBUILT_WRAPPERS = ("FlattenEditActions", "DiscretizeObservation")


def find_wrapper(env: gym.Env, kind: type) -> gym.Env | None:
    """The outermost wrapper of class ``kind`` along ``env``'s chain, or None."""
    while env is not None:
        if isinstance(env, kind):
            return env
        env = getattr(env, "env", None)
    return None


def describe_env(env: gym.Env) -> dict | None:
    """``{"id", "kwargs", "wrappers"}`` of an env made by ``gym.make`` and wrapped only in
    FlattenEditActions / DiscretizeObservation, with JSON keyword arguments; None otherwise."""
    spec = env.unwrapped.spec
    if spec is None:
        return None
    wrappers, e = [], env
    while isinstance(e, gym.Wrapper):
        name = type(e).__name__
        if name in _REBUILT_WRAPPERS:
            wrappers.insert(0, name)
        elif name not in _MAKE_WRAPPERS:
            return None
        e = e.env
    try:
        kwargs = json.loads(json.dumps(spec.kwargs))
    except (TypeError, ValueError):  # a model object, a Task: not rebuildable from a file
        return None
    return {"id": spec.id, "kwargs": kwargs, "wrappers": wrappers}


def rebuild_env(path: Path, fields: dict, env: gym.Env | None, overrides: dict) -> gym.Env:
    """The env of a Q-learning save: ``env`` (with the saved discretizer around a Box one), or
    the saved id and wrappers rebuilt."""
    state = {
        k.removeprefix("discretizer_"): v for k, v in fields.items() if k.startswith("discretizer_")
    }
    if env is None:
        try:
            meta = json.loads(str(fields.get("env", "null")))
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: field 'env' is not JSON ({e}).") from e
        if meta is None:
            raise ValueError(
                f"{path} does not say how to rebuild its env (it was not made by gym.make with "
                "JSON keyword arguments): pass env= to QLearning.load."
            )
        if not (isinstance(meta, dict) and isinstance(meta.get("id"), str)):
            raise ValueError(f"{path}: field 'env' is {meta!r}; expected {{'id', 'kwargs', ...}}.")
        if meta["id"].startswith("textenvs/"):
            import textenvs  # noqa: F401  (registers the ids)
        env = gym.make(meta["id"], **{**meta.get("kwargs", {}), **overrides})
        if "FlattenEditActions" in meta.get("wrappers", []):
            from textenvs.wrappers import FlattenEditActions

            env = FlattenEditActions(env)
    elif overrides:
        raise ValueError("env_overrides apply only when the env is rebuilt: pass env=None.")
    if state and isinstance(env.observation_space, spaces.Box):
        try:
            env = DiscretizeObservation.from_state(env, state)
        except ValueError as e:
            raise ValueError(f"{path}: {e}") from e
    return env


def check_tabular(env: gym.Env) -> None:
    if not isinstance(env.observation_space, spaces.Discrete):
        raise ValueError(
            f"Tabular Q-learning needs a Discrete observation space, got {env.observation_space}: "
            "wrap the env with textenvs.wrappers.DiscretizeObservation(env, method='hash' or "
            "'kmeans')."
        )
    if not isinstance(env.action_space, spaces.Discrete):
        raise ValueError(
            f"Tabular Q-learning needs a Discrete action space, got {env.action_space}: use "
            "token_mode='topk' for generation envs or textenvs.wrappers.FlattenEditActions for "
            "edit envs."
        )


def make_tabular_env(
    env_id: str,
    split: str,
    k: int,
    discretizer: str,
    n_bits: int,
    n_clusters: int,
    seed: int,
    fitted=None,
    n_fit: int = 512,
    **kwargs,
) -> gym.Env:
    """A textenvs env made tabular: top-k tokens, edits flattened to one ``Discrete`` where the
    action is an
    ``(op, position, token)`` triple, and a discretizer of the hidden state (``fitted``: reuse one).
    """
    import textenvs  # noqa: F401  (registers the ids)
    from textenvs.wrappers import DiscretizeObservation, FlattenEditActions

    env = gym.make(env_id, split=split, token_mode="topk", k=k, **kwargs)
    if isinstance(env.action_space, spaces.MultiDiscrete):
        env = FlattenEditActions(env)
    return DiscretizeObservation(
        env,
        method=discretizer,
        n_bits=n_bits,
        n_clusters=n_clusters,
        seed=seed,
        fitted=fitted,
        n_fit=n_fit,
    )


def make_cli_env(args: argparse.Namespace, split: str, fitted=None) -> gym.Env:
    """The CLI's env: a textenvs id made tabular, or any other Gymnasium id as it is (its ``Box``
    observations discretized when it has them)."""
    from textenvs.wrappers import DiscretizeObservation

    if args.env_id.startswith("textenvs/"):
        kwargs = {"max_steps": args.max_steps, **args.env_kwargs}
        if args.model is not None:
            kwargs["model"] = args.model
        return make_tabular_env(
            args.env_id,
            split,
            args.k,
            args.discretizer,
            args.n_bits,
            args.n_clusters,
            args.seed,
            fitted=fitted,
            **kwargs,
        )
    env = gym.make(args.env_id, **args.env_kwargs)
    if isinstance(env.observation_space, spaces.Box):
        env = DiscretizeObservation(
            env,
            method=args.discretizer,
            n_bits=args.n_bits,
            n_clusters=args.n_clusters,
            seed=args.seed,
            fitted=fitted,
        )
    return env
