"""The language-model backend: cache reuse, batching, loading rules, and the built-in tiny model."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from textenvs import lm as lm_backend
from textenvs.rewards import get_metric
from textenvs.tasks import builtin_task


@pytest.fixture(scope="module")
def lm():
    return lm_backend.load()


def test_builtin_model_is_small_and_shipped_as_safetensors(lm):
    folder = lm_backend.BUILTIN_MODELS[lm_backend.TINY]
    assert (folder / "model.safetensors").exists() and (folder / "tokenizer.json").exists()
    assert sum(f.stat().st_size for f in folder.iterdir()) < 10_000_000
    assert 1_000_000 <= lm.model.num_parameters() * 1.05 and lm.model.num_parameters() <= 5_000_000


def test_extend_equals_prefill(lm):
    ids = lm.encode("Article: On Monday, the city council in Norwick approved a bus route.")
    seq, _, _ = lm.prefill(ids[:5])
    hidden, logits = lm.extend(seq, ids[5:])
    _, full_hidden, full_logits = lm.prefill(ids)
    torch.testing.assert_close(hidden, full_hidden[5:], atol=1e-4, rtol=0)
    torch.testing.assert_close(logits[-1], full_logits, atol=1e-4, rtol=0)


def test_crop_then_extend_equals_prefill(lm):
    ids = lm.encode("English: The old farmer sees a red bird.")
    seq, _, _ = lm.prefill(ids)
    lm.crop(seq, 4)
    hidden, _ = lm.extend(seq, ids[4:])
    _, full, _ = lm.prefill(ids)
    torch.testing.assert_close(hidden, full[4:], atol=1e-4, rtol=0)


@pytest.mark.parametrize("overhead", [0.0, 2.0, 1e9], ids=["one-forward-per-row", "grouped", "one-batch"])
@pytest.mark.parametrize("tail_sizes", [[1, 1, 1], [3, 0, 1, 5], [9, 1, 2, 8, 1]])
def test_extend_batch_of_unequal_lengths_equals_single_extends(lm, monkeypatch, tail_sizes, overhead):
    monkeypatch.setattr(lm, "forward_overhead_tokens", overhead)
    texts = ["Article: A", "English: The old farmer sees a red bird near the river", "Veltic: La kolo",
             "Headline: Norwick council", "Article: The mayor"][: len(tail_sizes)]
    batch = [lm.prefill(lm.encode(t))[0] for t in texts]
    single = [lm.prefill(lm.encode(t))[0] for t in texts]
    for step in range(3):
        tails = [[11 + step + j for j in range(n)] for n in tail_sizes]
        results = lm.extend_batch(batch, tails)
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
        groups = lm_backend.plan_tail_groups(sizes, overhead)
        assert sorted(k for g in groups for k in g) == list(range(len(sizes)))  # every row exactly once
        order = sorted(range(len(sizes)), key=lambda k: sizes[k])
        best = min(  # brute force over every way to cut the sorted rows into contiguous groups
            cost([order[a:b] for a, b in zip((0, *cuts), (*cuts, len(order)))], sizes, overhead)
            for r in range(len(order))
            for cuts in itertools.combinations(range(1, len(order)), r)
        )
        assert cost(groups, sizes, overhead) == pytest.approx(best)
    assert lm_backend.plan_tail_groups([5, 1, 9], 1e9) == [[1, 0, 2]]  # a fixed cost that big: one batch
    assert lm_backend.plan_tail_groups([1, 30], 4.0) == [[0], [1]]  # 1 + 30 + 8 < 2 * 30 + 4
    assert lm_backend.plan_tail_groups([], 32.0) == []


@pytest.mark.parametrize("keeps_logits", [True, False], ids=["logits_to_keep", "all-logits"])
def test_prefill_batch_of_unequal_lengths_equals_single_prefills(lm, monkeypatch, keeps_logits):
    # Models without transformers' logits_to_keep return every position's logits; both paths agree.
    texts = ["Article: A", "English: The old farmer sees a red bird near the river", "Headline: Norwick council"]
    full = [lm.model(torch.tensor([lm.encode(t)])).logits[0, -1] for t in texts]
    monkeypatch.setattr(lm, "_keeps_logits", keeps_logits)
    batched = lm.prefill_batch([lm.encode(t) for t in texts])
    for text, (seq, hidden, logits), reference in zip(texts, batched, full):
        torch.testing.assert_close(logits, reference, atol=1e-4, rtol=0)
        single, h, lg = lm.prefill(lm.encode(text))
        assert seq.ids == single.ids and hidden.shape == h.shape
        torch.testing.assert_close(hidden, h, atol=1e-4, rtol=0)
        torch.testing.assert_close(logits, lg, atol=1e-4, rtol=0)
        # The cache continues like the single one.
        torch.testing.assert_close(lm.extend(seq, [17])[1], lm.extend(single, [17])[1], atol=1e-4, rtol=0)
    with pytest.raises(ValueError, match="empty sequence"):
        lm.prefill_batch([[1, 2], []])


def random_model_dir(root, model_type: str) -> str:
    """A randomly initialised small causal LM of ``model_type`` with the tiny tokenizer, saved offline."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(lm_backend.BUILTIN_MODELS[lm_backend.TINY])
    sizes = dict(vocab_size=len(tokenizer), eos_token_id=tokenizer.eos_token_id, bos_token_id=tokenizer.eos_token_id)
    if model_type == "gpt2":
        sizes.update(n_embd=32, n_layer=2, n_head=2, n_positions=256)
    else:
        sizes.update(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                     num_key_value_heads=2, max_position_embeddings=256)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(model_type, **sizes))
    path = root / model_type
    model.save_pretrained(path, safe_serialization=True)
    tokenizer.save_pretrained(path)
    return str(path)


