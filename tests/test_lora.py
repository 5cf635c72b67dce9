"""Token PPO with a peft LoRA adapter: what trains, the reference, exact resume, merged export."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("peft", reason="pip install -e '.[lora]'")

from agents.token_ppo import TokenPPO, TokenPPOConfig, batch_sequences, collect_rollout  # noqa: E402
from tests.test_token_ppo import small_config  # noqa: E402
from textenvs.lm import LanguageModel  # noqa: E402


def lora_config(model, **kw) -> TokenPPOConfig:
    """test_token_ppo's small run, with a rank-4 adapter."""
    base = dict(lora_r=4, lora_alpha=8.0, adaptive_kl=True, eval_samples=2)
    # LoRA moves far at this rate: the checks below see it
    return small_config(model, **{**base, "learning_rate": 1e-2, **kw})


def _state(trainer) -> dict[str, torch.Tensor]:
    named = {k: v.detach().clone() for k, v in trainer.model.named_parameters()}
    named.update(
        {f"value_head.{k}": v.detach().clone() for k, v in trainer.value_head.named_parameters()}
    )
    return named


def test_only_the_adapter_and_value_head_train_and_the_reference_is_the_base(random_gpt2_dir):
    trainer = TokenPPO(lora_config(random_gpt2_dir))
    assert trainer.reference is None  # no second copy of the weights
    trainable = {n for n, p in trainer.model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    before = _state(trainer)
    trainer.train(progress=False)
    after = _state(trainer)
    changed = {n for n in before if not torch.equal(before[n], after[n])}
    assert changed == trainable | {"value_head.weight", "value_head.bias"}
    # The reference is the untouched base model: switching the adapter off gives the base logits.
    base = LanguageModel(random_gpt2_dir)
    ids = torch.tensor([base.encode("the market rose today")])
    with torch.no_grad(), trainer.peft.disable_adapter():
        off = trainer.model(input_ids=ids).logits
    with torch.no_grad():
        adapted = trainer.model(input_ids=ids).logits
    torch.testing.assert_close(off, base.model(input_ids=ids).logits)
    assert not torch.allclose(adapted, off, atol=1e-4)  # the adapter did learn something
    assert all(h["kl"] == h["kl"] for h in trainer.history)  # finite KL to the base


def test_the_env_runs_the_adapted_model(random_gpt2_dir):
    trainer = TokenPPO(lora_config(random_gpt2_dir))
    trainer.train(progress=False, stop_after=1)
    rollout = collect_rollout(trainer.envs, trainer.value_head, trainer.config, 1)
    ids, attention, positions = batch_sequences(
        rollout.prompts, rollout.tokens, rollout.mask, trainer.lm.eos_token_id
    )
    with torch.no_grad():
        logp, _, values = trainer.policy(ids, attention, positions, rollout.tokens, 1.0)
    m = rollout.mask
    torch.testing.assert_close(logp * m, rollout.logprobs * m, atol=1e-4, rtol=0)
    torch.testing.assert_close(values * m, rollout.values * m, atol=1e-4, rtol=0)


def test_lora_resume_is_bit_for_bit(tmp_path, random_gpt2_dir):
    full = TokenPPO(lora_config(random_gpt2_dir))
    full.train(progress=False)
    first = TokenPPO(lora_config(random_gpt2_dir, checkpoint_dir=str(tmp_path / "c"), save_every=1))
    first.train(progress=False, stop_after=1)
    names = {p.name for p in (tmp_path / "c").iterdir()}
    assert {"adapter_model.safetensors", "adapter_config.json", "value_head.safetensors"} <= names
    assert not {"model.safetensors", "reference.pt"} & names  # the adapter only
    resumed = TokenPPO(lora_config(random_gpt2_dir))
    resumed.load_checkpoint(tmp_path / "c")
    assert resumed.iteration == 1
    resumed.train(progress=False)
    a, b = _state(full), _state(resumed)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    from agents.token_ppo import TIMING_STATS as strip

    assert [{k: v for k, v in h.items() if k not in strip} for h in full.history] == [
        {k: v for k, v in h.items() if k not in strip} for h in resumed.history
    ]


def test_merged_export_loads_as_a_plain_model_with_the_adapted_outputs(tmp_path, random_gpt2_dir):
    trainer = TokenPPO(lora_config(random_gpt2_dir))
    trainer.train(progress=False, stop_after=1)
    folder = trainer.export(tmp_path / "merged")
    assert (folder / "model.safetensors").is_file() and not (
        folder / "adapter_config.json"
    ).exists()
    merged = LanguageModel(str(folder))
    assert not any("lora" in n for n, _ in merged.model.named_parameters())
    ids = torch.tensor([merged.encode("prices fell as the storm moved north")])
    with torch.no_grad():
        torch.testing.assert_close(
            merged.model(input_ids=ids).logits,
            trainer.model(input_ids=ids).logits,
            atol=1e-4,
            rtol=1e-4,
        )
    assert any("lora_" in n for n, _ in trainer.model.named_parameters())  # still trainable
    trainer.train(progress=False, stop_after=1)


def test_a_checkpoint_of_the_other_kind_is_refused(tmp_path, random_gpt2_dir):
    lora = TokenPPO(lora_config(random_gpt2_dir, checkpoint_dir=str(tmp_path / "c")))
    lora.train(progress=False, stop_after=1)
    lora.save_checkpoint(tmp_path / "c")
    full = TokenPPO(lora_config(random_gpt2_dir, lora_r=0))
    with pytest.raises(ValueError, match="lora_r=4, this trainer has lora_r=0"):
        full.load_checkpoint(tmp_path / "c")
    assert full.iteration == 0


@pytest.mark.parametrize(
    "kw, match",
    [
        (dict(lora_r=-1), "lora_r must be an int >= 0"),
        (dict(lora_alpha=0.0), "lora_alpha must be a finite number > 0"),
        (dict(lora_target_modules="no_such_module"), "Name modules this model has"),
        (dict(mixed_precision="fp8"), "mixed_precision must be"),
    ],
)
def test_bad_lora_settings_are_refused(random_gpt2_dir, kw, match):
    with pytest.raises(ValueError, match=match):
        TokenPPO(lora_config(random_gpt2_dir, **kw))


def test_lora_on_bfloat16_base_weights_trains_a_float32_adapter(random_gpt2_dir):
    trainer = TokenPPO(lora_config(random_gpt2_dir, dtype="bfloat16", total_episodes=4))
    base = [p for n, p in trainer.model.named_parameters() if "lora_" not in n]
    adapter = [p for n, p in trainer.model.named_parameters() if "lora_" in n]
    assert {p.dtype for p in base} == {torch.bfloat16}
    assert {p.dtype for p in adapter} == {torch.float32}
    history = trainer.train(progress=False)
    assert all(torch.isfinite(torch.tensor(h["policy_loss"])) for h in history)
