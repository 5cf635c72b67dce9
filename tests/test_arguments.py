"""Wrong-typed values for the boolean, choice and integer arguments of every registered id, and for
the agents' boolean settings: each is refused with a message naming the argument (a string
``"False"`` would otherwise read as True)."""

from __future__ import annotations

import gymnasium as gym
import numpy as np
import pytest

import textenvs
from tests.conftest import ENV_IDS, FAST_KWARGS

BOOLS = ["False", "no", 1, 0.0]
COMMON = [
    *(("dense", v) for v in BOOLS),
    *(("text_infos", v) for v in [*BOOLS, None]),
    *(("chat_template", v) for v in [*BOOLS, None]),
    *(("candidates_obs", v) for v in [*BOOLS, None]),
    *(("too_long", v) for v in ["cut", 3, None]),
    *(("token_mode", v) for v in ["words", 1]),
    *(("layer", v) for v in [2.5, True, "1"]),
    *(("k", v) for v in ["3", 2.5, True, 0]),
    *(("max_steps", v) for v in ["3", 2.5, True, 0]),
    *(("max_prompt_tokens", v) for v in ["8", 0, True]),
    *(("length_penalty", v) for v in ["0.1", float("nan"), True]),
    *(("split", v) for v in ["dev", 3]),
]
EDIT_ONLY = [
    *(("flat_actions", v) for v in [*BOOLS, None]),
    *(("start", v) for v in ["draft2", 0]),
    *(("obs", v) for v in ["last", 1]),
    *(("max_len", v) for v in ["16", 0, True]),
]
GENERATION_ONLY = [
    *(("obs", v) for v in ["pooled", 1]),
    *(("context_positions", v) for v in [8, "8"]),  # without obs="context", or not an int
]
CASES = [
    (env_id, name, value)
    for env_id in ENV_IDS
    for name, value in COMMON + (EDIT_ONLY if textenvs.is_edit_env(env_id) else GENERATION_ONLY)
]


@pytest.mark.parametrize(("env_id", "name", "value"), CASES)
def test_a_wrong_value_is_refused_naming_the_argument(env_id, name, value):
    kwargs = {**FAST_KWARGS[env_id], name: value}
    if name == "max_prompt_tokens":
        kwargs["too_long"] = "truncate"
    with pytest.raises(ValueError) as caught:
        gym.make(env_id, **kwargs)
    message = str(caught.value)
    assert name in message or (name == "split" and "no split" in message), message


@pytest.mark.parametrize("value", [True, np.bool_(True), False])
def test_numpy_and_python_bools_are_accepted(value):
    env = gym.make(
        "textenvs/EditSummary-v0", max_len=8, max_steps=2, flat_actions=value, text_infos=value
    ).unwrapped
    assert env.flat_actions is bool(value) and env.text_infos is bool(value)


def test_agent_configs_refuse_strings_for_booleans():
    from agents.qlearning import QLearningConfig
    from agents.sb3 import SB3Config
    from agents.token_ppo import TokenPPOConfig

    for config, name in [
        (SB3Config(normalize_obs="False"), "normalize_obs"),
        (TokenPPOConfig(dense="no"), "dense"),
        (TokenPPOConfig(anneal_lr=1), "anneal_lr"),
        (QLearningConfig(use_action_masks="True"), "use_action_masks"),
    ]:
        with pytest.raises(ValueError, match=f"{name} must be True or False"):
            config.validate()


def test_a_vector_env_lists_the_autoreset_modes():
    with pytest.raises(ValueError, match="choose one of \\['NextStep', 'SameStep', 'Disabled'\\]"):
        gym.make_vec("textenvs/Summarize-v0", num_envs=2, autoreset_mode="Same")


def test_context_advice_follows_the_state():
    """The refusal suggests raising context_positions only while it can be raised."""
    kwargs = {"obs": "context", "max_steps": 500}
    with pytest.raises(ValueError) as caught:
        gym.make("textenvs/Summarize-v0", obs="context", context_positions=100, max_steps=60)
    assert "raise context_positions" in str(caught.value)
    with pytest.raises(ValueError) as caught:
        gym.make("textenvs/Summarize-v0", **kwargs)  # already the model's whole context
    assert "raise context_positions" not in str(caught.value)
    assert "longer context" in str(caught.value)
    with pytest.raises(ValueError, match="raise max_prompt_tokens"):
        gym.make("textenvs/Summarize-v0", too_long="truncate", max_prompt_tokens=4)


@pytest.mark.parametrize(("name", "value"), [("n_bits", True), ("n_bits", 2.0), ("method", "lsh")])
def test_the_discretizer_refuses_wrong_values(name, value):
    from textenvs.wrappers import DiscretizeObservation

    with pytest.raises(ValueError, match=name):
        DiscretizeObservation(gym.make("textenvs/Summarize-v0", max_steps=4), **{name: value})