@pytest.mark.parametrize("model_type", ["gpt2", "llama", "qwen2"])
@pytest.mark.parametrize("prepared_mask", [True, False], ids=["4d-mask", "2d-mask"])
def test_lockstep_batch_equals_single_extends(tmp_path, model_type, prepared_mask):
    model = lm_backend.LanguageModel(random_model_dir(tmp_path, model_type))
    assert model.step_mask_4d  # every architecture here takes the prepared mask under SDPA
    model.step_mask_4d = prepared_mask
    prompts = [[5, 6, 7], [8, 9, 10, 11, 12, 13, 14], [15, 16]]
    batch = lm_backend.LockstepBatch(model, 3, slack=1)
    singles = []
    for i, ids in enumerate(prompts):
        batch.load(i, model.prefill(ids)[0])
        singles.append(model.prefill(ids)[0])
    rng = np.random.default_rng(0)
    for step in range(6):
        if step == 3:  # row 1 restarts with a new prompt; its freed slots get compacted away
            batch.load(1, model.prefill([20, 21])[0])
            singles[1] = model.prefill([20, 21])[0]
        tokens = rng.integers(1, model.vocab_size, size=3).tolist()
        hidden, logits = batch.advance(tokens)
        for i, seq in enumerate(singles):
            h, lg = model.extend(seq, [tokens[i]])
            torch.testing.assert_close(hidden[i], h[0], atol=1e-4, rtol=0)
            torch.testing.assert_close(logits[i], lg[0], atol=1e-4, rtol=0)
        # the host-side lengths track the device's mask and positions
        assert batch.lengths == batch.mask.sum(1).tolist() == batch.positions.tolist() == [len(q) for q in singles]


def test_only_plain_full_attention_takes_a_prepared_mask():
    from transformers import AutoConfig

    assert lm_backend.takes_prepared_step_mask(lm_backend.load().model.config)
    eager = AutoConfig.for_model("gpt2")
    eager._attn_implementation = "eager"
    assert not lm_backend.takes_prepared_step_mask(eager)
    sliding = AutoConfig.for_model("qwen2", num_hidden_layers=2, use_sliding_window=True, sliding_window=8,
                                   max_window_layers=0)
    sliding._attn_implementation = "sdpa"
    assert not lm_backend.takes_prepared_step_mask(sliding)
    other = AutoConfig.for_model("bloom")  # ALiBi from the 2D mask
    other._attn_implementation = "sdpa"
    assert not lm_backend.takes_prepared_step_mask(other)


