"""The dialogue envs: token exactness against apply_chat_template, forwards that see each token
once, the responders and their refusals, the loss mask, the context rule, batched = single."""

from __future__ import annotations

import json

import gymnasium as gym
import numpy as np
import pytest
import torch

import textenvs
from textenvs.chat import TemplateRewriteError
from textenvs.responders import Reply, ResponderError
from textenvs.tasks.dialogue import Dialogue, briefing_task, load_chat_jsonl
from textenvs.tasks.loaders import DatasetFormatError

CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
# drops the reasoning of every assistant turn but the last, as reasoning models' templates do
REWRITING = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n"
    "{% if m['role'] == 'assistant' and not loop.last %}"
    "{{ m['content'].split('</think>')[-1] }}{% else %}{{ m['content'] }}{% endif %}"
    "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def _save_chat_model(folder, template: str) -> str:
    """A random 2-layer GPT-2 with the tiny tokenizer plus ChatML's two special tokens."""
    from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel

    tokenizer = AutoTokenizer.from_pretrained(textenvs.lm.BUILTIN_MODELS[textenvs.TINY])
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    tokenizer.chat_template = template
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=len(tokenizer), n_positions=1024, n_embd=32, n_layer=2, n_head=2)
    model = GPT2LMHeadModel(config)
    end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    model.generation_config.eos_token_id = [tokenizer.eos_token_id, end]
    model.save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)
    return str(folder)


@pytest.fixture(scope="module")
def chatml_dir(tmp_path_factory):
    return _save_chat_model(tmp_path_factory.mktemp("chatml"), CHATML)


def long_dialogue(turns: int) -> Dialogue:
    messages = [("system", "Be brief.")]
    for t in range(turns):
        messages += [
            ("user", f"Question {t}: where is the red house?"),
            ("assistant", f"Near road {t}."),
        ]
    return Dialogue(tuple(messages))


DIALOGUES = [long_dialogue(12), long_dialogue(3)]


def ids_of(tokenizer, messages, generation_prompt):
    out = tokenizer.apply_chat_template(
        messages, add_generation_prompt=generation_prompt, tokenize=True
    )
    return list(out if isinstance(out, list) else out["input_ids"])


def play_references(env, end_token: int | None):
    """Play each recorded agent turn with the tokenizer's own tokens (+ the end token); yields
    after every step that ended a turn."""
    tokenizer = env.lm.tokenizer
    while True:
        reference = env.turn_references()[0]
        tokens = tokenizer(reference, add_special_tokens=False)["input_ids"]
        tokens = tokens + ([end_token] if end_token is not None else [])
        for token in tokens:
            out = env.step(token)
        yield out
        if out[2]:
            return


def test_ids_equal_apply_chat_template_of_the_conversation_turn_after_turn(chatml_dir):
    env = gym.make(
        "textenvs/Chat-v0",
        model=chatml_dir,
        dataset=DIALOGUES,
        chat_template=True,
        max_turns=20,
        max_turn_tokens=32,
    ).unwrapped
    env.reset(seed=0, options={"index": 0})
    tokenizer = env.lm.tokenizer
    assert env.sequence.ids == ids_of(tokenizer, env.conversation, True)
    end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    turns = 0
    for _, _, terminated, _, info in play_references(env, end):
        turns += 1
        assert info["metric"] == pytest.approx(1.0)  # the reference itself
        if not terminated:
            assert env.sequence.ids == ids_of(tokenizer, env.conversation, True), turns
    assert turns == 12 and info["stop"] == "responder"
    # the last turn ends with the agent's <|im_end|>: the template's whole less its final "\n"
    assert env.sequence.ids == ids_of(tokenizer, env.conversation, False)[:-1]


def test_a_template_that_rewrites_earlier_turns_is_refused(tmp_path):
    folder = _save_chat_model(tmp_path / "rewriting", REWRITING)
    with pytest.raises(TemplateRewriteError, match="rewrites earlier turns"):
        gym.make("textenvs/Dialogue-v0", model=folder, chat_template=True)
    gym.make("textenvs/Dialogue-v0", model=folder, chat_template=False)  # plain: no template


