"""Tabular Q-learning over Gymnasium envs with Discrete observation and action spaces.

Works on any such env (ours after :class:`textenvs.wrappers.DiscretizeObservation` with
``token_mode="topk"`` or :class:`textenvs.wrappers.FlattenEditActions`, or gymnasium's FrozenLake)
and reaches it only through the Gymnasium API: ``reset``, ``step``, the spaces, and an optional
``action_masks()``.

Run ``python -m agents.qlearning --env-id textenvs/Summarize-v0 --total-steps 20000``: it trains on
the train split with a progress bar, then prints the mean metric over the test split.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from dataclasses import dataclass
from pathlib import Path

import gymnasium as gym
import numpy as np
from tqdm import tqdm

from agents.checkpoint import check_zip_sizes, replace_file_atomically
from agents.cli import add_config_arguments, config_from_args
from agents.common import evaluate_policy, metric_of, result_line, with_text_stats
from agents.runs import add_output_flags, run_folder
from agents.tabular import (  # noqa: F401  (make_tabular_env: importable from here, as before)
    check_tabular,
    describe_env,
    find_wrapper,
    make_cli_env,
    make_tabular_env,
    rebuild_env,
)
from textenvs.checks import SEED, check_bool, check_optional_str, floats
from textenvs.cli import int_arg, json_object, run_cli
from textenvs.wrappers import DiscretizeObservation, find_action_masks

# Every numeric field's type and range: checked by QLearningConfig.validate() (a config from
# Python or from a save) and by the command line's flags.
FIELD_CHECKS = {
    "learning_rate": floats(0, 1, low_open=True),
    "gamma": floats(0, 1),
    "epsilon_start": floats(0, 1),
    "epsilon_end": floats(0, 1),
    "epsilon_decay_fraction": floats(0, 1),
    "initial_q": floats(-1e6, 1e6),
    "lm_prior": floats(0, 1000),
    "seed": SEED,
}


@dataclass
class QLearningConfig:
    """Hyper-parameters of tabular Q-learning."""

    learning_rate: float = 0.1
    """alpha in Q(s,a) += alpha * (r + gamma * max_a' Q(s',a') - Q(s,a)); in (0, 1]."""
    gamma: float = 1.0
    """Discount; episodes are short and the metric is paid within them, so 1.0 is the default."""
    epsilon_start: float = 1.0
    """Exploration rate at the first step."""
    epsilon_end: float = 0.05
    """Exploration rate after the decay."""
    epsilon_decay_fraction: float = 0.5
    """Fraction of ``total_steps`` over which epsilon decays linearly from start to end."""
    initial_q: float = 0.0
    """Initial value of every table entry (optimism encourages exploration)."""
    use_action_masks: bool = True
    """Restrict exploration and the greedy choice to ``env.action_masks()`` when the env has it."""
    require_action_masks: bool = False
    """Fail at construction when the env offers no ``action_masks()``."""
    lm_prior: float = 0.0
    """Weight of the LM's preference in every greedy choice; 0 turns it off. Generation envs in
    top-k mode: the LM's log-probabilities of the actions (their documented
    ``action_logprobs()``). Edit envs with flattened actions: 1 for stop (flat index 0, keeping the
    text, which starts as the LM's draft), 0 for every edit. The agent then starts as the greedy
    LM, and unvisited states and ties follow the LM instead of a coin."""
    seed: int = 0
    """Seed of exploration and of the env resets."""
    tensorboard_log: str | None = None
    """TensorBoard log folder (None: no logging): each episode's return and task metric, the
    exploration rate and the states visited, against env steps."""

    def validate(self) -> None:
        for name in ("use_action_masks", "require_action_masks"):
            check_bool(name, getattr(self, name))
        check_optional_str("tensorboard_log", self.tensorboard_log)
        for name, check in FIELD_CHECKS.items():
            check(name, getattr(self, name))


def q_update(
    q: np.ndarray,
    s: int,
    a: int,
    r: float,
    s_next: int,
    terminal: bool,
    alpha: float,
    gamma: float,
    next_mask: np.ndarray | None = None,
) -> float:
    """One Q-learning update in place; returns the TD error.

    A terminal transition bootstraps nothing; a truncated one (time limit) still bootstraps, since
    the state itself is not terminal. ``next_mask`` restricts the max to valid next actions.
    """
    if terminal:
        target = r
    else:
        next_q = q[s_next] if next_mask is None or not next_mask.any() else q[s_next][next_mask]
        target = r + gamma * float(next_q.max())
    td = target - q[s, a]
    q[s, a] += alpha * td
    return float(td)


class QLearning:
    """Tabular Q-learning agent.

    Args:
        env: An env with ``Discrete`` observation and action spaces.
        config: Hyper-parameters.

    Raises:
        ValueError: for a Box observation space (wrap it with DiscretizeObservation), a
            non-Discrete action space (use token_mode="topk" or FlattenEditActions), a missing
            action mask when required, or a bad hyper-parameter.
    """

    def __init__(self, env: gym.Env, config: QLearningConfig | None = None) -> None:
        self.config = config or QLearningConfig()
        self.config.validate()
        check_tabular(env)
        self.env = env
        self.n_states, self.n_actions = int(env.observation_space.n), int(env.action_space.n)
        self.masks = find_action_masks(env) if self.config.use_action_masks else None
        if self.config.require_action_masks and self.masks is None:
            raise ValueError(
                f"require_action_masks=True but {env} has no action_masks(): wrap an edit env with "
                "textenvs.wrappers.FlattenEditActions, or set require_action_masks=False."
            )
        if self.config.lm_prior and not self._has_lm_prior(env):
            raise ValueError(
                f"lm_prior={self.config.lm_prior} needs a generation env in top-k mode (its "
                "actions are the LM's candidates) or an edit env with flattened actions (stop "
                "keeps the LM's draft); set lm_prior=0 for other envs."
            )
        self.q = np.full((self.n_states, self.n_actions), self.config.initial_q, dtype=np.float64)
        self.rng = np.random.default_rng(self.config.seed)
        self.steps = 0

    def epsilon(self, step: int, total_steps: int) -> float:
        c = self.config
        decay = max(1, int(c.epsilon_decay_fraction * total_steps))
        return c.epsilon_end + (c.epsilon_start - c.epsilon_end) * max(0.0, 1 - step / decay)

    def act(
        self,
        state: int,
        epsilon: float = 0.0,
        mask: np.ndarray | None = None,
        env: gym.Env | None = None,
        rng: np.random.Generator | None = None,
    ) -> int:
        """Epsilon-greedy over the valid actions; ``env``: the env the state is from (for the LM
        prior; default the training env). ``rng``: the generator of the epsilon draw and the
        tie-break (default the learner's own); an evaluation passes its own, so evaluating during
        training leaves the training trajectory unchanged."""
        rng = self.rng if rng is None else rng
        valid = (
            np.flatnonzero(mask) if mask is not None and mask.any() else np.arange(self.n_actions)
        )
        if rng.random() < epsilon:
            return int(rng.choice(valid))
        values = self.q[state, valid]
        if self.config.lm_prior:
            values = values + self.config.lm_prior * self._lm_prior(env or self.env)[valid]
        return int(valid[rng.choice(np.flatnonzero(values == values.max()))])  # random tie-break

    @staticmethod
    def _has_lm_prior(env: gym.Env) -> bool:
        from textenvs.envs.edit import TextEditEnv

        inner = env.unwrapped
        if isinstance(inner, TextEditEnv):
            return True  # its actions are flattened (Q-learning needs Discrete): 0 is stop
        return getattr(inner, "token_mode", None) == "topk" and hasattr(inner, "action_logprobs")

    def _lm_prior(self, env: gym.Env) -> np.ndarray:
        """``(n_actions,)``: the LM's preference over the actions (see ``QLearningConfig``)."""
        inner = env.unwrapped
        if hasattr(inner, "action_logprobs"):
            return inner.action_logprobs()
        prior = np.zeros(self.n_actions)
        prior[0] = 1.0  # stop: the edit env's text as it is, the LM's draft at the start
        return prior

    def _mask(self) -> np.ndarray | None:
        return np.asarray(self.masks(), dtype=bool) if self.masks is not None else None

    def learn(
        self, total_steps: int, progress: bool = False, callback=None, callback_every: int = 0
    ) -> list[dict]:
        """Train for ``total_steps`` env steps; returns one record per finished episode.

        ``callback(steps_done)`` is called every ``callback_every`` steps (evaluation points of a
        learning curve); it must not step this agent's env.
        """
        if total_steps < 1:
            raise ValueError(f"total_steps must be >= 1, got {total_steps}.")
        state, _ = self.env.reset(seed=self.config.seed)
        episodes, ret = [], 0.0
        bar = tqdm(total=total_steps, disable=not progress, desc="q-learning")
        writer = None
        if self.config.tensorboard_log:
            from torch.utils.tensorboard import SummaryWriter

            writer = SummaryWriter(self.config.tensorboard_log)
        for step in range(total_steps):
            mask = self._mask()
            action = self.act(state, self.epsilon(step, total_steps), mask)
            next_state, reward, terminated, truncated, info = self.env.step(action)
            next_mask = None if terminated or truncated else self._mask()
            q_update(
                self.q,
                state,
                action,
                reward,
                next_state,
                terminated,
                self.config.learning_rate,
                self.config.gamma,
                next_mask,
            )
            ret += reward
            self.steps += 1
            state = next_state
            if terminated or truncated:
                episodes.append({"step": step + 1, "return": ret, **metric_of(info)})
                bar.set_postfix(ret=f"{np.mean([e['return'] for e in episodes[-50:]]):.3f}")
                if writer is not None:
                    at = self.steps
                    writer.add_scalar("qlearning/episode_return", ret, at)
                    if "metric" in episodes[-1]:
                        writer.add_scalar("qlearning/episode_metric", episodes[-1]["metric"], at)
                    writer.add_scalar("qlearning/epsilon", self.epsilon(step, total_steps), at)
                    writer.add_scalar(
                        "qlearning/states_visited", int((self.q != 0).any(1).sum()), at
                    )
                state, _ = self.env.reset()
                ret = 0.0
            bar.update()
            if callback is not None and callback_every and (step + 1) % callback_every == 0:
                callback(step + 1)
        bar.close()
        if writer is not None:
            writer.close()
        return episodes

    def evaluate(
        self,
        env: gym.Env | None = None,
        episodes: int | None = None,
        seed: int = 0,
        max_samples: int | None = None,
    ) -> dict:
        """Greedy policy; one episode per sample of the env's split when it has them, else
        ``episodes``.

        Returns mean return, mean task metric (when the env reports one) and the episode count.
        """
        env = env or self.env
        tie_break = np.random.default_rng(seed)  # not the learner's: evaluating changes no training
        return evaluate_policy(
            env, lambda s, mask: self.act(s, 0.0, mask, env, tie_break), episodes, seed, max_samples
        )

    def save(self, path: str | Path) -> Path:
        """Everything needed to use the agent again, as one ``.npz`` (added to ``path`` if
        missing): the table, config and step count, the env (registered id, keyword arguments and
        wrappers, when they can be rebuilt) and the fitted discretizer's arrays. No pickle.

        Written to a temporary file and renamed over ``path``: a crash leaves the old or the new
        file, never half of one.
        """
        path = check_save_path(path)
        fields = {
            "q": self.q,
            "config": json.dumps(dataclasses.asdict(self.config)),
            "steps": self.steps,
            "env": json.dumps(describe_env(self.env)),
        }
        discretizer = find_wrapper(self.env, DiscretizeObservation)
        if discretizer is not None:
            fields.update({f"discretizer_{k}": v for k, v in discretizer.state().items()})

        def write(tmp: Path) -> None:
            with open(tmp, "wb") as f:
                np.savez(f, **fields)

        return replace_file_atomically(path, write)

    @classmethod
    def load(cls, path: str | Path, env: gym.Env | None = None, **env_overrides) -> QLearning:
        """Rebuild an agent from :meth:`save`; every field checked, the table must fit the env.

        ``env=None`` rebuilds the env it was trained on (``env_overrides`` change its keyword
        arguments, e.g. ``split="test"``) with its saved discretizer. A given ``env`` with a
        ``Box`` observation is wrapped in the saved discretizer.
        """
        path = Path(path)
        check_zip_sizes(path, lambda _: MAX_SAVE_MEMBER_BYTES, "Q-learning save")
        try:
            with np.load(path, allow_pickle=False) as data:
                fields = {k: data[k] for k in data.files}
        except (OSError, ValueError, EOFError) as e:
            raise ValueError(f"{path}: not a readable Q-learning save ({e}).") from e
        for name in ("q", "config", "steps"):
            if name not in fields:
                raise ValueError(f"{path}: field {name!r} is missing; not a Q-learning save.")
        try:
            config = QLearningConfig(**json.loads(str(fields["config"])))
            config.validate()
        except (TypeError, ValueError, json.JSONDecodeError) as e:
            raise ValueError(f"{path}: field 'config' is not a valid QLearningConfig ({e}).") from e
        steps, q = fields["steps"], fields["q"]
        if steps.shape != () or not np.issubdtype(steps.dtype, np.integer) or int(steps) < 0:
            raise ValueError(f"{path}: field 'steps' is {steps!r}; expected an int >= 0.")
        if q.ndim != 2 or not np.issubdtype(q.dtype, np.floating) or not np.isfinite(q).all():
            raise ValueError(f"{path}: field 'q' must be a 2-D table of finite floats.")
        env = rebuild_env(path, fields, env, env_overrides)
        agent = cls(env, config)
        if q.shape != agent.q.shape:
            raise ValueError(
                f"The Q-table in {path} has shape {q.shape} but the env needs "
                f"{agent.q.shape} (states, actions): load it with the env (and discretizer) it was "
                "trained on."
            )
        agent.q, agent.steps = q.astype(np.float64), int(steps)
        return agent


# Wrappers that gym.make adds itself, and ours that a save knows how to rebuild.
MAX_SAVE_MEMBER_BYTES = 2**30
"""No array of a Q-learning save may inflate to more (a table of 134M float64 entries)."""


def check_save_path(path: str | Path) -> Path:
    """The ``.npz`` path a save writes (``.npz`` added if missing); a ValueError, before any
    work, when something that is not a Q-learning save is already there."""
    path = Path(path)
    path = path if path.suffix == ".npz" else path.with_name(path.name + ".npz")
    if (path.exists() or path.is_symlink()) and not (
        path.is_file() and not path.is_symlink() and _is_qlearning_save(path)
    ):
        raise ValueError(
            f"{path} exists and is not a Q-learning save; it would be replaced, so nothing was "
            "written. Give a new path or the path of an earlier save."
        )
    return path


def _is_qlearning_save(path: Path) -> bool:
    """Whether ``path`` is a file :meth:`QLearning.save` wrote (an .npz with its fields)."""
    import zipfile

    try:
        with zipfile.ZipFile(path) as archive:
            names = set(archive.namelist())
    except (OSError, zipfile.BadZipFile):
        return False
    return {"q.npy", "config.npy", "steps.npy"} <= names


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(
        description="Tabular Q-learning on a textenvs env or any Gymnasium env."
    )
    p.add_argument(
        "--env-id",
        default="textenvs/Summarize-v0",
        help="a textenvs id, or any Gymnasium id with Discrete actions (FrozenLake-v1, ...)",
    )
    p.add_argument(
        "--model",
        help="the env's LM: textenvs/tiny, a save_pretrained folder or a hub name "
        "(textenvs ids; default: the id's own)",
    )
    p.add_argument(
        "--env-kwargs",
        type=json_object,
        default={},
        help="JSON of more env keyword arguments, e.g. '{\"dense\": false}'",
    )
    p.add_argument("--total-steps", type=int_arg(), default=20_000)
    p.add_argument("--k", type=int_arg(), default=4, help="top-k actions (textenvs ids)")
    p.add_argument("--discretizer", choices=["hash", "kmeans"], default="hash")
    p.add_argument("--n-bits", type=int_arg(), default=10)
    p.add_argument("--n-clusters", type=int_arg(), default=128)
    p.add_argument(
        "--max-steps", type=int_arg(), default=16, help="tokens / edits per episode (textenvs ids)"
    )
    add_config_arguments(p, QLearningConfig, FIELD_CHECKS)  # every field, its docstring its help
    p.add_argument(
        "--save",
        help="write the agent (Q-table, env, discretizer: one .npz; QLearning.load reads it) "
        "here (default: qtable.npz in a new run folder, see --runs-dir)",
    )
    add_output_flags(p, "qlearning")
    p.add_argument(
        "--eval-samples",
        type=int_arg(),
        default=200,
        help="test-split samples (textenvs ids) or evaluation episodes (other ids)",
    )
    args = p.parse_args(argv)
    if args.save:
        check_save_path(args.save)  # before training, not after
    config = config_from_args(QLearningConfig, vars(args).copy())
    run = run_folder(p, args, "qlearning", args.save)
    save_to = args.save or (run / "qtable.npz" if run else None)
    env = make_cli_env(args, "train")
    agent = QLearning(env, config)
    start = time.time()
    agent.learn(args.total_steps, progress=True)
    train_s = time.time() - start
    if save_to:
        save_to = agent.save(save_to)
    test_env = make_cli_env(
        args, "test", fitted=env if hasattr(env, "observation_space_in") else None
    )
    textenvs_id = args.env_id.startswith("textenvs/")
    result = agent.evaluate(
        test_env, episodes=None if textenvs_id else args.eval_samples, max_samples=args.eval_samples
    )
    result.pop("metrics", None)
    with_text_stats(result)
    result.update(train_seconds=round(train_s, 1), steps=args.total_steps)
    if save_to:
        result["saved"] = str(save_to)
    print(json.dumps(result))
    print(result_line(result, "test samples" if textenvs_id else "episodes"))
    if save_to:
        print(
            f"saved the agent in {save_to}; load it with\n"
            f"  from agents.qlearning import QLearning\n"
            f"  agent = QLearning.load({str(save_to)!r}, split='test')  # its env, rebuilt\n"
            "  state, info = agent.env.reset(seed=0); action = agent.act(state)"
        )
    return result


if __name__ == "__main__":
    run_cli(main)  # a user error as one line, "error: ...", exit status 2
