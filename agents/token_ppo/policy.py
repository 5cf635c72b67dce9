"""The policy: the causal LM, its value head, LoRA, the frozen reference, block checkpointing, and
the full-sequence passes the update and the reference run. :func:`build_policy` is the ONE
builder, used by the learner (:class:`~agents.token_ppo.trainer.TokenPPO`) and by each Ray
rollout worker (:mod:`agents.token_ppo.ray`).
"""

from __future__ import annotations

import copy
import functools
import inspect
import types
from dataclasses import dataclass

import torch
import torch.utils.checkpoint

from agents.token_ppo.config import TokenPPOConfig
from agents.token_ppo.runtime import require
from textenvs.lm import LanguageModel


@dataclass
class PolicyParts:
    """What :func:`build_policy` makes: the LM (whose model the env runs), LoRA's peft wrapper
    (None without LoRA), the frozen reference (None with LoRA: the adapter switched off, or when
    not asked for) and the value head."""

    lm: LanguageModel
    model: torch.nn.Module
    peft: object | None
    reference: torch.nn.Module | None
    value_head: torch.nn.Linear


def build_policy(
    config: TokenPPOConfig, device, with_reference: bool = True, empty: bool = False
) -> PolicyParts:
    """The policy of ``config`` on ``device``, seeded with ``config.seed``: the LM loaded (the
    weights trained), a LoRA adapter injected where ``lora_r > 0`` (only it trains), else a
    frozen copy of the starting LM as the reference (``with_reference``); the model in eval mode
    (no dropout: the rollout and the update score tokens alike); a value head on the final hidden
    state, initialised at zero. ``empty``: the LM and its reference built on the meta device, no
    weight loaded (a sharded trainer loads each process's shards: :func:`load_sharded_policy`)."""
    torch.manual_seed(config.seed)
    lm = LanguageModel(config.model, device=device, dtype=config.dtype, empty=empty)
    model, peft, reference = lm.model, None, None
    if config.lora_r:
        peft = add_lora(model, config)  # the reference: the base weights, adapter off
    else:
        if with_reference:
            reference = copy.deepcopy(model).eval().requires_grad_(False)
        model.requires_grad_(True)
    model.eval()
    value_head = torch.nn.Linear(lm.hidden_size, 1).to(lm.device)
    torch.nn.init.zeros_(value_head.weight)
    torch.nn.init.zeros_(value_head.bias)
    return PolicyParts(lm, model, peft, reference, value_head)


def load_sharded_policy(parts: PolicyParts, for_rollouts) -> None:
    """Load the weights of an ``empty`` policy and its reference once they are sharded: each
    process reads its own rows of the model's safetensors (:func:`agents.fsdp.load_local_shards`),
    then the LM gets the checks a loaded model gets, its forwards inside ``for_rollouts()`` (as
    a rollout runs them: gathered once, or in lockstep; run on the sharded units outside it,
    the check's forward made the first sharded update differ from the one-process update:
    tests/test_distributed.py). Collective."""
    from agents.fsdp import load_local_shards

    for model in (parts.model, parts.reference):
        if model is not None:
            load_local_shards(model, parts.lm.path, parts.lm.device)
    with for_rollouts():
        parts.lm.loaded()


def add_lora(model: torch.nn.Module, config: TokenPPOConfig):
    """Inject ``config``'s LoRA adapter into ``model`` in place; returns the ``peft.PeftModel``
    (whose ``disable_adapter()`` gives the base model back).
    """
    peft = require("peft", "lora", "LoRA (lora_r > 0)")
    targets = (
        [m.strip() for m in config.lora_target_modules.split(",") if m.strip()]
        if config.lora_target_modules
        else None
    )
    lora = peft.LoraConfig(
        r=config.lora_r,
        lora_alpha=config.lora_alpha,
        lora_dropout=0.0,
        target_modules=targets,
        fan_in_fan_out=model.config.model_type == "gpt2",  # GPT-2's Conv1D layout
        task_type="CAUSAL_LM",
    )
    try:
        return peft.get_peft_model(model, lora)
    except ValueError as e:
        raise ValueError(
            f"LoRA cannot adapt {config.model!r} with lora_target_modules="
            f"{config.lora_target_modules!r} ({e}). Name modules this model has, e.g. c_attn for "
            "GPT-2 or q_proj,v_proj for Llama-style models."
        ) from e


class PolicyWithValue(torch.nn.Module):
    """The policy LM and its value head as one module: what a data-parallel engine wraps, so that
    one forward gives every quantity the loss differentiates.
    """

    def __init__(self, model: torch.nn.Module, value_head: torch.nn.Module) -> None:
        super().__init__()
        self.model, self.value_head = model, value_head

    def forward(self, ids, attention, positions, tokens, temperature: float, action_mask=None):
        """Log-probs, entropies and values of ``tokens``, each ``(B, T)``."""
        logp, entropy, hidden = sequence_outputs(
            self.model, ids, attention, positions, tokens, temperature, True, action_mask
        )
        return logp, entropy, self.value_head(hidden).squeeze(-1).float()