def count_forwarded_tokens(lm):
    """Wrap ``lm.model.forward`` to count the input tokens it is given (padding included)."""
    counted = {"tokens": 0, "calls": 0}
    original = lm.model.forward

    def forward(*args, **kwargs):
        ids = kwargs.get("input_ids", args[0] if args else None)
        counted["tokens"] += int(ids.numel())
        counted["calls"] += 1
        return original(*args, **kwargs)

    lm.model.forward = forward
    return counted, lambda: setattr(lm.model, "forward", original)


@pytest.mark.parametrize("chat", [False, True])
def test_each_token_of_a_conversation_is_forwarded_once(chatml_dir, chat):
    env = gym.make(
        "textenvs/Chat-v0",
        model=textenvs.lm.LanguageModel(chatml_dir),  # a model of its own: nothing memoised
        dataset=DIALOGUES,
        chat_template=chat,
        max_turns=20,
        max_turn_tokens=32,
    ).unwrapped
    counted, restore = count_forwarded_tokens(env.lm)
    try:
        env.reset(seed=0, options={"index": 0})
        tokenizer = env.lm.tokenizer
        end = tokenizer.convert_tokens_to_ids("<|im_end|>") if chat else env.lm.encode("\n")[0]
        for _ in play_references(env, end):
            pass
        steps = len(env.generated)
    finally:
        restore()
    # one prefill, then one forward per agent token (the turn's tail rides with its last token)
    assert counted["tokens"] == len(env.sequence.ids)
    assert counted["calls"] == 1 + steps
    assert env.turn == 12


def test_the_loss_mask_marks_exactly_the_agents_tokens():
    env = gym.make("textenvs/Dialogue-v0", max_turn_tokens=5).unwrapped
    env.reset(seed=3)
    rng = np.random.default_rng(0)
    actions = []
    terminated = False
    while not terminated:
        action = int(rng.integers(env.action_space.n))
        actions.append(action)
        _, _, terminated, _, info = env.step(action)
    mask = env.agent_mask()
    ids = np.asarray(env.sequence.ids)
    assert mask.shape == ids.shape and mask.sum() == len(actions)
    assert ids[mask].tolist() == actions
    assert not mask[: len(env.opening_ids(env.sample))].any()


def test_the_data_responder_plays_the_recording_and_scores_each_turn_against_its_reference():
    env = gym.make("textenvs/Dialogue-v0", max_turn_tokens=4, dense=False).unwrapped
    env.reset(seed=0)
    sample = env.sample
    replies, references = [], []
    terminated = False
    while not terminated:
        _, reward, terminated, _, info = env.step(0)
        if info["turn_end"]:
            replies.append(info["reply"])
            references.append(info["reference"])
            assert reward == pytest.approx(info["turn_metric"])
        else:
            assert reward == 0.0 and "metric" not in info
    users = [content for role, content in sample.messages[3:] if role == "user"]
    assert replies == [*users, ""] and references == list(sample.references)
    assert info["stop"] == "responder" and info["speaker"] == ""
    assert [m["role"] for m in env.conversation] == [r for r, _ in sample.messages]


def scripted(conversation):
    if conversation.turn >= 3:
        return Reply("Thanks, bye.", reward=0.5, end=True)
    return Reply(f"And turn {conversation.turn}?", reward=0.25)


def test_a_callable_responder_pays_rewards_and_ends_the_conversation():
    env = gym.make(
        "textenvs/Dialogue-v0", responder=scripted, max_turn_tokens=2, dense=False
    ).unwrapped
    env.reset(seed=0)
    rewards, infos = [], []
    terminated = False
    while not terminated:
        _, reward, terminated, _, info = env.step(1)
        rewards.append(reward)
        infos.append(info)
    ends = [i for i in infos if i["turn_end"]]
    assert [i["responder_reward"] for i in ends] == [0.25, 0.25, 0.5]
    assert [i["reply"] for i in ends] == ["And turn 1?", "And turn 2?", "Thanks, bye."]
    assert ends[-1]["stop"] == "responder"
    assert env.conversation[-1] == {"role": "user", "content": "Thanks, bye."}
    assert sum(rewards) == pytest.approx(
        sum(i["turn_metric"] + i["responder_reward"] for i in ends)
    )
    turns = [i["turn_metric"] for i in ends]
    assert ends[-1]["metric"] == pytest.approx(sum(turns) / len(turns))  # the conversation's


