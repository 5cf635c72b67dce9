"""textenvs: text generation and text editing as registered Gymnasium environments.

``import textenvs`` registers every id below; ``gym.make("textenvs/Summarize-v0")`` then works
offline with the built-in tiny language model and the built-in tasks.
"""

from __future__ import annotations

from gymnasium.envs.registration import register, registry

from textenvs.lm import TINY, LanguageModel
from textenvs.rewards import METRIC_NAMES, RewardShaper, get_metric
from textenvs.tasks import Sample, Task, builtin_task, load_csv, load_dataset, load_jsonl

__version__ = "0.1.0"

# No `max_episode_steps`: generation envs end themselves at `max_steps` (terminated: the text
# is final and scored) and a TimeLimit wrapper would cut an episode without paying the terminal
# reward; both horizons are keyword arguments, so a fixed registered limit would contradict them.
GENERATION_IDS = {
    "textenvs/Generate-v0": {},
    "textenvs/Summarize-v0": {"task": "summarize"},
    "textenvs/Translate-v0": {"task": "translate"},
}

# Edit envs truncate themselves at `max_steps` (more edits could still raise the metric).
EDIT_IDS = {
    "textenvs/Edit-v0": {},
    "textenvs/EditSummary-v0": {"task": "summarize", "start": "draft"},
    "textenvs/EditTranslation-v0": {"task": "translate", "start": "source"},
}

ENV_IDS: list[str] = []


def _register(env_id: str, entry_point: str, vector_entry_point: str, kwargs: dict) -> None:
    if env_id not in registry:
        register(
            id=env_id, entry_point=entry_point, vector_entry_point=vector_entry_point, kwargs=kwargs
        )
    ENV_IDS.append(env_id)


for _id, _kwargs in GENERATION_IDS.items():
    _register(
        _id,
        "textenvs.envs.generate:TextGenerationEnv",
        "textenvs.vector:GenerationVectorEnv",
        _kwargs,
    )
for _id, _kwargs in EDIT_IDS.items():
    _register(_id, "textenvs.envs.edit:TextEditEnv", "textenvs.vector:EditVectorEnv", _kwargs)


def is_edit_env(env_id: str) -> bool:
    """Whether a registered id builds a TextEditEnv (decided by its entry point, not its name)."""
    from gymnasium import spec

    return spec(env_id).entry_point.endswith("TextEditEnv")


__all__ = [
    "ENV_IDS",
    "METRIC_NAMES",
    "TINY",
    "LanguageModel",
    "RewardShaper",
    "Sample",
    "Task",
    "builtin_task",
    "get_metric",
    "is_edit_env",
    "load_csv",
    "load_dataset",
    "load_jsonl",
]