def batch_sequences(
    prompts: list[list[int]],
    tokens: torch.Tensor,
    mask: torch.Tensor,
    pad: int,
    sequences: list[list[int]] | None = None,
    predicting: torch.Tensor | None = None,
):
    """Right-padded ``prompt + generated`` ids, attention mask and the index of each token's logits.

    Returns ids ``(B, L)``, attention ``(B, L)`` and ``positions`` ``(B, T)``: the sequence index
    whose output predicts generated token ``t`` (``len(prompt) + t - 1``). Conversations give
    ``sequences`` (each row's ids after its prompt: the agent's tokens with the other party's
    turns between them) and ``predicting`` ``(B, T)``, those indices, instead.
    """
    if sequences is not None:
        return _batch_conversations(prompts, sequences, predicting, pad)
    B, T = tokens.shape
    lengths = [len(p) + int(m.sum()) for p, m in zip(prompts, mask)]
    L = max(lengths)
    ids = torch.full((B, L), pad, dtype=torch.long)
    attention = torch.zeros(B, L, dtype=torch.long)
    positions = torch.zeros(B, T, dtype=torch.long)
    for b, p in enumerate(prompts):
        n = int(mask[b].sum())
        ids[b, : len(p)] = torch.tensor(p)
        ids[b, len(p) : len(p) + n] = tokens[b, :n]
        attention[b, : len(p) + n] = 1
        positions[b] = len(p) - 1 + torch.arange(T).clamp(max=max(n - 1, 0))
    return ids, attention, positions


def _batch_conversations(
    prompts: list[list[int]], sequences: list[list[int]], predicting: torch.Tensor, pad: int
):
    """:func:`batch_sequences` of conversations: ``prompt + sequence`` per row, right-padded."""
    rows = [list(p) + list(q) for p, q in zip(prompts, sequences)]
    L = max(len(row) for row in rows)
    ids = torch.full((len(rows), L), pad, dtype=torch.long)
    attention = torch.zeros(len(rows), L, dtype=torch.long)
    for b, row in enumerate(rows):
        ids[b, : len(row)] = torch.tensor(row)
        attention[b, : len(row)] = 1
    return ids, attention, predicting.clone()


def sequence_outputs(
    model,
    ids,
    attention,
    positions,
    tokens,
    temperature: float,
    with_hidden: bool,
    action_mask: torch.Tensor | None = None,
):
    """Log-probs of ``tokens`` ``(B, T)``, entropy ``(B, T)``, final hidden states ``(B, T, d)``.

    ``action_mask`` ``(B, T, V)`` (NLPO): the distribution at each position is renormalised over
    the tokens the rollout could sample there.
    """
    # The LM head runs at the scored positions only (transformers' logits_to_keep, where the
    # model takes it): a long prompt's other positions would cost a (B, L, V) tensor of logits.
    keep = None
    if "logits_to_keep" in inspect.signature(model.forward).parameters:
        keep = torch.unique(positions)  # sorted: the positions any row scores
    # no KV cache: nothing reads it, and a checkpointed block's second forward would extend it
    out = model(
        input_ids=ids,
        attention_mask=attention,
        output_hidden_states=with_hidden,
        use_cache=False,
        **({} if keep is None else {"logits_to_keep": keep}),
    )
    at = positions if keep is None else torch.searchsorted(keep, positions.contiguous())
    logits = torch.gather(out.logits, 1, at[..., None].expand(-1, -1, out.logits.shape[-1]))
    logits = logits.float() / temperature
    index = positions[..., None]
    if action_mask is not None:
        # positions after an episode's end hold no mask (all False): left unmasked, not NaN
        action_mask = action_mask | ~action_mask.any(-1, keepdim=True)
        logits = logits.masked_fill(~action_mask, float("-inf"))
    logp_all = torch.log_softmax(logits, dim=-1)
    logp = torch.gather(logp_all, 2, tokens[..., None]).squeeze(-1)
    if action_mask is None:
        entropy = -(logp_all.exp() * logp_all).sum(-1)
    else:  # masked tokens: p = 0 and log p = -inf; zeroed before the product (no NaN gradient)
        entropy = -(logp_all.exp() * logp_all.masked_fill(~action_mask, 0.0)).sum(-1)
    hidden = None
    if with_hidden:
        h = out.hidden_states[-1]
        hidden = torch.gather(h, 1, index.expand(-1, -1, h.shape[-1])).float()
    return logp, entropy, hidden


def checkpoint_blocks(model: torch.nn.Module) -> int:
    """Activation checkpointing of every transformer block of ``model`` (the classes it names in
    ``_no_split_modules``): a forward that builds a graph saves only each block's inputs, and the
    backward runs the block's forward again to get the rest (``torch.utils.checkpoint``,
    non-reentrant). Forwards without gradients run as they are. Only the block's ``forward`` is
    checkpointed, its module hooks (FSDP2's gather and free) stay outside, as in transformers'
    own ``gradient_checkpointing_enable``, which, unlike this, acts in training mode only (the
    trainer keeps the model in eval mode: no dropout). Returns how many blocks.
    """
    from agents.fsdp import transformer_blocks

    blocks = transformer_blocks(model)
    for block in blocks:
        block.forward = types.MethodType(_checkpointed_forward, block)  # deepcopy-safe binding
    return len(blocks)


def held_for_backward(forward):
    """``forward()``'s result and the bytes of the tensors its autograd graph keeps for the
    backward (activation memory, counted as autograd saves each tensor; a tensor saved twice
    counts twice)."""
    kept = []

    def pack(x: torch.Tensor) -> torch.Tensor:
        kept.append(x.numel() * x.element_size())
        return x

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda x: x):
        result = forward()
    return result, sum(kept)


def _checkpointed_forward(block: torch.nn.Module, *args, **kwargs):
    forward = type(block).forward
    if not torch.is_grad_enabled():
        return forward(block, *args, **kwargs)
    return torch.utils.checkpoint.checkpoint(
        functools.partial(forward, block, **kwargs), *args, use_reentrant=False
    )
