"""TextEditEnv: edits by hand, the invalid-action rule, masks, prefix-cache reuse, the expert."""

from __future__ import annotations

import gymnasium as gym
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from textenvs.envs.edit import DELETE, INSERT, REPLACE, STOP, TextEditEnv, edit_script
from textenvs.wrappers import FlattenEditActions

START = "Norwick council approves park plan"


@pytest.fixture(scope="module")
def env():
    return TextEditEnv(
        task="summarize", token_mode="vocab", obs="positions", max_len=12, max_steps=200
    )


def ids(env, text):
    return env.lm.encode(" " + text)


def tok(env, word):
    (t,) = env.lm.encode(" " + word)  # a single token for these in-domain words
    return t


def full_recompute_rows(env):
    _, hidden, _ = env.lm.prefill(env.lm.encode(env.prompt) + env.text_ids)
    return hidden[env._prompt_len - 1 :]


def test_start_text_from_options(env):
    _, info = env.reset(seed=0, options={"text": START})
    assert (
        info["text"] == START
        and env.text_ids == ids(env, START)
        and info["length"] == len(ids(env, START))
    )


@pytest.mark.parametrize(
    "action,expected",
    [
        ((INSERT, 0, "Halden"), "Halden Norwick council approves park plan"),
        ((INSERT, 2, "Halden"), "Norwick council Halden approves park plan"),
        ((INSERT, -1, "Halden"), "Norwick council approves park plan Halden"),
        ((DELETE, 0, None), "council approves park plan"),
        ((DELETE, -1, None), "Norwick council approves park"),
        ((REPLACE, 2, "rejects"), "Norwick council rejects park plan"),
    ],
)
def test_single_edits_by_hand(env, action, expected):
    env.reset(seed=0, options={"text": START})
    op, pos, word = action
    n = len(env.text_ids)
    pos = {INSERT: n, DELETE: n - 1}[op] if pos == -1 else pos
    _, _, terminated, truncated, info = env.step((op, pos, tok(env, word) if word else 0))
    assert info["text"] == expected and info["valid"] and not terminated and not truncated
    np.testing.assert_allclose(
        env._observe()[: n + 2][: len(env._rows)], full_recompute_rows(env).numpy(), atol=1e-4
    )


def test_stop_terminates_and_keeps_text(env):
    env.reset(seed=0, options={"text": START})
    _, reward, terminated, truncated, info = env.step((STOP, 5, 9))
    assert terminated and not truncated and reward == 0.0 and info["text"] == START


def test_sequence_of_edits(env):
    env.reset(seed=0, options={"text": START})
    for op, pos, word in [
        (REPLACE, 0, "Halden"),
        (DELETE, 3, None),
        (INSERT, 3, "flood"),
        (REPLACE, 4, "wall"),
        (REPLACE, 2, "opens"),
    ]:
        env.step((op, pos, tok(env, word) if word else 0))
    assert env.text == "Halden council opens flood wall"


@pytest.mark.parametrize("action", [(DELETE, 5, 0), (REPLACE, 7, 10), (INSERT, 6, 10)])
def test_invalid_edits_are_penalised_no_ops(env, action):
    env.reset(seed=0, options={"text": START})  # 5 tokens: positions 0..4, insert up to 5
    before = list(env.text_ids)
    obs_before = env._observe()
    obs, reward, terminated, truncated, info = env.step(action)
    assert (
        env.text_ids == before
        and not info["valid"]
        and reward == pytest.approx(-env.invalid_penalty)
    )
    np.testing.assert_array_equal(obs, obs_before)


def test_special_token_and_full_text_are_invalid(env):
    env.reset(seed=0, options={"text": START})
    _, _, _, _, info = env.step((INSERT, 0, env.lm.eos_token_id))
    assert not info["valid"]
    env.reset(seed=0, options={"text": " ".join(["plan"] * 20)})
    assert len(env.text_ids) == env.max_len and env.start_truncated
    _, _, _, _, info = env.step((INSERT, 0, tok(env, "plan")))
    assert not info["valid"] and len(env.text_ids) == env.max_len