def test_decode_equals_the_tokenizers_decode(lm):
    rng = np.random.default_rng(0)
    cases = [[], [lm.eos_token_id], *(rng.integers(lm.vocab_size, size=n).tolist() for n in (1, 2, 5, 40, 200))]
    for ids in cases:  # random ids include special tokens and bytes that are not whole UTF-8 characters
        assert lm.decode(ids) == lm.tokenizer.decode(ids, skip_special_tokens=True)
    assert lm._backend_decode is not None  # the tiny tokenizer takes the fast path
    assert lm.decode(np.array(cases[-1])) == lm.tokenizer.decode(cases[-1], skip_special_tokens=True)


def test_decode_of_a_tokenizer_that_cleans_up_spaces_keeps_its_clean_up(random_gpt2_dir):
    model = lm_backend.LanguageModel(random_gpt2_dir)
    ids = model.encode("a , b .")
    assert model.decode(ids) == "a , b ."
    model.tokenizer.clean_up_tokenization_spaces = True
    model.tokenizer.clean_up_tokenization_spaces_for_bpe_even_though_it_will_corrupt_output = True
    assert model.decode(ids) == model.tokenizer.decode(ids, skip_special_tokens=True) == "a, b."


def test_sequence_longer_than_context_raises(lm):
    with pytest.raises(ValueError, match="exceeds the context"):
        lm.prefill([1] * (lm.max_positions + 1))


def test_unknown_local_model_raises_before_any_download():
    with pytest.raises(FileNotFoundError, match="looks like a local path"):
        lm_backend.LanguageModel("./missing/model/dir")


def test_folder_without_safetensors_is_refused(tmp_path, random_gpt2_dir):
    import shutil

    from transformers import AutoModelForCausalLM

    folder = tmp_path / "bin_only"
    shutil.copytree(random_gpt2_dir, folder)
    AutoModelForCausalLM.from_pretrained(random_gpt2_dir).save_pretrained(folder, safe_serialization=False)
    (folder / "model.safetensors").unlink(missing_ok=True)
    with pytest.raises(ValueError, match="safetensors"):
        lm_backend.LanguageModel(str(folder))


def test_model_without_causal_lm_head_is_refused(tmp_path, lm):
    from transformers import DistilBertConfig, DistilBertModel

    DistilBertModel(DistilBertConfig(vocab_size=50, dim=16, n_layers=1, n_heads=2, hidden_dim=16)).save_pretrained(tmp_path)
    lm.tokenizer.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="causal LM"):
        lm_backend.LanguageModel(str(tmp_path))


def test_shared_model_with_another_layer_is_refused(lm):
    with pytest.raises(ValueError, match="observes layer"):
        lm_backend.load(lm, layer=2)


def test_tiny_model_leaves_headroom_and_finds_reference_tokens(lm):
    """Greedy decoding scores above zero but far below 1.0; the reference token is often in the top 8."""
    for name, metric_name in (("summarize", "rougeL"), ("translate", "bleu")):
        task, metric = builtin_task(name), get_metric(metric_name)
        scores, hits, total = [], 0, 0
        for s in task.split("test")[:30]:
            prompt = lm.encode(task.prompt(s))
            scores.append(metric(lm.greedy(prompt, 40), s.references))
            target = lm.encode(" " + s.references[0])
            with torch.no_grad():
                logits = lm.model(torch.tensor([prompt + target])).logits[0, len(prompt) - 1 : -1]
            top8 = logits.topk(8).indices
            hits += sum(int(t in row) for t, row in zip(target, top8.tolist(), strict=False))
            total += len(target)
        assert 0.0 < np.mean(scores) < 0.6, (name, np.mean(scores))
        assert hits / total > 0.5, (name, hits / total)
