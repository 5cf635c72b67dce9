"""Model-based rewards (BERTScore, classifier, batch callables) and instruction-tuned (chat
template) prompts, on randomly initialised models saved to temp folders."""

from __future__ import annotations

import gymnasium as gym
import numpy as np
import pytest
import torch

import textenvs
from tests.conftest import CLASSIFIER_DIR, ENCODER_DIR
from textenvs.model_rewards import BatchMetric, shared_metric

BERTSCORE = {"model": ENCODER_DIR, "num_layers": 2}


def test_bertscore_equals_the_package_score():
    from bert_score import BERTScorer

    metric = shared_metric("bertscore", BERTSCORE)
    scorer = BERTScorer(model_type=ENCODER_DIR, num_layers=2, use_fast_tokenizer=True)
    hyp, refs = "the council met on monday", ("the mayor said that", "the council met")
    p, r, f = scorer.score([hyp], [list(refs)])
    assert metric(hyp, refs) == pytest.approx(float(f[0]), abs=1e-6)
    # the second time the references' embeddings are remembered: the same score
    assert metric(hyp, refs) == pytest.approx(float(f[0]), abs=1e-6)
    other = "the council met on monday to discuss a new plan for the river bridge"
    assert metric.score_batch([other, hyp], [refs[:1], refs], ["", ""])[1] == pytest.approx(
        float(f[0]), abs=1e-6
    )
    recall = shared_metric("bertscore", {**BERTSCORE, "output": "recall"})
    assert recall(hyp, refs) == pytest.approx(float(r[0]), abs=1e-6)
    assert metric("", refs) == 0.0  # the empty text: no forward


def test_length_batches_is_the_cheapest_cut_into_consecutive_batches():
    import itertools
    import math

    from textenvs.model_rewards import length_batches

    def cost(batches, lengths, overhead):
        at, total = 0, 0.0
        for batch in batches:
            total += len(batch) * lengths[at] + overhead
            at += len(batch)
        return total

    rng = np.random.default_rng(0)
    for _ in range(60):
        n = int(rng.integers(1, 9))
        lengths = sorted(rng.integers(1, 40, size=n).tolist(), reverse=True)
        items, size, overhead = list(range(n)), int(rng.integers(1, 5)), float(rng.integers(0, 60))
        batches = length_batches(items, lengths, size, overhead)
        assert [i for b in batches for i in b] == items and max(map(len, batches)) <= size
        best = math.inf  # every way to cut n items into consecutive batches, by brute force
        for cuts in itertools.product([False, True], repeat=n - 1):
            bounds = [0] + [i + 1 for i, c in enumerate(cuts) if c] + [n]
            tried = [items[a:b] for a, b in zip(bounds, bounds[1:])]
            if max(map(len, tried)) <= size:
                best = min(best, cost(tried, lengths, overhead))
        assert cost(batches, lengths, overhead) == pytest.approx(best)
    assert length_batches([0, 1, 2], [9, 5, 1], 2, math.inf) == [[0, 1], [2]]
    assert length_batches([0, 1], [30, 2], 8, 0.0) == [[0], [1]]  # padding 28 tokens costs more
    assert length_batches([0, 1], [30, 2], 8, 100.0) == [[0, 1]]
    with pytest.raises(ValueError, match="sorted longest first"):
        length_batches([0, 1], [2, 30], 8, 1.0)