def test_empty_start_text(env):
    obs, info = env.reset(seed=0, options={"text": ""})
    assert (
        info["text"] == "" and info["length"] == 0 and np.all(obs[1:] == 0) and np.any(obs[0] != 0)
    )
    assert not env.action_masks()[DELETE] and not env.action_masks()[REPLACE]
    _, _, _, _, info = env.step((INSERT, 0, tok(env, "Halden")))
    assert info["text"] == "Halden"


def test_per_dimension_mask_layout(env):
    env.reset(seed=0, options={"text": START})
    mask = env.action_masks()
    L, V = env.max_len, env.n_tokens
    assert mask.shape == (4 + L + 1 + V,)
    assert list(mask[:4]) == [True, True, True, True]
    assert list(mask[4 : 4 + L + 1]) == [True] * 6 + [False] * (L + 1 - 6)
    assert not mask[4 + L + 1 + env.lm.eos_token_id]


@pytest.mark.parametrize("start", ["source", "draft", "empty"])
@pytest.mark.parametrize("obs_mode", ["positions", "pooled"])
def test_start_modes_and_observation_shapes(start, obs_mode):
    env = TextEditEnv(task="translate", start=start, obs=obs_mode, max_len=24)
    obs, info = env.reset(seed=4)
    assert env.observation_space.contains(obs)
    if start == "source":
        assert env.text_ids == env.lm.encode(" " + env.sample.source)[:24]
    if start == "empty":
        assert info["text"] == ""
    if start == "draft":
        assert info["text"] == env.lm.greedy(env.lm.encode(env.prompt), 24)


def test_a_shared_model_drafts_the_samples_chunk_at_once_and_a_callers_model_only_its_own():
    from textenvs.envs.edit import DRAFT_CHUNK
    from textenvs.lm import TINY, LanguageModel

    env = TextEditEnv(task="summarize", split="test", max_len=8)
    assert env.lm.remembers_greedy  # built by name: the shared model
    prompts = [env.lm.encode(env.task.prompt(s)) for s in env.samples]
    env.lm._greedy_cache.clear()
    _, info = env.reset(options={"index": DRAFT_CHUNK + 3})
    chunk = range(DRAFT_CHUNK, 2 * DRAFT_CHUNK)
    own = LanguageModel(TINY)
    assert [env.lm.recall_greedy(prompts[j], 8) for j in chunk] == [
        own.greedy(prompts[j], 8) for j in chunk
    ]  # the whole chunk, each as its own greedy decoding
    assert env.lm.recall_greedy(prompts[0], 8) is None  # another chunk: not yet
    assert info["text"] == own.greedy(prompts[DRAFT_CHUNK + 3], 8)
    mine = TextEditEnv(task="summarize", split="test", max_len=8, model=own)
    calls = []
    original = own._greedy
    own._greedy = lambda ids, n: calls.append(list(ids)) or original(ids, n)
    _, info = mine.reset(options={"index": 5})
    assert calls == [prompts[5]] and info["text"] == original(prompts[5], 8)


def test_pooled_observation_is_mean_and_end_row():
    env = TextEditEnv(task="summarize", obs="pooled")
    obs, _ = env.reset(seed=1)
    rows = full_recompute_rows(env).numpy()
    d = rows.shape[1]
    np.testing.assert_allclose(obs[:d], rows.mean(0), atol=1e-4)
    np.testing.assert_allclose(obs[d:], rows[-1], atol=1e-4)


def test_topk_tokens_are_the_lm_proposals_at_that_position():
    env = TextEditEnv(task="summarize", token_mode="topk", k=4, obs="positions")
    env.reset(seed=0, options={"text": START})
    _, _, _, _, info = env.step((REPLACE, 1, 0))  # replace token 1 by the LM's top proposal there
    _, _, logits = env.lm.prefill(env.lm.encode(env.prompt) + ids(env, START)[:1])
    logits = logits.clone()  # the backend returns inference-mode tensors: clone before writing
    logits[env.special_ids] = -float("inf")
    assert env.text_ids[1] == int(logits.argmax())


