"""Token-level PPO: the math against hand-computed cases, and the trainer on small runs."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from agents.token_ppo import (
    AdaptiveKLController,
    TokenPPO,
    TokenPPOConfig,
    batch_sequences,
    clipped_policy_loss,
    clipped_value_loss,
    collect_rollout,
    explained_variance,
    gae,
    held_for_backward,
    kl_k1,
    masked_mean,
    masked_var,
    masked_whiten,
)

T = torch.tensor


def test_gae_by_hand():
    rewards, values = T([[1.0, 0.0, 2.0], [1.0, 0.0, 2.0]]), T([[0.5, 0.2, 0.1], [0.5, 0.2, 0.1]])
    mask = T([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])
    adv, ret = gae(rewards, values, mask, gamma=0.9, lam=0.8)
    # Row 0: deltas 1.9, -0.11, 0.68 from the end;
    # A2 = 1.9, A1 = -0.11 + 0.72 * 1.9, A0 = 0.68 + 0.72 * A1.
    a1 = -0.11 + 0.72 * 1.9
    torch.testing.assert_close(adv[0], T([0.68 + 0.72 * a1, a1, 1.9]))
    # Row 1 ends after token 1 (terminal): A1 = 0 - 0.2, A0 = 0.68 + 0.72 * A1, padding stays 0.
    torch.testing.assert_close(adv[1], T([0.68 + 0.72 * -0.2, -0.2, 0.0]))
    torch.testing.assert_close(ret, (adv + values) * mask)


def test_masked_statistics_by_hand():
    x, mask = T([1.0, 2.0, 3.0, 100.0]), T([1.0, 1.0, 1.0, 0.0])
    assert masked_mean(x, mask) == pytest.approx(2.0)
    assert masked_var(x, mask) == pytest.approx(1.0)  # unbiased: ((1) + 0 + (1)) / 2
    torch.testing.assert_close(masked_whiten(x, mask)[:3], T([-1.0, 0.0, 1.0]), atol=1e-4, rtol=0)
    torch.testing.assert_close(
        masked_whiten(x, mask, shift_mean=False)[:3], T([1.0, 2.0, 3.0]), atol=1e-4, rtol=0
    )


def test_kl_estimators_by_hand():
    logp, ref = T([math.log(0.5)]), T([math.log(0.25)])
    assert kl_k1(logp, ref).item() == pytest.approx(math.log(2))
    assert kl_k1(ref, logp).item() == pytest.approx(
        -math.log(2)
    )  # k1 is signed: unbiased, not a distance


def test_clipped_losses_by_hand():
    logp, old, mask = T([math.log(1.5), math.log(1.5)]), T([0.0, 0.0]), T([1.0, 1.0])
    loss, clipfrac = clipped_policy_loss(logp, old, T([1.0, -1.0]), mask, clip=0.2)
    # adv +1: max(-1.5, -1.2) = -1.2 (clipped); adv -1: max(1.5, 1.2) = 1.5 (not clipped).
    assert loss.item() == pytest.approx((-1.2 + 1.5) / 2) and clipfrac.item() == pytest.approx(0.5)
    v = clipped_value_loss(T([1.0]), T([0.0]), T([0.5]), T([1.0]), clip=0.2)
    assert v.item() == pytest.approx(0.5 * max((1.0 - 0.5) ** 2, (0.2 - 0.5) ** 2))
    assert explained_variance(
        T([1.0, 2.0, 3.0]), T([1.0, 2.0, 3.0]), T([1.0, 1.0, 1.0])
    ) == pytest.approx(1.0)


def test_adaptive_kl_controller_by_hand():
    kl = AdaptiveKLController(0.1, target=2.0, horizon=100)
    kl.update(4.0, n_episodes=10)  # error clipped to +0.2
    assert kl.value == pytest.approx(0.1 * (1 + 0.2 * 10 / 100))
    kl.update(1.8, n_episodes=10)  # error -0.1
    assert kl.value == pytest.approx(0.1 * 1.02 * (1 - 0.1 * 0.1))


def test_batch_sequences_by_hand():
    ids, attention, positions = batch_sequences(
        [[5, 6, 7], [8]], T([[1, 2, 0], [3, 4, 9]]), T([[1.0, 1.0, 0.0], [1.0, 1.0, 1.0]]), pad=0
    )
    assert ids.tolist() == [[5, 6, 7, 1, 2], [8, 3, 4, 9, 0]]
    assert attention.tolist() == [[1, 1, 1, 1, 1], [1, 1, 1, 1, 0]]
    assert positions[1].tolist() == [0, 1, 2] and positions[0, :2].tolist() == [2, 3]


def small_config(model, **kw) -> TokenPPOConfig:
    base = dict(
        model=model,
        num_envs=4,
        max_new_tokens=4,
        total_episodes=12,
        minibatch_size=2,
        num_epochs=2,
        eval_samples=3,
        seed=3,
    )
    return TokenPPOConfig(**{**base, **kw})


def test_rollouts_restart_no_episode_they_drop_in_any_autoreset_mode():
    """A sub-env whose episode ended sits the rest of the rollout out (step_unfinished): no
    prompt is prefilled whose steps would be dropped, neither under NextStep (the rollout env's
    mode) nor SameStep; the tokens, log-probs, rewards and metrics agree bit for bit."""
    import gymnasium as gym

    trainer = TokenPPO(TokenPPOConfig(num_envs=4, max_new_tokens=8, total_episodes=8, seed=1))
    assert trainer.envs.unwrapped.autoreset_mode == gym.vector.AutoresetMode.NEXT_STEP
    same = gym.make_vec(
        trainer.config.env_id,
        num_envs=4,
        autoreset_mode=gym.vector.AutoresetMode.SAME_STEP,
        model=trainer.lm,
        token_mode="vocab",
        max_steps=8,
        text_infos=True,
    )
    rollouts, resets = [], []
    for envs in (trainer.envs, same):
        calls = []
        for sub in envs.unwrapped.envs:
            sub.begin_reset = lambda *a, f=sub.begin_reset, c=calls, **k: c.append(1) or f(*a, **k)
        rollouts.append(collect_rollout(envs, trainer.value_head, trainer.config, 0))
        resets.append(len(calls))
    ours, theirs = rollouts
    for name in ("tokens", "mask", "logprobs", "env_rewards"):
        assert torch.equal(getattr(ours, name), getattr(theirs, name)), name
    assert ours.metrics == theirs.metrics and ours.texts == theirs.texts
    assert resets == [4, 4]  # one reset per sub-env: the rollout's own
    assert 0 < ours.mask.sum() < ours.mask.numel()  # episodes ended at different steps


def test_rollout_costs_one_env_forward_per_token(monkeypatch, random_gpt2_dir):
    trainer = TokenPPO(small_config(random_gpt2_dir, total_episodes=4))
    calls = []
    forward = trainer.model.forward

    def spy(*args, **kwargs):
        calls.append(tuple(kwargs["input_ids"].shape))
        return forward(*args, **kwargs)

    monkeypatch.setattr(trainer.model, "forward", spy)
    rollout = collect_rollout(trainer.envs, trainer.value_head, trainer.config, 0)
    steps = [c for c in calls if c == (4, 1)]
    assert len(steps) == int(rollout.mask.sum(1).max())  # one batched forward per generation step
    prefills = [
        c for c in calls if c != (4, 1)
    ]  # the rest run the prompts of (re)starting episodes
    assert all(c[1] > 1 for c in prefills) and sum(c[0] for c in prefills) <= 2 * 4
    # The rollout's log-probs equal a full-sequence recompute of the same tokens.
    from agents.token_ppo import sequence_outputs

    ids, attention, positions = batch_sequences(
        rollout.prompts, rollout.tokens, rollout.mask, trainer.lm.eos_token_id
    )
    with torch.no_grad():
        logp, _, hidden = sequence_outputs(
            forward.__self__, ids, attention, positions, rollout.tokens, 1.0, True
        )
        values = trainer.value_head(hidden).squeeze(-1)
    torch.testing.assert_close(
        logp * rollout.mask, rollout.logprobs * rollout.mask, atol=1e-4, rtol=0
    )
    torch.testing.assert_close(
        values * rollout.mask, rollout.values * rollout.mask, atol=1e-4, rtol=0
    )


def test_sequence_outputs_runs_the_lm_head_at_the_scored_positions_only(random_gpt2_dir):
    from agents.token_ppo import sequence_outputs
    from textenvs.lm import LanguageModel

    model = LanguageModel(random_gpt2_dir).model
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, model.config.vocab_size, (2, 30), generator=gen)
    positions = torch.stack([torch.arange(20, 25), torch.arange(22, 27)])  # 7 distinct
    tokens = ids.gather(1, positions + 1)
    rows = []
    hook = model.lm_head.register_forward_hook(lambda m, args, out: rows.append(args[0].shape[1]))
    with torch.no_grad():
        logp, entropy, hidden = sequence_outputs(
            model, ids, torch.ones_like(ids), positions, tokens, 0.7, True
        )
        hook.remove()
        full = model(input_ids=ids, use_cache=False, output_hidden_states=True)
    assert rows == [7]  # not the 30 positions of each row
    expected = torch.log_softmax(
        full.logits.gather(1, positions[..., None].expand(-1, -1, full.logits.shape[-1])) / 0.7,
        -1,
    )
    torch.testing.assert_close(logp, expected.gather(2, tokens[..., None])[..., 0])
    torch.testing.assert_close(entropy, -(expected.exp() * expected).sum(-1))
    h = full.hidden_states[-1]
    torch.testing.assert_close(
        hidden, h.gather(1, positions[..., None].expand(-1, -1, h.shape[-1]))
    )


def test_resume_gives_the_uninterrupted_result(tmp_path, random_gpt2_dir):
    full = TokenPPO(small_config(random_gpt2_dir, adaptive_kl=True))
    full.train(progress=False)
    first = TokenPPO(
        small_config(
            random_gpt2_dir, adaptive_kl=True, checkpoint_dir=str(tmp_path / "ckpt"), save_every=1
        )
    )
    first.train(progress=False, stop_after=1)
    resumed = TokenPPO(small_config(random_gpt2_dir, adaptive_kl=True))
    resumed.load_checkpoint(tmp_path / "ckpt")
    assert resumed.iteration == 1
    resumed.train(progress=False)
    for a, b in zip(full.model.parameters(), resumed.model.parameters()):
        assert torch.equal(a, b)  # bit for bit: a full reset starts the env's batch afresh
    assert [h["metric"] for h in full.history] == [h["metric"] for h in resumed.history]
    assert full.kl.value == pytest.approx(resumed.kl.value)


def _activation_bytes(trainer: TokenPPO, batch: int = 4, length: int = 48) -> int:
    """Bytes the policy's forward over ``batch`` sequences keeps for its backward, which then
    runs."""
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, trainer.lm.vocab_size, (batch, length), generator=gen)
    positions = torch.arange(length - 9, length - 1).expand(batch, -1)
    (logp, _, values), kept = held_for_backward(
        lambda: trainer.policy(ids, torch.ones_like(ids), positions, ids[:, -8:], 1.0)
    )
    (logp.sum() + values.sum()).backward()
    return kept


def test_gradient_checkpointing_gives_the_same_training_and_keeps_fewer_activations(
    random_gpt2_dir,
):
    runs = {}
    for checkpointed in (False, True):
        trainer = TokenPPO(
            small_config(random_gpt2_dir, adaptive_kl=True, gradient_checkpointing=checkpointed)
        )
        start = [p.detach().clone() for p in trainer.trainable]
        trainer.train(progress=False)
        runs[checkpointed] = trainer, start
    (plain, start), (checkpointed, _) = runs[False], runs[True]
    # the blocks' second forward in the backward is the first one again: the same gradients
    for a, b in zip(plain.trainable, checkpointed.trainable):
        torch.testing.assert_close(a, b, atol=1e-7, rtol=0)
    assert any(not torch.equal(a, before) for a, before in zip(plain.trainable, start))
    assert [h["policy_loss"] for h in plain.history] == pytest.approx(
        [h["policy_loss"] for h in checkpointed.history], rel=1e-6
    )
    # what the update's forward holds for its backward: each block's input instead of its
    # every intermediate (a GPT-2 block saves some 18 tensors of the hidden size: the norms', the
    # attention's and the MLP's, four times as wide)
    hidden = 4 * 48 * plain.lm.hidden_size * 4  # one (batch, length, d) float32 tensor
    saved = _activation_bytes(plain) - _activation_bytes(checkpointed)
    assert saved > 8 * plain.lm.n_layers * hidden
    # rollouts and evaluations build no graph: they run the blocks as they are
    assert plain.evaluate(max_samples=3) == checkpointed.evaluate(max_samples=3)
    with pytest.raises(ValueError, match="gradient_checkpointing"):
        TokenPPOConfig(gradient_checkpointing="yes").validate()


def test_training_logs_and_checkpoint_layout(tmp_path):
    trainer = TokenPPO(
        small_config(
            "textenvs/tiny",
            env_id="textenvs/Translate-v0",
            reward="chrf",
            checkpoint_dir=str(tmp_path / "ckpt"),
            tensorboard_log=str(tmp_path / "tb"),
        )
    )
    history = trainer.train(progress=False)
    assert len(history) == 3
    for h in history:
        assert all(
            np.isfinite(h[k])
            for k in ("policy_loss", "value_loss", "entropy", "kl", "metric", "clipfrac")
        )
    names = {p.name for p in (tmp_path / "ckpt").iterdir()}
    assert {
        "model.safetensors",
        "config.json",
        "value_head.safetensors",
        "trainer_state.json",
    } <= names
    assert any((tmp_path / "tb").rglob("events.out.tfevents*"))
    assert 0.0 <= trainer.evaluate(max_samples=2) <= 1.0


def test_nan_loss_stops_with_the_step_and_keeps_the_checkpoint(tmp_path, random_gpt2_dir):
    trainer = TokenPPO(
        small_config(random_gpt2_dir, checkpoint_dir=str(tmp_path / "ckpt"), save_every=1)
    )
    trainer.train(progress=False, stop_after=1)
    before = (tmp_path / "ckpt" / "model.safetensors").read_bytes()
    with torch.no_grad():
        trainer.value_head.weight.fill_(float("nan"))
    with pytest.raises(FloatingPointError, match="iteration 1, epoch 0, minibatch 0"):
        trainer.train(progress=False)
    assert (tmp_path / "ckpt" / "model.safetensors").read_bytes() == before


def test_checkpoint_of_another_model_is_refused(tmp_path, random_gpt2_dir):
    tiny = TokenPPO(small_config("textenvs/tiny", total_episodes=4))
    tiny.save_checkpoint(tmp_path / "tiny_ckpt")
    other = TokenPPO(small_config(random_gpt2_dir, total_episodes=4))
    with pytest.raises(ValueError, match="another model"):
        other.load_checkpoint(tmp_path / "tiny_ckpt")


@pytest.mark.parametrize("env_id", ["textenvs/EditSummary-v0"])
def test_env_that_is_not_token_level_is_refused(env_id):
    with pytest.raises(ValueError, match="action space is the vocabulary|generation env"):
        TokenPPO(TokenPPOConfig(env_id=env_id, num_envs=2, total_episodes=2))


def test_bad_config():
    with pytest.raises(ValueError, match="learning_rate"):
        TokenPPO(TokenPPOConfig(learning_rate=0.0))


def test_the_default_learning_rate_follows_the_models_size(monkeypatch):
    from agents.token_ppo import config as config_module

    config = TokenPPOConfig()
    assert config.learning_rate is None
    assert config.learning_rate_for(990_000) == 3e-4  # the built-in model's tuned rate
    assert config.learning_rate_for(10_000_000) == 3e-4
    assert config.learning_rate_for(124_439_808) == 1e-5  # GPT-2's 124M
    assert TokenPPOConfig(learning_rate=2e-3).learning_rate_for(124_439_808) == 2e-3
    trainer = TokenPPO(small_config("textenvs/tiny", total_episodes=4))
    assert trainer.model_parameters == sum(p.numel() for p in trainer.lm.model.parameters())
    assert trainer.learning_rate == 3e-4 == trainer.optimizer.param_groups[0]["lr"]
    # a model past the first bound trains at the next row's rate, annealed from it
    monkeypatch.setattr(config_module, "AUTO_LEARNING_RATES", ((1000, 3e-4), (None, 1e-5)))
    trainer = TokenPPO(small_config("textenvs/tiny", total_episodes=8))
    assert trainer.learning_rate == 1e-5 == trainer.optimizer.param_groups[0]["lr"]
    history = trainer.train(progress=False)
    assert [h["lr"] for h in history] == pytest.approx([1e-5, 0.5e-5])


def test_max_approx_kl_stops_the_update_once_the_policy_moved_that_far():
    base = dict(total_episodes=4, learning_rate=5e-2, anneal_lr=False)
    free = TokenPPO(small_config("textenvs/tiny", **base))
    (record,) = free.train(progress=False)
    assert record["minibatch_steps"] == 2 * 2  # every epoch's 2 minibatches
    guarded = TokenPPO(small_config("textenvs/tiny", max_approx_kl=1e-3, **base))
    start = {k: v.detach().clone() for k, v in guarded.model.named_parameters()}
    (record,) = guarded.train(progress=False)
    # the first step is taken (the policy is the rollout's: approx_kl 0), then one past the bound
    assert 1 <= record["minibatch_steps"] < 4
    assert any(not torch.equal(v, start[k]) for k, v in guarded.model.named_parameters())
    with pytest.raises(ValueError, match="max_approx_kl"):
        TokenPPOConfig(max_approx_kl=0.0).validate()
    from agents.token_ppo.cli import parser

    assert parser().parse_args(["--max-approx-kl", "0.02"]).max_approx_kl == 0.02
    assert parser().parse_args([]).max_approx_kl is None


def test_cli_reads_a_learning_rate_and_reports_the_one_used(tmp_path, capsys):
    from agents.token_ppo import main
    from agents.token_ppo.cli import parser

    assert parser().parse_args([]).learning_rate is None
    assert parser().parse_args(["--learning-rate", "2e-5"]).learning_rate == 2e-5
    report = tmp_path / "report.json"
    args = ["--num-envs", "2", "--max-new-tokens", "2", "--total-episodes", "2"]
    main([*args, "--eval-samples", "1", "--no-save", "--json-out", str(report)])
    saved = json.loads(report.read_text())
    assert saved["learning_rate"] == 3e-4 and saved["config"]["learning_rate"] is None
    assert saved["model_parameters"] > 900_000


def test_cli_help_documents_every_option(capsys):
    import dataclasses

    from agents.token_ppo import field_docs, main

    docs = field_docs(TokenPPOConfig)
    assert set(docs) == {f.name for f in dataclasses.fields(TokenPPOConfig)}
    assert all(docs.values())
    assert docs["gae_lambda"].startswith("GAE lambda. The main job's suite uses 0.5")
    assert docs["eval_reward"].startswith("Metric of the greedy evaluation (None: the training")
    with pytest.raises(SystemExit) as stop:
        main(["--help"])
    assert stop.value.code == 0
    out = " ".join(capsys.readouterr().out.split())
    assert "--gae-lambda GAE_LAMBDA GAE lambda." in out and "(default: 0.95)" in out
    assert "--anneal-lr ANNEAL_LR Linear learning-rate decay over the run. (default: True)" in out


@pytest.mark.parametrize("text", ["ture", "", "2", "on?"])
def test_cli_refuses_a_boolean_it_cannot_read(text, capsys):
    from agents.common import parse_bool
    from agents.token_ppo import main

    assert [parse_bool(t) for t in ("True", "yes", "1", " false ", "NO", "0")] == [1, 1, 1, 0, 0, 0]
    with pytest.raises(SystemExit) as stop:
        main(["--anneal-lr", text])  # read as False before: a typo silently turned annealing off
    assert stop.value.code == 2
    assert f"--anneal-lr: expected true or false (or yes / no, 1 / 0), got {text!r}" in (
        capsys.readouterr().err
    )


def _damage(folder, case):
    import json

    state = json.loads((folder / "trainer_state.json").read_text())
    if case in ("iteration", "kl_coef", "history"):
        state[case] = {"iteration": -5, "kl_coef": float("nan"), "history": "x"}[case]
        (folder / "trainer_state.json").write_text(json.dumps(state))
    elif case == "truncated_value_head":
        data = (folder / "value_head.safetensors").read_bytes()
        (folder / "value_head.safetensors").write_bytes(data[: len(data) // 2])
    elif case == "foreign_reference":
        torch.save({"weight": torch.zeros(3)}, folder / "reference.pt")
    elif case == "missing_optimizer":
        (folder / "optimizer.pt").unlink()
    elif case == "garbage_weights":
        (folder / "model.safetensors").write_bytes(b"not safetensors")


@pytest.mark.parametrize(
    "case,match",
    [
        ("iteration", "field 'iteration' is -5"),
        ("kl_coef", "field 'kl_coef' is nan"),
        ("history", "field 'history'"),
        ("truncated_value_head", "value_head.safetensors"),
        ("foreign_reference", "reference.pt: does not fit"),
        ("missing_optimizer", "optimizer.pt"),
        ("garbage_weights", "model.safetensors"),
    ],
)
def test_a_damaged_checkpoint_leaves_the_trainer_untouched(tmp_path, random_gpt2_dir, case, match):
    trained = TokenPPO(small_config(random_gpt2_dir, checkpoint_dir=str(tmp_path / "ckpt")))
    trained.train(progress=False)
    _damage(tmp_path / "ckpt", case)
    fresh = TokenPPO(small_config(random_gpt2_dir))
    before = {k: v.clone() for k, v in fresh.model.state_dict().items()}
    head = {k: v.clone() for k, v in fresh.value_head.state_dict().items()}
    optim = str(fresh.optimizer.state_dict())
    with pytest.raises(ValueError, match=match):
        fresh.load_checkpoint(tmp_path / "ckpt")
    assert all(torch.equal(before[k], v) for k, v in fresh.model.state_dict().items())
    assert all(torch.equal(head[k], v) for k, v in fresh.value_head.state_dict().items())
    assert str(fresh.optimizer.state_dict()) == optim and fresh.iteration == 0


def test_kl_k3_by_hand():
    from agents.token_ppo import kl_k3

    logp, ref = torch.tensor([-1.0, -2.0, -0.5]), torch.tensor([-1.0, -1.0, -1.5])
    # r = ref - logp = 0, 1, -1
    expected = torch.tensor([0.0, math.e - 2.0, math.exp(-1.0)])  # exp(r) - r - 1
    torch.testing.assert_close(kl_k3(logp, ref), expected)
    assert (kl_k3(torch.randn(100), torch.randn(100)) >= 0).all()


def test_group_advantages_by_hand():
    from agents.token_ppo import group_advantages

    returns = torch.tensor([1.0, 2.0, 3.0, 6.0, 0.0, 0.0, 0.0, 4.0])  # two groups of 4
    # RLOO: R minus the mean of the other three
    torch.testing.assert_close(
        group_advantages(returns, 4, "rloo"),
        torch.tensor(
            [1 - 11 / 3, 2 - 10 / 3, 3 - 3.0, 6 - 2.0, 0 - 4 / 3, 0 - 4 / 3, 0 - 4 / 3, 4.0]
        ),
    )
    # GRPO: group 1 mean 3, unbiased std sqrt(14/3); group 2 mean 1, std 2
    s1 = math.sqrt(14 / 3)
    torch.testing.assert_close(
        group_advantages(returns, 4, "grpo"),
        torch.tensor(
            [
                -2 / (s1 + 1e-4),
                -1 / (s1 + 1e-4),
                0.0,
                3 / (s1 + 1e-4),
                -1 / 2.0001,
                -1 / 2.0001,
                -1 / 2.0001,
                3 / 2.0001,
            ]
        ),
    )
    with pytest.raises(ValueError, match="groups of 3"):
        group_advantages(returns, 3, "grpo")


def test_group_token_advantages_by_hand():
    """Returns-to-go against the group's at each position (group_credit="to_go")."""
    from agents.token_ppo import group_advantages, group_token_advantages

    # one group of 2 completions of 3 token slots; the second ends after 2 tokens
    rewards = torch.tensor([[0.1, 0.2, 0.3], [0.5, -0.1, 9.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])
    togo = torch.tensor([[0.6, 0.5, 0.3], [0.4, -0.1, 0.0]])  # 9.0 is past its end: not counted
    rloo = group_token_advantages(rewards, mask, 2, "rloo")
    torch.testing.assert_close(rloo, (togo - togo.flip(0)) * mask)  # minus the other one's
    spread = torch.tensor([0.6, 0.4]).std()
    grpo = group_token_advantages(rewards, mask, 2, "grpo")
    torch.testing.assert_close(grpo, (togo - togo.mean(0)) / (spread + 1e-4) * mask)
    # at t = 0 (and everywhere, for a terminal reward) it is the completion-level estimator
    for kind in ("rloo", "grpo"):
        per_episode = group_advantages((rewards * mask).sum(1), 2, kind)
        torch.testing.assert_close(
            group_token_advantages(rewards, mask, 2, kind)[:, 0], per_episode
        )
        terminal = torch.zeros(4, 3)
        terminal[:, -1] = torch.tensor([1.0, 0.0, 0.5, 0.25])
        full = torch.ones(4, 3)
        torch.testing.assert_close(
            group_token_advantages(terminal, full, 2, kind),
            group_advantages(terminal.sum(1), 2, kind)[:, None] * full,
        )


def test_group_credit_to_go_trains_and_is_refused_where_it_has_no_meaning(tmp_path):
    with pytest.raises(ValueError, match="group_credit='to_go'.*'grpo' or 'rloo'"):
        TokenPPOConfig(group_credit="to_go").validate()
    with pytest.raises(ValueError, match="ratio_level='token'"):
        TokenPPOConfig(estimator="rloo", group_credit="to_go", ratio_level="sequence").validate()
    config = TokenPPOConfig(
        estimator="rloo", group_credit="to_go", num_envs=4, group_size=2, max_new_tokens=4,
        total_episodes=8, minibatch_size=4, num_epochs=1, seed=0,
    )  # fmt: skip
    history = TokenPPO(config).train(progress=False)
    assert len(history) == 2 and all(math.isfinite(h["policy_loss"]) for h in history)


def test_group_rollouts_give_each_group_one_prompt():
    from agents.token_ppo import reset_groups

    trainer = TokenPPO(small_config("textenvs/tiny", num_envs=6, estimator="grpo", group_size=3))
    obs, prompts = reset_groups(trainer.envs, 3, seed=11)
    assert obs.shape[0] == 6
    assert prompts[0] == prompts[1] == prompts[2] and prompts[3] == prompts[4] == prompts[5]
    again = reset_groups(trainer.envs, 3, seed=11)[1]
    assert again == prompts  # seeded: the same samples
    subs = trainer.envs.unwrapped.envs
    assert [s.text for s in subs] == [""] * 6  # every sub-env starts a fresh episode


@pytest.mark.parametrize(
    "estimator,placement,kl",
    [("grpo", "loss", "k3"), ("rloo", "reward", "k1"), ("gae", "loss", "k3")],
)
def test_every_estimator_trains(estimator, placement, kl):
    config = small_config(
        "textenvs/tiny",
        estimator=estimator,
        group_size=2,
        kl_placement=placement,
        kl_estimator=kl,
        kl_coef=0.1,
    )
    trainer = TokenPPO(config)
    before = [p.detach().clone() for p in trainer.model.parameters()]
    history = trainer.train(progress=False)
    assert len(history) == trainer.iterations == 3
    for stats in history:
        assert all(math.isfinite(stats[k]) for k in ("policy_loss", "kl", "entropy", "metric"))
    assert any(not torch.equal(a, b) for a, b in zip(before, trainer.model.parameters()))
    head = trainer.value_head.weight
    if estimator == "gae":
        assert head.abs().sum() > 0  # the value head learns
    else:
        assert head.abs().sum() == 0 and history[-1]["value_loss"] == 0.0  # no critic


@pytest.mark.parametrize("placement", ["auto", "reward"])
def test_grpo_by_default_gives_a_group_of_equal_scores_no_advantage_whatever_its_kl(placement):
    """KL in the reward: GRPO's division by the group's std turns KL differences of 0.01-0.03
    between completions of equal score into advantages of about +-1 (the defect of issue 46);
    by default GRPO puts the KL in the loss (TRL's), so such a group teaches nothing."""
    from agents.token_ppo.config import TokenPPOConfig
    from agents.token_ppo.estimators import KLInLoss, make_estimator, make_kl

    config = TokenPPOConfig(estimator="grpo", group_size=4, num_envs=4, kl_placement=placement)
    rewards = torch.zeros(4, 3)
    rewards[:, -1] = 0.3  # one group: every completion scores the same metric
    kl = torch.tensor([0.01, 0.02, 0.03, 0.015])[:, None].expand(4, 3)
    mask = torch.ones(4, 3)
    shaped = make_kl(config).shape_rewards(rewards, kl, 0.05)
    advantages = make_estimator(config).advantages(shaped, None, mask, None).per_episode
    if placement == "auto":
        assert isinstance(make_kl(config), KLInLoss) and config.kl_settings() == ("loss", "k3")
        assert torch.equal(advantages, torch.zeros(4))
    else:
        assert advantages.abs().mean() > 0.6  # KL noise made into a full-size advantage
    for estimator, settled in (("gae", ("reward", "k1")), ("rloo", ("reward", "k1"))):
        assert TokenPPOConfig(estimator=estimator).kl_settings() == settled


def test_a_grpo_checkpoint_resumes_under_auto_kl_settings_equal_to_its_explicit_ones():
    from agents.token_ppo.checkpoint import estimator_differences
    from agents.token_ppo.config import TokenPPOConfig

    explicit = {"estimator": "grpo", "kl_placement": "loss", "kl_estimator": "k3"}
    assert estimator_differences(explicit, TokenPPOConfig(estimator="grpo")) == []
    before = {"estimator": "grpo", "kl_placement": "reward", "kl_estimator": "k1"}
    assert estimator_differences(before, TokenPPOConfig(estimator="grpo")) == [
        ("kl_placement", "reward", "loss"),
        ("kl_estimator", "k1", "k3"),
    ]


def test_group_estimators_refuse_groups_that_do_not_divide_the_rollout():
    with pytest.raises(ValueError, match="group_size >= 2 dividing num_envs"):
        TokenPPO(small_config("textenvs/tiny", estimator="rloo", group_size=3))
    with pytest.raises(ValueError, match="choose one of \\['gae', 'grpo', 'rloo'\\]"):
        TokenPPO(small_config("textenvs/tiny", estimator="ppo"))
    with pytest.raises(ValueError, match="kl_placement"):
        TokenPPO(small_config("textenvs/tiny", kl_placement="both"))


def test_a_checkpoint_of_another_estimator_is_refused(tmp_path):
    grpo = TokenPPO(small_config("textenvs/tiny", estimator="grpo", group_size=2, total_episodes=4))
    grpo.save_checkpoint(tmp_path / "grpo")
    rloo = TokenPPO(small_config("textenvs/tiny", estimator="rloo", group_size=2, total_episodes=4))
    with pytest.raises(ValueError, match="estimator='grpo'"):
        rloo.load_checkpoint(tmp_path / "grpo")
    again = TokenPPO(
        small_config("textenvs/tiny", estimator="grpo", group_size=2, total_episodes=4)
    )
    again.load_checkpoint(tmp_path / "grpo")  # the same algorithm resumes


def test_sequence_policy_loss_by_hand():
    from agents.token_ppo import sequence_policy_loss

    logp = torch.tensor([[-1.0, -2.0], [-1.0, 0.0]])
    old = torch.tensor([[-1.5, -2.0], [-1.0, -5.0]])
    mask = torch.tensor([[1.0, 1.0], [1.0, 0.0]])  # episode 2 has one token: its pad is ignored
    advantages = torch.tensor([1.0, -2.0])
    # episode 1: ratio e^0.5 = 1.65, clipped to 1.2: max(-1.65, -1.2) = -1.2 (clip active);
    # episode 2: ratio e^0 = 1: 2.0. Mean over the two episodes: 0.4.
    loss, clipfrac = sequence_policy_loss(logp, old, advantages, mask, 0.2)
    assert loss.item() == pytest.approx(0.4)
    assert clipfrac.item() == pytest.approx(0.5)


def test_sequence_ratio_trains_rloo_and_is_refused_with_gae():
    trainer = TokenPPO(
        small_config("textenvs/tiny", estimator="rloo", group_size=2, ratio_level="sequence")
    )
    history = trainer.train(progress=False)
    assert all(math.isfinite(h["policy_loss"]) for h in history)
    with pytest.raises(ValueError, match="ratio_level='sequence' needs one advantage"):
        TokenPPO(small_config("textenvs/tiny", ratio_level="sequence"))


def test_top_p_mask_by_hand():
    from agents.token_ppo import top_p_mask

    logits = torch.log(torch.tensor([[0.2, 0.5, 0.3], [0.05, 0.05, 0.9]]))
    # row 1: 0.5 (0 before it), 0.3 (0.5 before) reach 0.6; 0.2 has 0.8 before it: out
    # row 2: 0.9 alone reaches 0.6
    expected = torch.tensor([[False, True, True], [False, False, True]])
    assert torch.equal(top_p_mask(logits, 0.6), expected)
    assert top_p_mask(logits, 1e-9).sum(-1).tolist() == [1, 1]  # the most likely is always in
    assert top_p_mask(logits, 1.0).all()


def test_nlpo_samples_inside_the_masking_policys_nucleus_and_resumes(tmp_path):
    config = small_config(
        "textenvs/tiny", nlpo_top_p=0.5, nlpo_mu=2, total_episodes=12, max_new_tokens=10
    )
    trainer = TokenPPO(config)
    rollout = trainer.collect()
    B, T = rollout.tokens.shape
    assert rollout.action_masks.shape == (B, T, trainer.lm.vocab_size)
    picked = torch.gather(rollout.action_masks, 2, rollout.tokens[..., None])[..., 0]
    assert picked[rollout.mask.bool()].all()  # every sampled token was allowed
    assert (rollout.action_masks.sum(-1)[rollout.mask.bool()] < trainer.lm.vocab_size).all()
    # positions after an episode's end hold no mask (the update leaves them unmasked: a stale
    # nucleus there made the log-prob of the padding -inf and approx_kl NaN)
    assert not rollout.action_masks[~rollout.mask.bool()].any()
    assert (rollout.mask.sum(1) < T).any()  # some episodes did end early
    history = trainer.train(progress=False, stop_after=2)
    assert all(math.isfinite(v) for h in history for k, v in h.items() if k != "explained_variance")
    trainer.save_checkpoint(tmp_path / "nlpo")
    trainer.train(progress=False)  # refreshes the masking policy at iteration 2
    resumed = TokenPPO(config)
    resumed.load_checkpoint(tmp_path / "nlpo")
    resumed.train(progress=False)
    for a, b in zip(resumed.model.parameters(), trainer.model.parameters()):
        torch.testing.assert_close(a, b)  # a resumed NLPO run equals the uninterrupted one
    with pytest.raises(ValueError, match="nlpo_top_p must be in"):
        TokenPPO(small_config("textenvs/tiny", nlpo_top_p=1.5))


def test_nlpo_leaves_the_processs_shared_model_alone():
    """The masking policy is a model of its own: training with NLPO (refreshes included) changes
    no weight of the shared model other envs of the process run (a LanguageModel copies as its
    name, so a shallow copy once replaced the shared model's weights)."""
    from textenvs.lm import shared_model

    shared = shared_model("textenvs/tiny")
    before = {k: v.clone() for k, v in shared.model.state_dict().items()}
    config = small_config("textenvs/tiny", nlpo_top_p=0.9, nlpo_mu=1, total_episodes=12)
    trainer = TokenPPO(config)
    assert trainer.masker.lm is not shared and trainer.masker.lm.model is not shared.model
    trainer.train(progress=False)  # refreshes the masking policy at iterations 1 and 2
    after = shared.model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def conversation_config(**kw) -> TokenPPOConfig:
    return small_config(
        "textenvs/tiny-chat",
        env_id="textenvs/Dialogue-v0",
        env_kwargs={"max_turns": 3, "max_turn_tokens": 3},
        max_new_tokens=9,
        **kw,
    )


def test_conversation_rollouts_score_the_agents_tokens_where_they_stand():
    """A conversation's row is its opening, the agent's tokens AND the other party's turns
    between them; the update scores the agent's tokens only, at their own positions: its
    log-probs equal the env's at rollout time. Laid out as prompt + agent tokens (no mask of the
    other party's tokens), they do not."""
    from agents.token_ppo import sequence_outputs

    trainer = TokenPPO(conversation_config())
    rollout = collect_rollout(trainer.envs, trainer.value_head, trainer.config, 0)
    assert rollout.sequences is not None
    mask = rollout.mask
    for b, env in enumerate(trainer.envs.unwrapped.envs):
        ids = torch.tensor(rollout.prompts[b] + rollout.sequences[b])
        n = int(mask[b].sum())
        # the token after each predicting position is the agent's action
        assert torch.equal(ids[rollout.positions[b, :n] + 1], rollout.tokens[b, :n])
        assert int(env.agent_mask().sum()) == n and len(ids) > len(rollout.prompts[b]) + n
    pad = trainer.lm.eos_token_id
    layouts = {
        "conversation": batch_sequences(
            rollout.prompts, rollout.tokens, mask, pad, rollout.sequences, rollout.positions
        ),
        "agent tokens only": batch_sequences(rollout.prompts, rollout.tokens, mask, pad),
    }
    errors = {}
    with torch.no_grad():
        for name, (ids, attention, positions) in layouts.items():
            logp = sequence_outputs(
                trainer.model, ids, attention, positions, rollout.tokens, 1.0, False
            )[0]
            errors[name] = float(((logp - rollout.logprobs) * mask).abs().max())
    assert errors["conversation"] < 1e-4 < errors["agent tokens only"]


@pytest.mark.parametrize("estimator", ["gae", "grpo"])
def test_token_ppo_trains_on_conversations(estimator):
    trainer = TokenPPO(conversation_config(estimator=estimator, group_size=2))
    before = [p.detach().clone() for p in trainer.model.parameters()]
    history = trainer.train(progress=False)
    assert len(history) == 3
    for stats in history:
        assert all(math.isfinite(stats[k]) for k in ("policy_loss", "kl", "entropy", "metric"))
        assert stats["approx_kl"] < 1.0  # first-epoch ratios start at 1: the layout is right
    assert any(not torch.equal(a, b) for a, b in zip(before, trainer.model.parameters()))


def test_nlpo_masker_follows_the_other_partys_turns():
    """NLPO on conversations: the masking policy's rows hold exactly the env's ids (agent tokens
    and the other party's turns), so its nucleus is computed where the env stands."""
    trainer = TokenPPO(conversation_config(nlpo_top_p=0.5))
    rollout = trainer.collect()
    picked = torch.gather(rollout.action_masks, 2, rollout.tokens[..., None])[..., 0]
    assert picked[rollout.mask.bool()].all()
    for row, env in zip(trainer.masker.batch.rows, trainer.envs.unwrapped.envs):
        assert row.ids == env.sequence.ids


@pytest.mark.parametrize("dense,want", [(None, False), (True, True), (False, False)])
def test_dense_defaults_to_the_rewards_own_default(dense, want):
    """A model-based reward is terminal by default (a classifier forward per token otherwise);
    the trainer no longer overrides it with dense=True unless asked."""
    import textenvs
    from agents.token_ppo.config import TokenPPOConfig
    from agents.token_ppo.rollout import make_rollout_envs
    from tests.conftest import BENCHMARK_KWARGS
    from textenvs.lm import shared_model

    env_id = "textenvs/IMDBSentiment-v0"
    config = TokenPPOConfig(
        env_id=env_id,
        num_envs=2,
        max_new_tokens=2,
        env_kwargs=dict(BENCHMARK_KWARGS[env_id]),
        dense=dense,
    )
    envs = make_rollout_envs(config, shared_model(textenvs.TINY))
    try:
        assert all(e.unwrapped.shaper.dense is want for e in envs.unwrapped.envs)
    finally:
        envs.close()
    text = make_rollout_envs(
        TokenPPOConfig(num_envs=2, max_new_tokens=2), shared_model(textenvs.TINY)
    )
    assert text.unwrapped.envs[0].unwrapped.shaper.dense is True  # ROUGE-L: dense by default
    text.close()