def test_bertscore_of_texts_of_many_lengths_encoded_in_several_forwards_equals_the_package():
    from bert_score import BERTScorer

    metric = shared_metric("bertscore", BERTSCORE)
    scorer = BERTScorer(model_type=ENCODER_DIR, num_layers=2, use_fast_tokenizer=True)
    words = "the council met on monday to discuss a new plan for the river bridge and".split()
    texts = [" ".join(words[: 1 + (i * 7) % len(words)] * (1 + i % 3)) for i in range(12)]
    refs = [("the council met on monday",), ("a plan for the bridge", "the river")] * 6
    metric.score_batch(texts, refs, [""] * 12)  # the references' embeddings are now kept
    calls = []
    model = metric.scorer._model
    hook = model.register_forward_hook(lambda m, args, kwargs_out: calls.append(args[0].shape))
    try:
        values = metric.score_batch(texts, refs, [""] * 12)
    finally:
        hook.remove()
    assert len(calls) > 1  # the texts cut by length: their padding costs more than a forward
    for text, ref, value in zip(texts, refs, values):
        expected = max(float(scorer.score([text], [[r]])[2][0]) for r in ref)
        assert value == pytest.approx(expected, abs=1e-5)


def test_classifier_equals_the_softmax_of_its_label():
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    model = AutoModelForSequenceClassification.from_pretrained(CLASSIFIER_DIR)
    tokenizer = AutoTokenizer.from_pretrained(CLASSIFIER_DIR)
    text = "the council met"
    with torch.no_grad():
        logits = model(**tokenizer(text, return_tensors="pt")).logits[0]
    prob = shared_metric("classifier", {"model": CLASSIFIER_DIR, "label": "positive"})
    logit = shared_metric("classifier", {"model": CLASSIFIER_DIR, "label": 0, "output": "logit"})
    assert prob(text, ()) == pytest.approx(float(logits.softmax(-1)[1]), abs=1e-6)
    assert logit(text, ()) == pytest.approx(float(logits[0]), abs=1e-5)
    pair = shared_metric("classifier", {"model": CLASSIFIER_DIR, "input": "prompt+text"})
    with torch.no_grad():
        pair_logits = model(**tokenizer("a prompt", text, return_tensors="pt")).logits[0]
    assert pair(text, (), "a prompt") == pytest.approx(float(pair_logits.softmax(-1)[1]), abs=1e-6)


def test_classifier_refusals(random_gpt2_dir, tmp_path):
    with pytest.raises(ValueError, match="has no label 'happy'.*NEGATIVE"):
        shared_metric("classifier", {"model": CLASSIFIER_DIR, "label": "happy"})
    with pytest.raises(ValueError, match="not a trained sequence classifier"):
        shared_metric("classifier", {"model": random_gpt2_dir})
    with pytest.raises(ValueError, match="needs reward_kwargs=\\{'model'"):
        shared_metric("classifier", {})
    with pytest.raises(ValueError, match="takes the reward_kwargs"):
        shared_metric("classifier", {"model": CLASSIFIER_DIR, "lable": "POSITIVE"})
    with pytest.raises(ValueError, match="input='reply' is not valid"):
        shared_metric("classifier", {"model": CLASSIFIER_DIR, "input": "reply"})
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(ValueError, match="no model.safetensors"):
        shared_metric("classifier", {"model": str(tmp_path)})
    with pytest.raises(ValueError, match="num_layers"):
        shared_metric("bertscore", {"model": ENCODER_DIR})
    with pytest.raises(ValueError, match="batch_size.*int >= 1"):
        shared_metric("bertscore", {**BERTSCORE, "batch_size": 0})
    with pytest.raises(ValueError, match="max_length.*int >= 1"):
        shared_metric("classifier", {"model": CLASSIFIER_DIR, "max_length": "64"})
    with pytest.raises(ValueError, match="takes none"):
        gym.make("textenvs/Summarize-v0", reward_kwargs={"model": ENCODER_DIR})


def _envs(num, reward, dense, **kwargs):
    common = dict(
        task="summarize", reward=reward, dense=dense, max_steps=4, token_mode="topk", k=4, **kwargs
    )
    vec = gym.make_vec(
        "textenvs/Generate-v0",
        num_envs=num,
        vectorization_mode="vector_entry_point",
        text_infos=True,
        autoreset_mode="SameStep",
        **common,
    )
    singles = [gym.make("textenvs/Generate-v0", **common) for _ in range(num)]
    return vec, singles


