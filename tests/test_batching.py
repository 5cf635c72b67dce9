"""Batched forwards: padded / grouped tails, batched prompts and the lockstep batch equal single
forwards.
"""

from __future__ import annotations

import collections

import numpy as np
import pytest
import torch

from textenvs.batching import (
    LockstepBatch,
    extend_batch,
    greedy_batch,
    plan_tail_groups,
    prefill_batch,
    takes_prepared_step_mask,
)
from textenvs.lm import BUILTIN_MODELS, TINY, LanguageModel, shared_model


@pytest.fixture(scope="module")
def lm():
    return shared_model()


@pytest.mark.parametrize(
    "overhead", [0.0, 2.0, 1e9], ids=["one-forward-per-row", "grouped", "one-batch"]
)
@pytest.mark.parametrize("tail_sizes", [[1, 1, 1], [3, 0, 1, 5], [9, 1, 2, 8, 1]])
def test_extend_batch_of_unequal_lengths_equals_single_extends(
    lm, monkeypatch, tail_sizes, overhead
):
    monkeypatch.setattr(lm, "forward_overhead_tokens", overhead)
    texts = [
        "Article: A",
        "English: The old farmer sees a red bird near the river",
        "Veltic: La kolo",
        "Headline: Norwick council",
        "Article: The mayor",
    ][: len(tail_sizes)]
    batch = [lm.prefill(lm.encode(t))[0] for t in texts]
    single = [lm.prefill(lm.encode(t))[0] for t in texts]
    for step in range(3):
        tails = [[11 + step + j for j in range(n)] for n in tail_sizes]
        results = extend_batch(lm, batch, tails)
        for i, seq in enumerate(single):
            if not tails[i]:
                assert results[i] is None
                continue
            h, lg = lm.extend(seq, tails[i])
            torch.testing.assert_close(results[i][0], h, atol=1e-4, rtol=0)
            torch.testing.assert_close(results[i][1], lg, atol=1e-4, rtol=0)
    assert [s.ids for s in batch] == [s.ids for s in single]
    for a, b in zip(batch, single):  # the kept caches are the single-sequence caches
        for la, lb in zip(a.cache.layers, b.cache.layers):
            torch.testing.assert_close(la.keys, lb.keys, atol=1e-4, rtol=0)


def test_tail_groups_are_the_cheapest_contiguous_split():
    import itertools

    def cost(groups, sizes, overhead):
        return sum(overhead + len(g) * max(sizes[k] for k in g) for g in groups)

    rng = np.random.default_rng(0)
    for _ in range(200):
        sizes = rng.integers(1, 40, size=int(rng.integers(1, 8))).tolist()
        overhead = float(rng.choice([0.0, 3.0, 16.0, 32.0, 1e9]))
        groups = plan_tail_groups(sizes, overhead)
        assert sorted(k for g in groups for k in g) == list(
            range(len(sizes))
        )  # every row exactly once
        order = sorted(range(len(sizes)), key=lambda k: sizes[k])
        best = min(  # brute force over every way to cut the sorted rows into contiguous groups
            cost([order[a:b] for a, b in zip((0, *cuts), (*cuts, len(order)))], sizes, overhead)
            for r in range(len(order))
            for cuts in itertools.combinations(range(1, len(order)), r)
        )
        assert cost(groups, sizes, overhead) == pytest.approx(best)
    assert plan_tail_groups([5, 1, 9], 1e9) == [[1, 0, 2]]  # a fixed cost that big: one batch
    assert plan_tail_groups([1, 30], 4.0) == [[0], [1]]  # 1 + 30 + 8 < 2 * 30 + 4
    assert plan_tail_groups([], 32.0) == []


