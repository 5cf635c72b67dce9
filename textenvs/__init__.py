"""textenvs: text generation and text editing as registered Gymnasium environments.

``import textenvs`` registers every id below and is light: it imports gymnasium's registry only,
and torch, transformers and the metrics load when an env (or a name below) is first used. The
installed ``textenvs-gymnasium-ids.pth`` hook imports this module right after gymnasium in every
process, so ``gym.make("textenvs/Summarize-v0")`` works in subprocess, Ray and TorchRL workers
that never import textenvs (opt out with ``TEXTENVS_NO_AUTOREGISTER=1``; gymnasium's own
``"textenvs:textenvs/Summarize-v0"`` form works with or without the hook).
"""

from __future__ import annotations

import importlib
import os
import sys
from typing import Any

from gymnasium.envs.registration import register, registry

__version__ = "0.1.0"

# No `max_episode_steps`: generation envs end themselves at `max_steps` (terminated: the text
# is final and scored) and a TimeLimit wrapper would cut an episode without paying the terminal
# reward; both horizons are keyword arguments, so a fixed registered limit would contradict them.
GENERATION_IDS = {
    "textenvs/Generate-v0": {},
    "textenvs/Summarize-v0": {"task": "summarize"},
    "textenvs/Translate-v0": {"task": "translate"},
}

# The benchmark datasets of RL-for-LM papers (textenvs.tasks.hub: loaded through `datasets` from
# the hub, or from local files in the hub's schema via dataset_kwargs={"data_files": ...}). Their
# model defaults to GPT-2, the model RL4LMs and TRL run them with (a hub download: pass `model=`
# for a local folder); the long-source ones cut sources to fit the context by default.
BENCHMARK_IDS = {
    "textenvs/CNNDailyMail-v0": {"task": "cnn_dailymail", "model": "gpt2", "too_long": "truncate"},
    "textenvs/XSum-v0": {"task": "xsum", "model": "gpt2", "too_long": "truncate"},
    "textenvs/WMT16-v0": {"task": "wmt16", "model": "gpt2"},
    "textenvs/IMDBSentiment-v0": {"task": "imdb", "model": "gpt2", "too_long": "truncate"},
    "textenvs/CommonGen-v0": {"task": "common_gen", "model": "gpt2"},
}
GENERATION_IDS.update(BENCHMARK_IDS)

# Edit envs truncate themselves at `max_steps` (more edits could still raise the metric).
EDIT_IDS = {
    "textenvs/Edit-v0": {},
    "textenvs/EditSummary-v0": {"task": "summarize", "start": "draft"},
    "textenvs/EditTranslation-v0": {"task": "translate", "start": "source"},
}

# Conversations (textenvs.envs.dialogue): the agent plays one role, a responder the other. They
# end themselves (the responder, max_turns or the context), so no registered step limit either.
DIALOGUE_IDS = {
    # the built-in chat model (textenvs/tiny taught ChatML turns), through its chat template
    "textenvs/Dialogue-v0": {
        "task": "briefing",
        "model": "textenvs/tiny-chat",
        "chat_template": True,
    },
    "textenvs/Chat-v0": {"model": "textenvs/tiny-chat", "chat_template": True},
    # RL4LMs' dialogue benchmark; GPT-2 by default, as the benchmark ids above
    "textenvs/DailyDialog-v0": {"task": "daily_dialog", "model": "gpt2"},
}

ENV_IDS: list[str] = []


def _one_torch_thread_after_fork() -> None:
    """A forked child of a process whose torch thread pool already ran deadlocks in its first
    parallel op (the pool's threads do not survive a fork; GNU OpenMP waits for them). One intra-op
    thread never enters that pool, so async vector envs work under gymnasium's default fork
    context; PyTorch's DataLoader workers run with one thread for the same reason. Call
    ``torch.set_num_threads`` in the child to change it."""
    torch = sys.modules.get("torch")
    if torch is not None:
        torch.set_num_threads(1)


if hasattr(os, "register_at_fork"):  # POSIX; Windows has no fork
    os.register_at_fork(after_in_child=_one_torch_thread_after_fork)


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
for _id, _kwargs in DIALOGUE_IDS.items():
    _register(
        _id, "textenvs.envs.dialogue:DialogueEnv", "textenvs.vector:DialogueVectorEnv", _kwargs
    )
for _id, _kwargs in EDIT_IDS.items():
    _register(_id, "textenvs.envs.edit:TextEditEnv", "textenvs.vector:EditVectorEnv", _kwargs)


def is_edit_env(env_id: str) -> bool:
    """Whether a registered id builds a TextEditEnv (decided by its entry point, not its name)."""
    from gymnasium import spec

    return spec(env_id).entry_point.endswith("TextEditEnv")


# Public names and the module that defines each, imported on first access (PEP 562) so that the
# registration above costs no torch import in processes that only resolve ids.
_LAZY_NAMES = {
    "TINY": "textenvs.lm",
    "TINY_CHAT": "textenvs.lm",
    "LanguageModel": "textenvs.lm",
    "METRIC_NAMES": "textenvs.rewards",
    "RewardShaper": "textenvs.rewards",
    "get_metric": "textenvs.rewards",
    "Sample": "textenvs.tasks",
    "Task": "textenvs.tasks",
    "builtin_task": "textenvs.tasks",
    "load_csv": "textenvs.tasks",
    "load_dataset": "textenvs.tasks",
    "load_jsonl": "textenvs.tasks",
}
_SUBMODULES = {
    "batching",
    "envs",
    "kvcache",
    "lm",
    "models",
    "rewards",
    "tasks",
    "vector",
    "wrappers",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY_NAMES:
        value = getattr(importlib.import_module(_LAZY_NAMES[name]), name)
        globals()[name] = value
        return value
    if name in _SUBMODULES:
        return importlib.import_module(f"textenvs.{name}")
    raise AttributeError(f"module 'textenvs' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY_NAMES) | _SUBMODULES)


__all__ = [
    "BENCHMARK_IDS",
    "DIALOGUE_IDS",
    "ENV_IDS",
    "METRIC_NAMES",
    "TINY",
    "TINY_CHAT",
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