@pytest.mark.parametrize("dense", [True, False])
@pytest.mark.parametrize("kind", ["bertscore", "classifier", "batch"])
def test_batched_vector_env_equals_single_envs(kind, dense):
    calls = []

    def overlap(texts, references):
        calls.append(len(texts))
        return [len(set(t.split()) & set(r[0].split())) / 10 for t, r in zip(texts, references)]

    reward, kwargs = {
        "bertscore": ("bertscore", {"reward_kwargs": BERTSCORE}),
        "classifier": ("classifier", {"reward_kwargs": {"model": CLASSIFIER_DIR}}),
        "batch": (BatchMetric(overlap), {}),
    }[kind]
    vec, singles = _envs(4, reward, dense, **kwargs)
    vec.reset(seed=3)
    for i, env in enumerate(singles):
        env.reset(seed=3 + i)
    rng = np.random.default_rng(0)
    for _ in range(9):
        actions = rng.integers(4, size=4)
        calls.clear()
        _, rewards, terms, _, infos = vec.step(actions)
        if kind == "batch":
            assert len(calls) <= 1  # ONE call of the metric for every sub-env that needs a score
        for i, env in enumerate(singles):
            _, reward_i, term_i, _, info_i = env.step(int(actions[i]))
            assert rewards[i] == pytest.approx(reward_i, abs=1e-5)
            assert terms[i] == term_i
            if term_i:
                assert infos["final_info"]["metric"][i] == pytest.approx(info_i["metric"], abs=1e-5)
                env.reset()
    assert np.isfinite(rewards).all()


def test_model_metrics_are_terminal_by_default_and_dense_on_request():
    env = gym.make("textenvs/Summarize-v0", reward="bertscore", reward_kwargs=BERTSCORE).unwrapped
    assert env.shaper.dense is False and env.shaper.name == "bertscore"
    dense = gym.make(
        "textenvs/Summarize-v0", reward="bertscore", reward_kwargs=BERTSCORE, dense=True
    ).unwrapped
    assert dense.shaper.dense is True
    assert gym.make("textenvs/Summarize-v0").unwrapped.shaper.dense is True
    # one scorer per process, shared by the envs that name it
    assert env.shaper.metric is dense.shaper.metric


def test_batch_metric_returning_nan_is_refused():
    env = gym.make(
        "textenvs/Summarize-v0",
        reward=BatchMetric(lambda t, r: [float("nan")] * len(t)),
        dense=True,
    )
    env.reset(seed=0)
    with pytest.raises(ValueError, match="finite number"):
        env.step(5)


def test_edit_env_with_a_classifier_reward_in_a_vector_env():
    envs = gym.make_vec(
        "textenvs/Edit-v0",
        num_envs=3,
        vectorization_mode="vector_entry_point",
        reward="classifier",
        reward_kwargs={"model": CLASSIFIER_DIR},
        max_len=12,
        max_steps=3,
    )
    envs.reset(seed=0)
    for _ in range(4):
        _, rewards, *_ = envs.step(envs.action_space.sample())
        assert np.isfinite(rewards).all()