@pytest.mark.parametrize(
    "task,reward", [("summarize", "rougeL"), ("translate", "bleu"), ("translate", "chrf")]
)
def test_levenshtein_expert_reaches_the_maximum(task, reward):
    env = TextEditEnv(
        task=task,
        reward=reward,
        token_mode="vocab",
        start="source" if task == "translate" else "draft",
        max_len=40,
        max_steps=80,
    )
    for seed in range(3):
        _, info = env.reset(seed=seed)
        start_metric = info["metric"]
        target = ids(env, info["reference"])
        rewards, terminated = [], False
        for action in edit_script(env.text_ids, target):
            _, r, terminated, truncated, info = env.step(action)
            rewards.append(r)
            assert info["valid"] and not truncated
        assert terminated and info["text"] == info["reference"]
        assert info["metric"] == pytest.approx(1.0)
        assert sum(rewards) == pytest.approx(1.0 - start_metric)


def test_edit_script_by_hand():
    assert edit_script([1, 2, 3], [1, 2, 3]) == []
    assert edit_script([], [5, 6]) == [(INSERT, 0, 6), (INSERT, 0, 5)]
    assert edit_script([1, 2, 3], [1, 3]) == [(DELETE, 1, 0)]
    assert edit_script([1, 2, 3], [1, 9, 3]) == [(REPLACE, 1, 9)]
    src, tgt = [4, 1, 2, 7, 3], [1, 2, 3, 8]
    text = list(src)
    for op, p, t in edit_script(src, tgt):
        text = (
            text[:p] + [t] + text[p:]
            if op == INSERT
            else text[:p] + text[p + 1 :]
            if op == DELETE
            else text[:p] + [t] + text[p + 1 :]
        )
    assert text == tgt and len(edit_script(src, tgt)) == 3


def test_truncates_at_max_steps():
    env = TextEditEnv(task="summarize", max_steps=3)
    env.reset(seed=0)
    outs = [env.step((DELETE, 40 - 9, 0)) for _ in range(3)]
    assert [o[3] for o in outs] == [False, False, True]


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"start": "random"}, "start='random'"),
        ({"obs": "last"}, "obs='last'"),
        ({"token_mode": "beam"}, "token_mode"),
        ({"max_len": 0}, "max_len"),
        ({"invalid_penalty": -1.0}, "invalid_penalty"),
        ({"max_len": 10_000}, "context"),
    ],
)
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        TextEditEnv(**kwargs).reset(seed=0)


def test_reset_text_must_be_a_string(env):
    with pytest.raises(TypeError, match="must be a string"):
        env.reset(options={"text": 5})


