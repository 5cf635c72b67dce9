"""The language-model backend: cache reuse, loading rules, and the built-in tiny model."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from textenvs import lm as lm_backend
from textenvs.rewards import get_metric
from textenvs.tasks import builtin_task


@pytest.fixture(scope="module")
def lm():
    return lm_backend.shared_model()


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


def test_decode_equals_the_tokenizers_decode(lm):
    rng = np.random.default_rng(0)
    cases = [
        [],
        [lm.eos_token_id],
        *(rng.integers(lm.vocab_size, size=n).tolist() for n in (1, 2, 5, 40, 200)),
    ]
    for (
        ids
    ) in cases:  # random ids include special tokens and bytes that are not whole UTF-8 characters
        assert lm.decode(ids) == lm.tokenizer.decode(ids, skip_special_tokens=True)
    assert lm._backend_decode is not None  # the tiny tokenizer takes the fast path
    assert lm.decode(np.array(cases[-1])) == lm.tokenizer.decode(
        cases[-1], skip_special_tokens=True
    )


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
    with pytest.raises(FileNotFoundError, match="not a folder here and not a hub name"):
        lm_backend.LanguageModel("./missing/model/dir")


def test_folder_without_safetensors_is_refused(tmp_path, random_gpt2_dir):
    import shutil

    from transformers import AutoModelForCausalLM

    folder = tmp_path / "bin_only"
    shutil.copytree(random_gpt2_dir, folder)
    AutoModelForCausalLM.from_pretrained(random_gpt2_dir).save_pretrained(
        folder, safe_serialization=False
    )
    (folder / "model.safetensors").unlink(missing_ok=True)
    with pytest.raises(ValueError, match="safetensors"):
        lm_backend.LanguageModel(str(folder))


def test_model_without_causal_lm_head_is_refused(tmp_path, lm):
    from transformers import DistilBertConfig, DistilBertModel

    DistilBertModel(
        DistilBertConfig(vocab_size=50, dim=16, n_layers=1, n_heads=2, hidden_dim=16)
    ).save_pretrained(tmp_path)
    lm.tokenizer.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="causal LM"):
        lm_backend.LanguageModel(str(tmp_path))


def test_shared_model_with_another_layer_is_refused(lm):
    with pytest.raises(ValueError, match="observes layer"):
        lm_backend.shared_model(lm, layer=2)


def test_tiny_model_leaves_headroom_and_finds_reference_tokens(lm):
    """Greedy decoding scores above zero but far below 1.0; the reference token is often in the top
    8.
    """
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


def test_a_bare_name_that_is_no_folder_fails_at_once_without_the_hub(monkeypatch):
    import huggingface_hub

    def no_hub(*args, **kwargs):
        raise AssertionError("the hub was asked")

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", no_hub)
    with pytest.raises(FileNotFoundError, match="not a folder here and not a hub name"):
        lm_backend.LanguageModel("my_local_model")


@pytest.mark.parametrize(
    "device,match",
    [
        ("gpu", "not a torch device"),
        ("cuda", "no CUDA|CUDA device"),
        ("cuda:7", "no CUDA|CUDA device"),
    ],
)
def test_devices_this_machine_cannot_use_are_refused(device, match):
    if device.startswith("cuda") and torch.cuda.device_count() > 7:
        pytest.skip("this machine has that device")
    if device == "cuda" and torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    with pytest.raises(ValueError, match=match):
        lm_backend.LanguageModel(device=device)


def test_dtype_by_name_and_bad_dtype():
    assert lm_backend.resolve_dtype("bfloat16") is torch.bfloat16
    assert lm_backend.resolve_dtype("torch.float16") is torch.float16
    with pytest.raises(ValueError, match="dtype='x' is not a dtype"):
        lm_backend.LanguageModel(dtype="x")


def test_a_model_that_needs_its_own_code_is_refused_without_advising_remote_code(
    tmp_path, random_gpt2_dir
):
    import json
    import shutil

    folder = tmp_path / "custom"
    shutil.copytree(random_gpt2_dir, folder)
    config = json.loads((folder / "config.json").read_text())
    config["auto_map"] = {"AutoModelForCausalLM": "modeling_custom.CustomLM"}
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="never runs code") as e:
        lm_backend.LanguageModel(str(folder))
    assert "trust_remote_code=True" not in str(e.value)


def test_weights_that_do_not_match_the_config_are_refused(tmp_path, random_gpt2_dir):
    import shutil

    from transformers import BertConfig

    folder = tmp_path / "bert_config_gpt2_weights"
    shutil.copytree(random_gpt2_dir, folder)
    BertConfig(
        vocab_size=1024,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
    ).save_pretrained(folder)
    with pytest.raises(ValueError, match="config.json does not describe the weights beside it"):
        lm_backend.LanguageModel(str(folder))


def test_an_encoder_saved_as_a_causal_lm_is_refused(tmp_path, lm):
    from transformers import BertConfig, BertLMHeadModel

    config = BertConfig(
        vocab_size=1024,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
    )  # is_decoder=False: bidirectional attention
    BertLMHeadModel(config).save_pretrained(tmp_path, safe_serialization=True)
    lm.tokenizer.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="is not causal"):
        lm_backend.LanguageModel(str(tmp_path))


def test_special_token_strings_are_plain_text(lm):
    ids = lm.encode("hello <|endoftext|> world")
    assert lm.eos_token_id not in ids and lm.decode(ids) == "hello <|endoftext|> world"


def test_shared_models_remember_greedy_drafts_and_caller_models_recompute(monkeypatch):
    """A shared (read-only) model memoises greedy(): the same text, no forward the second time; a
    model the caller built (and may train) runs every time; the memo keeps GREEDY_CACHE entries."""
    from textenvs.lm import TINY, LanguageModel, shared_model

    shared, own = shared_model(TINY), LanguageModel(TINY)
    prompt = shared.encode("Article: the council opened a bridge.\nHeadline:")
    for model, runs_again in ((shared, False), (own, True)):
        first = model.greedy(prompt, 6)
        calls = []
        original = model.prefill
        monkeypatch.setattr(
            model, "prefill", lambda ids, c=calls, f=original: c.append(1) or f(ids)
        )
        assert model.greedy(prompt, 6) == first
        assert bool(calls) is runs_again
        assert model.greedy(prompt, 3) == own._greedy(prompt, 3)  # the budget is part of the key
    monkeypatch.setattr(lm_backend, "GREEDY_CACHE", 2)
    for n in (1, 2, 4):
        shared.greedy(prompt, n)
    assert len(shared._greedy_cache) == 2


def test_gpt2s_tanh_gelu_runs_as_one_kernel_and_computes_the_same_logits(random_gpt2_dir):
    from transformers import AutoModelForCausalLM
    from transformers.activations import ACT2CLS

    plain = AutoModelForCausalLM.from_pretrained(random_gpt2_dir).eval()
    model = lm_backend.LanguageModel(random_gpt2_dir).model
    activations = [type(block.mlp.act) for block in model.transformer.h]
    assert activations == [ACT2CLS["gelu_pytorch_tanh"]] * plain.config.n_layer
    assert all(type(block.mlp.act) is ACT2CLS["gelu_new"] for block in plain.transformer.h)
    ids = torch.randint(
        0, plain.config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(0)
    )
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, plain(ids).logits, atol=1e-5, rtol=0)
    assert lm_backend.fuse_tanh_gelu(model) == 0  # nothing left to swap


def test_models_with_other_activations_are_left_as_they_are():
    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(GPT2Config(n_embd=16, n_layer=1, n_head=2, activation_function="relu"))
    before = [type(m) for m in model.modules()]
    assert lm_backend.fuse_tanh_gelu(model) == 0
    assert [type(m) for m in model.modules()] == before


def test_loading_a_model_prints_no_progress_bar(capfd):
    from transformers.utils import logging as hf_logging

    from textenvs.lm import LanguageModel

    capfd.readouterr()
    LanguageModel(lm_backend.TINY)
    assert "Loading weights" not in capfd.readouterr().err
    assert hf_logging.is_progress_bar_enabled()  # the user's own loads keep their bars


def test_writing_eos_prints_no_padding_warning():
    """An unpadded sequence holding EOS (= the tiny model's pad id) is not padding: no
    transformers warning about a missing attention mask. In a fresh process, because
    transformers warns once per process."""
    import os
    import subprocess
    import sys

    code = (
        "from textenvs.lm import LanguageModel\n"
        "lm = LanguageModel()\n"
        "assert lm.eos_token_id == lm.model.config.pad_token_id\n"  # the case that tripped it
        "seq = lm.prefill([5, 6, 7])[0]\n"
        "lm.extend(seq, [lm.eos_token_id, 5])\n"  # transformers checks both ends of the input
    )
    env = {k: v for k, v in os.environ.items() if k != "TRANSFORMERS_VERBOSITY"}  # a user's default
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env
    )
    assert done.returncode == 0, done.stderr
    assert "attention_mask" not in done.stderr


def test_an_empty_model_is_its_layout_on_the_meta_device(random_gpt2_dir):
    """``empty=True`` (a sharded trainer's start): the config's layout, no weight allocated; the
    same tokenizer, ends and sizes as the loaded model; ``loaded()`` checks it once filled."""
    import torch

    from textenvs.lm import LanguageModel

    empty = LanguageModel(random_gpt2_dir, empty=True)
    whole = LanguageModel(random_gpt2_dir)
    assert all(p.device.type == "meta" for p in empty.model.parameters())
    assert (empty.vocab_size, empty.hidden_size, empty.stop_token_ids, empty.max_positions) == (
        whole.vocab_size,
        whole.hidden_size,
        whole.stop_token_ids,
        whole.max_positions,
    )
    empty.model.to_empty(device="cpu")
    empty.model.tie_weights()  # outside FSDP, to_empty gives the tied head storage of its own
    with torch.no_grad():
        for (_, p), (_, q) in zip(empty.model.named_parameters(), whole.model.named_parameters()):
            p.copy_(q)
    assert empty.loaded() is empty
    ids = torch.tensor([[1, 2, 3]])
    torch.testing.assert_close(empty.model(ids).logits, whole.model(ids).logits)