# -- chat templates ---------------------------------------------------------------------------
CHAT = (
    "{% for m in messages %}<|user|> {{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


@pytest.fixture(scope="module")
def chat_model_dir(tmp_path_factory):
    """The tiny model with a chat template and an end-of-turn token ('\\n') besides EOS."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = tmp_path_factory.mktemp("chat_model")
    source = textenvs.lm.BUILTIN_MODELS[textenvs.TINY]
    tokenizer = AutoTokenizer.from_pretrained(source)
    tokenizer.chat_template = CHAT
    model = AutoModelForCausalLM.from_pretrained(source)
    end_of_turn = tokenizer.encode("\n", add_special_tokens=False)[0]
    model.generation_config.eos_token_id = [tokenizer.eos_token_id, end_of_turn]
    model.save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)
    return str(folder), end_of_turn


def test_chat_prompt_ids_equal_apply_chat_template(chat_model_dir):
    folder, _ = chat_model_dir
    env = gym.make("textenvs/Summarize-v0", model=folder, chat_template=True).unwrapped
    env.reset(seed=0)
    expected = env.lm.tokenizer.apply_chat_template(
        [{"role": "user", "content": env.prompt}], add_generation_prompt=True, tokenize=True
    )
    expected = expected if isinstance(expected, list) else expected["input_ids"]
    assert env.sequence.ids == list(expected)
    plain = gym.make("textenvs/Summarize-v0", model=folder).unwrapped
    plain.reset(seed=0)
    assert plain.sequence.ids == env.lm.encode(plain.prompt)


def test_episode_ends_at_the_end_of_turn_token_and_scores_the_reply(chat_model_dir):
    folder, end_of_turn = chat_model_dir
    env = gym.make("textenvs/Summarize-v0", model=folder, chat_template=True).unwrapped
    env.reset(seed=0)
    env.step(37)
    *_, terminated, _, info = env.step(end_of_turn)
    assert terminated and info["stop"] == "eos" and info["tokens"] == 1
    assert info["text"] == env.lm.decode([37]).strip()  # the reply alone, no template


def test_chat_template_truncates_the_source_not_the_template(chat_model_dir):
    folder, _ = chat_model_dir
    env = gym.make(
        "textenvs/Summarize-v0",
        model=folder,
        chat_template=True,
        too_long="truncate",
        max_steps=460,
    ).unwrapped
    env.reset(seed=0)
    assert env.sequence.ids[-len(env.lm.encode("<|assistant|>")) :] == env.lm.encode(
        "<|assistant|>"
    )
    assert len(env.sequence) + 460 <= env.lm.max_positions


def test_edit_env_drafts_through_the_chat_template(chat_model_dir):
    folder, end_of_turn = chat_model_dir
    env = gym.make(
        "textenvs/EditSummary-v0", model=folder, chat_template=True, max_len=12
    ).unwrapped
    env.reset(seed=0)
    prompt_ids = env.sequence.ids[: env._prompt_len]
    assert prompt_ids == env.encode_prompt(env.prompt)
    assert end_of_turn not in env.text_ids


def test_a_tokenizer_without_a_chat_template_is_refused():
    with pytest.raises(ValueError, match="has no chat template"):
        gym.make("textenvs/Summarize-v0", chat_template=True)
    with pytest.raises(ValueError, match="chat_template must be True or False"):
        gym.make("textenvs/Summarize-v0", chat_template="yes")


def test_token_ppo_trains_a_chat_model_through_its_template(chat_model_dir):
    from agents.token_ppo import TokenPPO, TokenPPOConfig

    folder, _ = chat_model_dir
    trainer = TokenPPO(
        TokenPPOConfig(
            model=folder,
            env_kwargs={"chat_template": True},
            num_envs=2,
            max_new_tokens=4,
            total_episodes=4,
            minibatch_size=2,
            num_epochs=1,
            eval_samples=2,
        )
    )
    history = trainer.train(progress=False)
    assert history and np.isfinite(history[-1]["kl"])
    rollout_env = trainer.envs.unwrapped.envs[0]
    assert rollout_env.chat_template
    assert rollout_env.sequence.ids[: rollout_env._prompt_len] == rollout_env.encode_prompt(
        rollout_env.prompt
    )
    assert np.isfinite(trainer.evaluate())


def test_batch_metric_and_token_ppo_env_kwargs_refusals():
    from agents.token_ppo import TokenPPOConfig

    with pytest.raises(TypeError, match="needs a callable"):
        BatchMetric("not a function")
    metric = BatchMetric(lambda texts, refs: [1.0])  # one value for two texts
    with pytest.raises(ValueError, match="one finite number per text"):
        metric.prefetch([("a", ("r",), ""), ("b", ("r",), "")])
    with pytest.raises(ValueError, match="env_kwargs must be a dict"):
        TokenPPOConfig(env_kwargs="chat_template=True").validate()