@pytest.mark.parametrize(
    "bad, message",
    [
        (lambda c: 42, "returned int"),
        (lambda c: "  ", "empty turn"),
        (lambda c: Reply(None), "without end=True"),
        (lambda c: Reply("ok", reward=float("nan")), "finite number"),
        (lambda c: 1 / 0, "raised ZeroDivisionError"),
    ],
)
def test_a_bad_responder_is_named_and_nothing_played_is_lost(bad, message):
    env = gym.make("textenvs/Dialogue-v0", responder=bad, max_turn_tokens=2).unwrapped
    env.reset(seed=0)
    env.step(1)
    ids, conversation = list(env.sequence.ids), env.conversation
    with pytest.raises(ResponderError, match=message) as caught:
        env.step(1)  # ends the turn: the responder answers
    assert "<lambda>" in str(caught.value)
    assert env.sequence.ids == ids and env.conversation == conversation
    env.responder.fn = lambda c: "Fine."  # fixed: the same step goes through
    *_, info = env.step(1)
    assert info["reply"] == "Fine." and info["turn_end"] == "max_turn_tokens"


def test_the_responder_argument_is_checked():
    with pytest.raises(ValueError, match="is not a responder"):
        gym.make("textenvs/Dialogue-v0", responder="human")
    with pytest.raises(ValueError, match="configure responder='lm' only"):
        gym.make("textenvs/Dialogue-v0", responder_kwargs={"temperature": 0.5})
    with pytest.raises(ValueError, match="temperature"):
        gym.make("textenvs/Dialogue-v0", responder="lm", responder_kwargs={"temperature": -1})


def run_lm_conversations(num_envs: int, seed: int, indices: list[int]):
    """Greedy agent turns against an LM responder; per conversation its ids and replies."""
    kwargs = dict(
        responder="lm",
        responder_kwargs={"temperature": 0.8, "max_new_tokens": 6, "seed": 5},
        max_turns=3,
        max_turn_tokens=4,
    )
    if num_envs == 1:
        out = []
        for index in indices:
            env = gym.make("textenvs/Dialogue-v0", **kwargs).unwrapped
            env.reset(seed=seed, options={"index": index})
            replies, terminated = [], False
            while not terminated:
                _, _, terminated, _, info = env.step(int(env.logits.argmax()))
                replies += [info["reply"]] if info["turn_end"] else []
            out.append((env.sequence.ids, replies))
        return out
    envs = gym.make_vec("textenvs/Dialogue-v0", num_envs=num_envs, text_infos=True, **kwargs)
    envs.reset(seed=[seed] * num_envs, options={"index": indices})
    replies = [[] for _ in indices]
    done = np.zeros(num_envs, bool)
    while not done.all():
        actions = envs.unwrapped.logits.argmax(-1).numpy()
        _, _, terminated, _, infos = envs.unwrapped.step_unfinished(actions)
        for i in np.flatnonzero(infos["_turn_end"]):
            if infos["turn_end"][i]:
                replies[i].append(infos["reply"][i])
        done |= terminated
    return [(env.sequence.ids, r) for env, r in zip(envs.unwrapped.envs, replies)]


def test_lm_responder_is_seeded_and_batched_equals_single():
    single = run_lm_conversations(1, seed=11, indices=[0, 1, 2])
    assert single == run_lm_conversations(1, seed=11, indices=[0, 1, 2])
    batched = run_lm_conversations(3, seed=11, indices=[0, 1, 2])
    assert [ids for ids, _ in batched] == [ids for ids, _ in single]
    assert [r for _, r in batched] == [r for _, r in single]
    assert all(len(r) >= 1 for _, r in single)


