"""What each registered id is: the one-line summaries and the facts ``python -m textenvs`` prints.

The docs' env pages (``docs/conf.py``) and the command line read the same summaries, so the two
never disagree. Nothing here makes an env unless asked (``spaces``): describing a benchmark id
needs neither its dataset nor its model.
"""

from __future__ import annotations

import gymnasium as gym

import textenvs

# What each id is, in one line (the README's ids table says the same).
SUMMARIES = {
    "textenvs/Generate-v0": "The generation env for any `task=` / `dataset=`.",
    "textenvs/Summarize-v0": "Write a headline for a news-style article, token by token "
    "(built-in task, offline).",
    "textenvs/Translate-v0": "Translate an English-like sentence to Veltic, token by token "
    "(built-in task, offline).",
    "textenvs/CNNDailyMail-v0": "Summarize a CNN / Daily Mail article (`abisee/cnn_dailymail`).",
    "textenvs/XSum-v0": "Write the one-sentence summary of a BBC article (`EdinburghNLP/xsum`).",
    "textenvs/WMT16-v0": "Translate with WMT16 (`wmt/wmt16`), the direction from "
    '`dataset_kwargs={"pair": ...}`.',
    "textenvs/IMDBSentiment-v0": "Continue an IMDB review positively, scored by a sentiment "
    "classifier (`stanfordnlp/imdb`).",
    "textenvs/CommonGen-v0": "Write a sentence that uses a set of concepts (`allenai/common_gen`).",
    "textenvs/Dialogue-v0": "Answer a user's questions about an article over several turns "
    "(built-in multi-turn task, offline); the KV cache is kept across turns.",
    "textenvs/Chat-v0": "The dialogue env for any conversations: `dataset=` a JSONL file of "
    '`{"messages": [...]}`, a responder of your choice.',
    "textenvs/DailyDialog-v0": "Play the second speaker of DailyDialog's conversations "
    "(`li2017dailydialog/daily_dialog`), or RL4LMs' one-turn setting.",
    "textenvs/Edit-v0": "The edit env for any `task=` / `dataset=`.",
    "textenvs/EditSummary-v0": "Edit the LM's draft headline towards the reference "
    "(built-in task).",
    "textenvs/EditTranslation-v0": "Edit the source sentence into its translation (built-in task).",
}

DOCS_PAGE = "envs/{name} in the docs (docs/envs/{name}.md, generated when the docs build)"


def kind(env_id: str) -> str:
    """``generation``, ``dialogue`` or ``edit``: which env class the id builds."""
    entry_point = gym.spec(env_id).entry_point
    return {"TextEditEnv": "edit", "DialogueEnv": "dialogue"}.get(
        entry_point.rsplit(":", 1)[-1], "generation"
    )


def is_offline(env_id: str) -> bool:
    """Whether the id runs with its defaults on what the package ships (no dataset, no hub LM)."""
    from textenvs.tasks.hub import BENCHMARKS, DIALOGUE_BENCHMARKS

    task = gym.spec(env_id).kwargs.get("task")
    return task not in BENCHMARKS and task not in DIALOGUE_BENCHMARKS


def facts(env_id: str) -> list[tuple[str, str]]:
    """``(field, value)`` rows of one id: its summary, class, defaults and, for a benchmark id,
    its hub dataset."""
    from textenvs.tasks.hub import BENCHMARKS, DIALOGUE_BENCHMARKS

    if env_id not in textenvs.ENV_IDS:
        raise gym.error.UnregisteredEnv(
            f"{env_id!r} is not a textenvs id; `python -m textenvs list` prints them: "
            + ", ".join(textenvs.ENV_IDS)
        )
    spec = gym.spec(env_id)
    rows = [
        ("id", env_id),
        ("what", SUMMARIES[env_id]),
        ("kind", kind(env_id)),
        ("entry point", spec.entry_point),
        ("vector entry point", f"{spec.vector_entry_point} (gym.make_vec(id, num_envs=N))"),
        ("registered kwargs", repr(spec.kwargs) if spec.kwargs else "none"),
        ("offline", "yes" if is_offline(env_id) else "no: needs its hub dataset and model"),
    ]
    task = spec.kwargs.get("task")
    bench = {**BENCHMARKS, **DIALOGUE_BENCHMARKS}.get(task)
    if bench is not None:
        rows += [
            ("hub dataset", bench.path + (f" ({bench.config})" if bench.config else "")),
            ("columns", ", ".join(bench.columns)),
            ("default reward", bench.default_reward),
        ]
    rows.append(("docs", DOCS_PAGE.format(name=env_id.split("/", 1)[1])))
    return rows


def spaces(env_id: str) -> tuple[str, str]:
    """The action and observation spaces of an id with its defaults (makes the env: the built-in
    ids load the tiny model; a benchmark id needs its dataset and model)."""
    made = first_episode(env_id)
    return made["action_space"], made["observation_space"]


def first_episode(env_id: str) -> dict:
    """What an id is with its defaults, from the env itself: its spaces, reward, horizon and the
    first test episode's prompt and reference (``reset(seed=0)`` on the test split). Makes the
    env: built-in ids only, in practice (a benchmark id needs its dataset and model)."""
    env = gym.make(env_id, split="test")
    try:
        _, info = env.reset(seed=0)
        inner = env.unwrapped
        return {
            "action_space": str(env.action_space),
            "observation_space": str(env.observation_space),
            "prompt": str(info.get("prompt", "")),
            "reference": str(info.get("reference", "")),
            "reward": inner.shaper.name,
            "dense": bool(inner.shaper.dense),
            "max_steps": int(inner.max_steps),
        }
    finally:
        env.close()