@pytest.mark.parametrize("keeps_logits", [True, False], ids=["logits_to_keep", "all-logits"])
def test_prefill_batch_of_unequal_lengths_equals_single_prefills(lm, monkeypatch, keeps_logits):
    # Models without transformers' logits_to_keep return every position's logits; both paths agree.
    texts = [
        "Article: A",
        "English: The old farmer sees a red bird near the river",
        "Headline: Norwick council",
    ]
    full = [lm.model(torch.tensor([lm.encode(t)])).logits[0, -1] for t in texts]
    monkeypatch.setattr(lm, "keeps_logits", keeps_logits)
    batched = prefill_batch(lm, [lm.encode(t) for t in texts])
    for text, (seq, hidden, logits), reference in zip(texts, batched, full):
        torch.testing.assert_close(logits, reference, atol=1e-4, rtol=0)
        single, h, lg = lm.prefill(lm.encode(text))
        assert seq.ids == single.ids and hidden.shape == h.shape
        torch.testing.assert_close(hidden, h, atol=1e-4, rtol=0)
        torch.testing.assert_close(logits, lg, atol=1e-4, rtol=0)
        # The cache continues like the single one.
        torch.testing.assert_close(
            lm.extend(seq, [17])[1], lm.extend(single, [17])[1], atol=1e-4, rtol=0
        )
    with pytest.raises(ValueError, match="empty sequence"):
        prefill_batch(lm, [[1, 2], []])


def test_prefill_batch_runs_identical_prompts_once_and_each_copy_goes_on_alone(lm, monkeypatch):
    # A group of completions of one prompt (GRPO / RLOO): two distinct rows run, not five.
    a, b = lm.encode("Article: A council"), lm.encode("English: The old farmer sees")
    rows = []
    forward = lm.forward
    monkeypatch.setattr(
        lm, "forward", lambda ids, *x, **k: rows.append(len(ids)) or forward(ids, *x, **k)
    )
    batched = prefill_batch(lm, [a, b, a, a, b])
    assert rows == [2]
    monkeypatch.undo()
    for ids, (seq, hidden, logits) in zip([a, b, a, a, b], batched):
        single, h, lg = lm.prefill(ids)
        assert seq.ids == ids and seq.ids is not ids
        torch.testing.assert_close(hidden, h, atol=1e-4, rtol=0)
        torch.testing.assert_close(logits, lg, atol=1e-4, rtol=0)
    # copies of one row share its cache's memory but go on on their own
    first, second = batched[0][0], batched[2][0]
    torch.testing.assert_close(
        lm.extend(first, [17])[1], lm.extend(lm.prefill(a)[0], [17])[1], atol=1e-4, rtol=0
    )
    torch.testing.assert_close(
        lm.extend(second, [40])[1], lm.extend(lm.prefill(a)[0], [40])[1], atol=1e-4, rtol=0
    )
    assert len(first) == len(second) == len(a) + 1 and first.ids[-1] == 17
    assert prefill_batch(lm, [a])[0][0].ids == a  # one sequence: the plain prefill


def random_model_dir(root, model_type: str) -> str:
    """A randomly initialised small causal LM of ``model_type`` with the tiny tokenizer, saved
    offline.
    """
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(BUILTIN_MODELS[TINY])
    sizes = dict(
        vocab_size=len(tokenizer),
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=tokenizer.eos_token_id,
    )
    if model_type == "gpt2":
        sizes.update(n_embd=32, n_layer=2, n_head=2, n_positions=256)
    else:
        sizes.update(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=256,
        )
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(model_type, **sizes))
    path = root / model_type
    model.save_pretrained(path, safe_serialization=True)
    tokenizer.save_pretrained(path)
    return str(path)