def test_lm_responder_runs_each_of_its_tokens_once():
    """Its own KV cache: over a conversation, the responder's model sees each token of its view
    once, never the history again."""
    env = gym.make(
        "textenvs/Dialogue-v0",
        model=textenvs.lm.LanguageModel(textenvs.TINY_CHAT),  # not the responder's object
        responder="lm",
        responder_kwargs={"model": textenvs.TINY_CHAT, "max_new_tokens": 5},
        max_turns=4,
        max_turn_tokens=3,
    ).unwrapped
    assert env.responder.lm is not env.lm
    counted, restore = count_forwarded_tokens(env.responder.lm)
    try:
        env.reset(seed=0)
        terminated = False
        while not terminated:
            *_, terminated, _, info = env.step(1)
    finally:
        restore()
    assert env.turn >= 2
    assert counted["tokens"] == len(env._responder_state["seq"].ids)


def test_the_context_rule_ends_the_conversation_before_a_turn_that_would_not_fit():
    env = gym.make(
        "textenvs/Dialogue-v0", obs="context", context_positions=130, max_turn_tokens=8
    ).unwrapped
    stops = set()
    for index in range(20):
        env.reset(seed=0, options={"index": index})
        terminated = False
        while not terminated:
            _, _, terminated, _, info = env.step(1)
            assert len(env.sequence) <= 130
        stops.add(info["stop"])
    assert "context" in stops


def test_a_conversation_reward_is_paid_at_the_end():
    seen = []

    def judge(conversation):
        seen.append(len(conversation.messages))
        return 2.0

    env = gym.make("textenvs/Dialogue-v0", conversation_reward=judge, max_turn_tokens=2)
    env = env.unwrapped
    env.reset(seed=0)
    terminated = False
    while not terminated:
        _, reward, terminated, _, info = env.step(1)
        if not terminated:
            assert info["conversation_reward"] == 0.0
    assert info["conversation_reward"] == 2.0 and seen == [len(env.conversation)]
    bad = gym.make("textenvs/Dialogue-v0", conversation_reward=lambda c: float("inf"))
    bad.reset(seed=0)
    with pytest.raises(ValueError, match="finite number"):
        for _ in range(200):
            bad.step(1)


def test_weighted_rewards_report_their_parts():
    env = gym.make("textenvs/Dialogue-v0", reward={"rougeL": 0.25, "chrf": 0.75}).unwrapped
    env.reset(seed=0)
    *_, info = env.step(1)
    assert info["metric_name"] == "0.25*rougeL+0.75*chrf"
    parts = 0.25 * info["metric_rougeL"] + 0.75 * info["metric_chrf"]
    assert info["turn_metric"] == info["metric"] == pytest.approx(parts)  # the first turn


def test_chat_jsonl_files_load_and_bad_lines_are_named(tmp_path):
    good = tmp_path / "chats.jsonl"
    lines = [
        {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yo"}]},
        {
            "messages": [
                {"role": "A", "content": "Hello"},
                {"role": "B", "content": "Hi there"},
            ],
            "agent_role": "B",
        },
    ]
    good.write_text("\n".join(json.dumps(line) for line in lines) + "\n")
    dialogues = load_chat_jsonl(good)
    assert dialogues[1].agent_role == "B" and dialogues[1].references == ("Hi there",)
    env = gym.make("textenvs/Chat-v0", dataset=str(good)).unwrapped
    env.reset(seed=0, options={"index": 1})
    assert env.agent_role == "B" and env.conversation == [{"role": "A", "content": "Hello"}]
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"messages": [{"role": "user", "content": ""}]}\n')
    with pytest.raises(DatasetFormatError, match="line 1.*no content"):
        load_chat_jsonl(bad)
    bad.write_text('{"messages": [{"role": "user", "content": "Hi"}]}\n')
    with pytest.raises(DatasetFormatError, match="speaks no message"):
        load_chat_jsonl(bad)


def test_the_builtin_task_is_fixed_and_its_splits_do_not_overlap():
    task = briefing_task()
    articles = {split: {d.messages[1] for d in task.split(split)} for split in task.splits}
    assert (
        not articles["train"] & articles["test"] and not articles["validation"] & articles["test"]
    )
    first = task.split("test")[0]
    assert first.agent_role == "assistant" and len(first.references) in (3, 4)