@settings(
    max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(seed=st.integers(0, 10_000), masked=st.booleans(), topk=st.booleans())
def test_random_actions_never_corrupt_and_match_full_recompute(seed, masked, topk):
    env = TextEditEnv(
        task="summarize",
        token_mode="topk" if topk else "vocab",
        obs="positions",
        max_len=10,
        max_steps=1000,
    )
    env.reset(seed=seed, options={"text": "Norwick council plan"})
    flat = FlattenEditActions(env)
    rng = np.random.default_rng(seed)
    for _ in range(120):
        before = list(env.text_ids)
        if masked:
            a = int(rng.choice(np.flatnonzero(flat.action_masks())))
            if a == 0:
                continue  # stop would end the episode; everything else is an edit
            obs, r, terminated, truncated, info = flat.step(a)
            assert info["valid"]
        else:
            action = rng.integers(env.action_space.nvec)
            if action[0] == STOP:
                continue
            obs, r, terminated, truncated, info = env.step(action)
            if not info["valid"]:
                assert env.text_ids == before
        assert np.isfinite(r) and len(env.text_ids) <= env.max_len
        n = len(env.text_ids)
        np.testing.assert_allclose(obs[: n + 1], full_recompute_rows(env).numpy(), atol=1e-4)
        assert np.all(obs[n + 1 :] == 0)
        if terminated:
            env.reset(seed=seed, options={"text": "Norwick council plan"})


def test_flattened_mask_is_exactly_the_valid_edits():
    env = TextEditEnv(task="summarize", token_mode="topk", k=3, max_len=6)
    flat = FlattenEditActions(env)
    for text in ["", "Norwick council plan", "a b c d e f g h"]:
        flat.reset(seed=0, options={"text": text})
        expected = {flat.flatten(*a) for a in env.valid_actions()}
        assert set(np.flatnonzero(flat.action_masks())) == expected
        for a in range(flat.action_space.n):
            assert flat.flatten(*flat.unflatten(a)) == a


def test_flatten_rejects_other_spaces():
    with pytest.raises(ValueError, match="FlattenEditActions needs an edit env"):
        FlattenEditActions(gym.make("textenvs/Summarize-v0"))


def test_maskable_ppo_runs_on_the_flattened_env():
    pytest.importorskip("sb3_contrib")
    from sb3_contrib import MaskablePPO

    env = FlattenEditActions(gym.make("textenvs/EditSummary-v0", max_len=8, max_steps=4, k=2))
    model = MaskablePPO("MlpPolicy", env, n_steps=16, batch_size=8, n_epochs=1, seed=0)
    model.learn(32)
    assert model.num_timesteps == 32
    # The flat mask is exact: the trained masked policy never picks an impossible edit.
    obs, _ = env.reset(seed=1)
    for _ in range(20):
        action, _ = model.predict(obs, action_masks=env.action_masks())
        obs, _, terminated, truncated, info = env.step(int(action))
        assert info["valid"]
        if terminated or truncated:
            obs, _ = env.reset()


def test_edit_cost_is_paid_by_every_valid_edit_only(env):
    costly = TextEditEnv(
        task="summarize",
        token_mode="vocab",
        obs="positions",
        max_len=12,
        max_steps=200,
        edit_cost=0.05,
        invalid_penalty=0.2,
    )
    for e in (env, costly):
        e.reset(seed=0, options={"text": START})
    for action in [(REPLACE, 2, tok(env, "rejects")), (DELETE, 0, 0), (DELETE, 9, 0)]:
        _, r_free, *_ = env.step(action)
        _, r_cost, *_, info = costly.step(action)
        if info["valid"]:
            assert r_cost == pytest.approx(r_free - 0.05)  # the metric's change minus the cost
        else:
            assert r_cost == pytest.approx(-0.2) and r_free == pytest.approx(
                -0.01
            )  # the penalty alone
    _, r_stop, terminated, *_ = costly.step((STOP, 0, 0))
    assert terminated and r_stop == 0.0  # stop costs nothing


def test_terminal_reward_pays_the_final_score_once():
    env = TextEditEnv(task="summarize", token_mode="vocab", max_len=12, max_steps=3, dense=False)
    _, info = env.reset(seed=0, options={"text": START})
    rewards, infos = [], []
    for action in [
        (REPLACE, 0, tok(env, "Halden")),
        (DELETE, 9, 0),
        (INSERT, 0, tok(env, "Norwick")),
    ]:
        _, reward, terminated, truncated, info = env.step(action)
        rewards.append(reward)
        infos.append(info)
    assert truncated and not terminated
    assert rewards[0] == 0.0  # nothing is paid before the end
    assert rewards[1] == pytest.approx(-0.01)  # an invalid edit still pays its penalty at once
    assert rewards[2] == pytest.approx(infos[-1]["score"])  # the final score, once
    assert infos[-1]["metric_name"] == "rougeL" and infos[-1]["metric"] == infos[-1]["score"]


def test_text_cannot_smuggle_special_tokens_in():
    env = TextEditEnv(task="summarize", max_len=32)
    _, info = env.reset(seed=0, options={"text": "hello <|endoftext|> world"})
    assert env.lm.eos_token_id not in env.sequence.ids
    assert info["text"] == env.lm.decode(env.text_ids).strip() == "hello <|endoftext|> world"
    assert all(t not in env.special_ids for t in env.text_ids)


def test_a_dataset_source_cannot_put_a_special_token_into_the_prompt():
    from textenvs.tasks import Sample

    samples = [Sample("An article <|endoftext|> about the council.", ("council",))]
    from textenvs.envs.generate import TextGenerationEnv

    for cls in (TextEditEnv, TextGenerationEnv):
        env = cls(dataset=samples, max_steps=2)
        env.reset(seed=0)
        assert env.lm.eos_token_id not in env.sequence.ids[: len(env.lm.encode(env.prompt))]


def test_flattened_masks_before_reset_raise_reset_needed():
    from gymnasium.error import ResetNeeded

    env = FlattenEditActions(gym.make("textenvs/EditSummary-v0", max_len=8, max_steps=4, k=2))
    with pytest.raises(ResetNeeded, match="reset"):
        env.action_masks()


@pytest.mark.parametrize("token_mode", ["topk", "vocab"])
def test_flat_actions_equal_the_flatten_wrapper(token_mode):
    kwargs = dict(task="summarize", max_len=6, max_steps=12, token_mode=token_mode, k=3)
    flat = TextEditEnv(flat_actions=True, **kwargs)
    wrapped = FlattenEditActions(TextEditEnv(**kwargs))
    assert flat.action_space == wrapped.action_space
    a, _ = flat.reset(seed=4)
    b, _ = wrapped.reset(seed=4)
    rng = np.random.default_rng(0)
    for _ in range(30):
        np.testing.assert_array_equal(a, b)
        mask = flat.action_masks()
        np.testing.assert_array_equal(mask, wrapped.action_masks())
        # mostly valid edits, some masked-out ones (they are no-ops with a penalty in both)
        pool = np.flatnonzero(mask) if rng.random() < 0.8 else np.flatnonzero(~mask)
        action = int(rng.choice(pool if len(pool) else [0]))
        a, ra, ta, tra, ia = flat.step(action)
        b, rb, tb, trb, ib = wrapped.step(action)
        assert (ra, ta, tra, ia["text"], ia["valid"]) == (rb, tb, trb, ib["text"], ib["valid"])
        if ta or tra:
            a, _ = flat.reset()
            b, _ = wrapped.reset()
    with pytest.raises(ValueError, match="flat_actions=True"):
        flat.step(flat.codec.n)
    with pytest.raises(ValueError, match="made without flat_actions=True"):
        FlattenEditActions(flat)
    with pytest.raises(ValueError, match="flat_actions must be True or False"):
        TextEditEnv(flat_actions="yes", **kwargs)


def test_flat_actions_in_the_batched_env_give_n_by_n_masks_for_maskable_ppo():
    pytest.importorskip("sb3_contrib")
    from sb3_contrib import MaskablePPO
    from sb3_contrib.common.maskable.utils import get_action_masks

    from textenvs.vector import as_sb3_vec_env

    envs = gym.make_vec(
        "textenvs/EditSummary-v0", num_envs=3, max_len=6, max_steps=3, k=2, flat_actions=True
    )
    singles = [
        TextEditEnv(task="summarize", max_len=6, max_steps=3, k=2, flat_actions=True)
        for _ in range(3)
    ]
    envs.reset(seed=0)
    for i, env in enumerate(singles):
        env.reset(seed=i)
    masks = envs.unwrapped.action_masks()
    assert masks.shape == (3, envs.single_action_space.n)
    np.testing.assert_array_equal(masks, np.stack([env.action_masks() for env in singles]))
    actions = np.array([int(np.flatnonzero(m)[-1]) for m in masks])  # a replace in each
    _, rewards, *_ = envs.step(actions)
    for i, env in enumerate(singles):
        assert env.step(int(actions[i]))[1] == pytest.approx(rewards[i], abs=1e-6)
    np.testing.assert_array_equal(
        envs.unwrapped.action_masks(), np.stack([env.action_masks() for env in singles])
    )
    venv = as_sb3_vec_env(envs)
    assert get_action_masks(venv).shape == masks.shape
    model = MaskablePPO("MlpPolicy", venv, n_steps=8, batch_size=12, n_epochs=1, seed=0)
    model.learn(24)
    assert model.num_timesteps >= 24


@pytest.mark.parametrize("obs_mode", ["pooled", "positions"])
def test_candidate_block_describes_the_token_choices(obs_mode):
    """candidates_obs=True: per row, the k choices' copy flags and log-probabilities (the tokens an
    insert / replace there writes), then the text's own token; the batched env gives the same."""
    import torch

    from textenvs.envs.edit import candidate_row_size
    from textenvs.vector import EditVectorEnv

    kwargs = dict(task="summarize", max_len=12, max_steps=6, k=3, obs=obs_mode)
    env = TextEditEnv(candidates_obs=True, flat_actions=True, **kwargs)
    plain = TextEditEnv(flat_actions=True, **kwargs)
    obs, info = env.reset(seed=3)
    base, _ = plain.reset(seed=3)
    c, d = candidate_row_size(3), env.lm.hidden_size
    assert env.observation_space.contains(obs)
    rng = np.random.default_rng(0)
    seen = set()
    for _ in range(5):
        rows = obs[:, d:] if obs_mode == "positions" else obs[2 * d :].reshape(13, c)
        body = obs[:, :d] if obs_mode == "positions" else obs[: 2 * d]
        np.testing.assert_array_equal(body, base)  # the plain observation comes first, unchanged
        text, prompt = env.text_ids, env.sequence.ids[: len(env.sequence) - len(env.text_ids)]
        n = len(text)
        logprobs = torch.log_softmax(env._row_logits.float(), -1)
        for j in range(n + 1):
            tokens = [env._token(j, t) for t in range(3)]  # what the actions at row j write
            np.testing.assert_array_equal(rows[j, 0:9:3], [float(t in prompt) for t in tokens])
            np.testing.assert_array_equal(rows[j, 1:9:3], [float(t in text) for t in tokens])
            np.testing.assert_allclose(rows[j, 2:9:3], logprobs[j, tokens].numpy(), atol=1e-5)
            if j < n:
                t = text[j]
                np.testing.assert_allclose(
                    rows[j, 9:],
                    [1.0, t in prompt, text.count(t) > 1, float(logprobs[j, t])],
                    atol=1e-5,
                )
            seen |= set(rows[j, 0:9:3])
        assert not rows[n + 1 :].any() and not rows[n, 9:].any()
        mask = env.action_masks()
        action = int(rng.choice(np.flatnonzero(mask[1:]))) + 1  # an edit, never stop
        obs, *_ = env.step(action)
        base, *_ = plain.step(action)
    assert seen == {0.0, 1.0}  # copy flags of both kinds occurred: the check can fail
    batched = EditVectorEnv(2, candidates_obs=True, flat_actions=True, **kwargs)
    singles = [TextEditEnv(candidates_obs=True, flat_actions=True, **kwargs) for _ in range(2)]
    obs, _ = batched.reset(seed=7)
    single = [e.reset(seed=7 + i)[0] for i, e in enumerate(singles)]
    for _ in range(4):
        np.testing.assert_allclose(obs, np.stack(single), atol=1e-4)
        masks = batched.action_masks()
        actions = np.array([int(rng.choice(np.flatnonzero(m[1:]))) + 1 for m in masks])
        obs, _, terminated, truncated, _ = batched.step(actions)
        single = []
        for i, e in enumerate(singles):
            o, _, te, tr, _ = e.step(int(actions[i]))
            single.append(e.reset()[0] if te or tr else o)
    with pytest.raises(ValueError, match="candidates_obs=True describes the k token choices"):
        TextEditEnv(candidates_obs=True, token_mode="vocab", max_len=4)
    with pytest.raises(ValueError, match="candidates_obs must be True or False"):
        TextEditEnv(candidates_obs="yes", max_len=4)