@pytest.mark.parametrize("model_type", ["gpt2", "llama", "qwen2"])
@pytest.mark.parametrize("prepared_mask", [True, False], ids=["4d-mask", "2d-mask"])
def test_lockstep_batch_equals_single_extends(tmp_path, model_type, prepared_mask):
    model = LanguageModel(random_model_dir(tmp_path, model_type))
    batch = LockstepBatch(model, 3, slack=1)
    assert batch.mask_4d  # every architecture here takes the prepared mask under SDPA
    batch.mask_4d = prepared_mask
    prompts = [[5, 6, 7], [8, 9, 10, 11, 12, 13, 14], [15, 16]]
    singles = []
    for i, ids in enumerate(prompts):
        seq = model.prefill(ids)[0]
        batch.adopt(i, seq)
        assert seq.cache is None and batch.rows[i] is seq  # the batch owns the row's cache now
        singles.append(model.prefill(ids)[0])
    rng = np.random.default_rng(0)
    for step in range(8):
        if step == 3:  # row 1 restarts with a new prompt; its freed slots get compacted away
            batch.adopt(1, model.prefill([20, 21])[0])
            singles[1] = model.prefill([20, 21])[0]
        # rows sit steps out now and then (a NextStep reset): their sequences must not change
        stepping = [i for i in range(3) if not (step in (2, 5) and i == step % 3)]
        tokens = rng.integers(1, model.vocab_size, size=3).tolist()
        hidden, logits = batch.advance(tokens, stepping)
        for i in stepping:
            h, lg = model.extend(singles[i], [tokens[i]])
            torch.testing.assert_close(hidden[i], h[0], atol=1e-4, rtol=0)
            torch.testing.assert_close(logits[i], lg[0], atol=1e-4, rtol=0)
        # the host-side lengths track the device's mask and the rows' ids
        assert batch.lengths == batch.mask.sum(1).tolist() == [len(q) for q in singles]
        assert [row.ids for row in batch.rows] == [q.ids for q in singles]
    assert batch.slots <= max(batch.lengths) + batch.slack + 1  # sat-out slots are reclaimed too


def test_lockstep_batch_before_any_row_raises():
    with pytest.raises(RuntimeError, match="adopt"):
        LockstepBatch(shared_model(), 2).advance([1, 2])


def test_only_plain_full_attention_takes_a_prepared_mask():
    from transformers import AutoConfig

    assert takes_prepared_step_mask(shared_model().model.config)
    eager = AutoConfig.for_model("gpt2")
    eager._attn_implementation = "eager"
    assert not takes_prepared_step_mask(eager)
    sliding = AutoConfig.for_model(
        "qwen2", num_hidden_layers=2, use_sliding_window=True, sliding_window=8, max_window_layers=0
    )
    sliding._attn_implementation = "sdpa"
    assert not takes_prepared_step_mask(sliding)
    other = AutoConfig.for_model("bloom")  # ALiBi from the 2D mask
    other._attn_implementation = "sdpa"
    assert not takes_prepared_step_mask(other)


def test_greedy_batch_equals_one_greedy_per_prompt_and_fills_a_shared_models_memo(monkeypatch):
    """Prompts of different lengths, budgets with and without EOS inside them: each text is the
    single-prompt greedy text; a shared model remembers them and a second call runs no forward."""
    from textenvs.tasks import resolve_task

    own = LanguageModel(TINY)  # no memo: every call decodes
    task = resolve_task("translate", None, None)
    prompts = [own.encode(task.prompt(s)) for s in task.split("validation")[:5]]
    prompts.append(own.encode("Article: The council met.\nHeadline: Council meets.\n"))
    for budget in (1, 6, 40):
        expected = [own._greedy(p, budget) for p in prompts]
        assert greedy_batch(own, prompts, budget) == expected
        assert greedy_batch(own, prompts[2:3], budget) == expected[2:3]
    assert any(len(t.split()) < 10 for t in expected)  # some rows stop at EOS before 40 tokens
    assert greedy_batch(own, prompts, 0) == [""] * len(prompts)
    shared = LanguageModel(TINY)
    shared._greedy_cache = collections.OrderedDict()  # as shared_model() makes it
    assert shared.remembers_greedy and not own.remembers_greedy
    assert greedy_batch(shared, prompts, 6) == [own._greedy(p, 6) for p in prompts]
    monkeypatch.setattr(shared, "forward", lambda *a, **k: pytest.fail("ran a forward"))
    assert greedy_batch(shared, prompts[::-1], 6) == [shared.greedy(p, 6) for p in prompts[::-1]]