def test_daily_dialog_reads_the_hub_schema_as_conversations_and_rl4lms_windows():
    from tests.hub_fixtures import hub_fixture

    files = hub_fixture("daily_dialog")
    env = gym.make(
        "textenvs/DailyDialog-v0", model=textenvs.TINY, dataset_kwargs=files, max_turn_tokens=3
    ).unwrapped
    rows = [json.loads(line) for line in open(files["data_files"]["train"])]
    env.reset(seed=0, options={"index": 4})
    utterances = [u.strip() for u in rows[4]["dialog"]]
    assert [c for _, c in env.sample.messages] == utterances
    assert env.sample.references == tuple(utterances[1::2])  # the agent: the second speaker
    windows = gym.make(
        "textenvs/DailyDialog-v0",
        model=textenvs.TINY,
        dataset_kwargs={**files, "context": 2},
        max_turn_tokens=3,
    ).unwrapped
    assert len(windows.samples) == sum(len(r["dialog"]) - 1 for r in rows)
    window = windows.samples[2]  # row 0 has 2 utterances (1 window), row 1 has 3 (2 windows)
    assert [c for _, c in window.messages] == [u.strip() for u in rows[1]["dialog"][0:3]]
    assert window.references == (rows[1]["dialog"][2].strip(),)
    windows.reset(seed=0, options={"index": 2})
    terminated = False
    while not terminated:
        *_, terminated, _, info = windows.step(1)
    assert info["turns"] == 1 and info["stop"] == "responder"  # one agent turn a window
    with pytest.raises(ValueError, match="context"):
        gym.make(
            "textenvs/DailyDialog-v0", model=textenvs.TINY, dataset_kwargs={**files, "context": 0}
        )


def test_a_dialogue_checks_its_fields():
    with pytest.raises(ValueError, match="no content"):
        Dialogue((("user", "hi"), ("assistant", " ")))
    with pytest.raises(ValueError, match="speaks no message"):
        Dialogue((("user", "hi"),), "assistant")
    with pytest.raises(ValueError, match="first_turn=2"):
        Dialogue((("user", "hi"), ("assistant", "yo")), first_turn=2)
    late = Dialogue(
        (("user", "a"), ("assistant", "b"), ("user", "c"), ("assistant", "d")), first_turn=1
    )
    assert late.opening == (("user", "a"), ("assistant", "b"), ("user", "c"))
    assert late.references == ("d",)


def test_sb3_and_q_learning_train_on_conversations_unchanged(tmp_path):
    """The agents' own command lines on a dialogue id, with nothing dialogue-specific."""
    from agents import qlearning
    from agents.sb3 import cli as sb3_cli

    kwargs = json.dumps({"max_turn_tokens": 3, "max_turns": 2})
    result = qlearning.main(
        [
            "--env-id",
            "textenvs/Dialogue-v0",
            "--env-kwargs",
            kwargs,
            "--total-steps",
            "60",
            "--eval-samples",
            "3",
        ]
    )
    assert result["episodes"] == 3 and np.isfinite(result["mean_return"])
    result = sb3_cli.main(
        [
            "--env-id",
            "textenvs/Dialogue-v0",
            "--env-kwargs",
            kwargs,
            "--total-steps",
            "64",
            "--num-envs",
            "2",
            "--n-steps",
            "16",
            "--batch-size",
            "16",
            "--eval-samples",
            "3",
            "--policy",
            "lm_prior",
        ]
    )
    assert result["episodes"] == 3 and 0.0 <= result["mean_metric"] <= 1.0


def test_a_batched_model_reward_scores_the_turns_of_every_sub_env_in_one_call():
    from textenvs.model_rewards import BatchMetric

    calls = []

    def lengths(texts, references):
        calls.append(len(texts))
        return [min(1.0, len(t) / 40) for t in texts]

    metric = BatchMetric(lengths)
    envs = gym.make_vec(
        "textenvs/Dialogue-v0",
        num_envs=3,
        reward=metric,
        dense=True,
        max_turn_tokens=3,
        text_infos=True,
    )
    envs.reset(seed=0)
    for _ in range(4):
        *_, infos = envs.step(np.ones(3, dtype=np.int64))
        expected = [min(1.0, len(t) / 40) for t in infos["text"]]  # the turn each step scored
        assert np.allclose(infos["turn_metric"], expected)
    assert calls and max(calls) == 3  # one call for the three sub-envs of a step
