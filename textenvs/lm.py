"""Language-model backend: load any Hugging Face causal LM, step it incrementally over a KV cache.

The environments never call the model any other way than through :class:`LanguageModel`:

* :meth:`LanguageModel.prefill` runs a token sequence once and keeps its KV cache;
* :meth:`LanguageModel.extend` appends tokens to a sequence with one incremental forward over its
  cached keys and values (the whole cost of an environment step), and
  :meth:`LanguageModel.extend_batch` does it for N sequences in ONE batched forward;
* :meth:`LanguageModel.crop` drops cached positions from ``p`` on, so an edit at ``p`` recomputes
  only positions ``>= p`` (valid for causal LMs: earlier positions never attend to later ones).

The model is loaded by hub name, local ``save_pretrained`` folder, or the built-in name
``textenvs/tiny`` (a small GPT-2 shipped inside the package, see :mod:`textenvs.models.train_tiny`).
``trust_remote_code`` is never set and weights load from safetensors only.

The forwards run under ``torch.inference_mode()`` (about 25% faster per step than ``no_grad`` on
the tiny model): the tensors they return are inference tensors, so clone one before writing into
it, and compute log-probabilities for a gradient step with a separate forward.
"""

from __future__ import annotations

import inspect
import math
import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, DynamicCache

TINY = "textenvs/tiny"
BUILTIN_MODELS = {TINY: Path(__file__).parent / "models" / "tiny"}


def resolve_model_path(name: str | os.PathLike) -> str:
    """The folder or hub name to load for ``name``; a missing local path fails here, not at the hub."""
    name = os.fspath(name)
    if name in BUILTIN_MODELS:
        path = BUILTIN_MODELS[name]
        if not (path / "model.safetensors").exists():
            raise FileNotFoundError(
                f"The built-in model {name!r} is missing from {path}: reinstall textenvs or rebuild it with "
                "`python -m textenvs.models.train_tiny`."
            )
        return str(path)
    if os.path.isdir(name):
        return name
    # Hub names are "name" or "org/name"; anything else path-like must exist locally.
    if name.startswith((".", "/", "~")) or name.count("/") > 1 or "\\" in name:
        raise FileNotFoundError(
            f"Model {name!r} looks like a local path but no such folder exists: pass a folder written by "
            f"`save_pretrained`, a Hugging Face hub name such as 'gpt2', or the built-in {TINY!r}."
        )
    return name


# Architectures whose attention, under PyTorch's SDPA, masks a one-token step by the padding mask
# alone: no sliding window, chunked attention or ALiBi derived from the 2D mask.
PREPARED_MASK_MODEL_TYPES = ("gpt2", "llama", "qwen2")


def takes_prepared_step_mask(config) -> bool:
    """Whether a one-token batched step may hand the model its padding mask as a ready 4D mask.

    transformers rebuilds a 4D attention mask from a 2D padding mask on every forward (about a
    tenth of a batched step of the tiny model); a ready ``(B, 1, 1, S)`` boolean mask is used as
    it is. That is exact only where a single new token's mask is the padding mask itself: SDPA
    attention, full (not sliding or chunked) attention in every layer, and an architecture in
    :data:`PREPARED_MASK_MODEL_TYPES`. Any other model gets the 2D mask.
    """
    layer_types = getattr(config, "layer_types", None) or ["full_attention"]
    return (
        getattr(config, "_attn_implementation", None) == "sdpa"
        and config.model_type in PREPARED_MASK_MODEL_TYPES
        and all(kind == "full_attention" for kind in layer_types)
        and not getattr(config, "use_sliding_window", False)
        and getattr(config, "sliding_window", None) is None
    )


def plan_tail_groups(sizes: list[int], overhead: float) -> list[list[int]]:
    """Split rows with tails of ``sizes`` tokens into groups, one padded forward each.

    A group costs ``overhead`` (a forward's fixed cost, in tokens of compute) plus its rows times
    its longest tail (the padded tokens it computes). The rows are sorted by tail length and cut
    into the contiguous groups of least total cost (exact, by dynamic programming), so the plan
    is never costlier than one batch of all rows, nor than one forward per row. Deterministic:
    the same sizes always give the same groups.

    Returns:
        Lists of indices into ``sizes``, shortest tails first.
    """
    order = sorted(range(len(sizes)), key=lambda k: sizes[k])
    sorted_sizes = [sizes[k] for k in order]
    best = [0.0] + [math.inf] * len(order)  # best[i]: least cost of the first i rows
    cut = [0] * (len(order) + 1)
    for i in range(1, len(order) + 1):
        for j in range(i):  # the last group is rows j..i-1, its longest tail sorted_sizes[i - 1]
            cost = best[j] + overhead + (i - j) * sorted_sizes[i - 1]
            if cost < best[i]:
                best[i], cut[i] = cost, j
    groups, i = [], len(order)
    while i > 0:
        groups.append(order[cut[i] : i])
        i = cut[i]
    return groups[::-1]


@dataclass
class Sequence:
    """One token sequence held by the backend: its ids and its KV cache (batch size 1)."""

    ids: list[int]
    cache: DynamicCache

    def __len__(self) -> int:
        return len(self.ids)


class LanguageModel:
    """A causal LM with its tokenizer, stepped incrementally.

    Args:
        name: ``textenvs/tiny``, a local ``save_pretrained`` folder, or a Hugging Face hub name.
        device: Torch device (``"cpu"``, ``"cuda"``, ``"cuda:1"``, ...).
        dtype: Torch dtype of the weights (``None`` keeps the checkpoint's, usually float32).
        layer: Which hidden state the environments observe: an index into the model's
            ``hidden_states`` tuple (0 = embeddings, -1 = the final layer, after its final norm).
    """

    def __init__(
        self, name: str | os.PathLike = TINY, device: str | torch.device = "cpu",
        dtype: torch.dtype | None = None, layer: int = -1,
    ) -> None:
        self.name = os.fspath(name)
        self.device = torch.device(device)
        self.dtype = dtype
        path = resolve_model_path(self.name)
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=False)
            self.model = AutoModelForCausalLM.from_pretrained(
                path, trust_remote_code=False, use_safetensors=True, dtype=dtype
            )
        except (OSError, ValueError, KeyError) as e:
            raise ValueError(
                f"Could not load model {self.name!r} as a causal LM with safetensors weights ({e}). Use the built-in "
                f"{TINY!r}, a folder written by `save_pretrained` holding model.safetensors, or a hub name "
                "(needs network)."
            ) from e
        self.model.to(self.device).eval()
        self.model.requires_grad_(False)
        if self.tokenizer.pad_token_id is None:
            warnings.warn(
                f"The tokenizer of {self.name!r} has no pad token; using its EOS token {self.tokenizer.eos_token!r}.",
                stacklevel=2,
            )
            self.tokenizer.pad_token = self.tokenizer.eos_token
        if self.tokenizer.eos_token_id is None:
            raise ValueError(f"The tokenizer of {self.name!r} has no EOS token: episodes could never end by themselves.")
        # An env decodes its text every step. Without clean-up of tokenization spaces, a fast
        # tokenizer's decode is exactly its backend's, so decode() calls the backend directly and
        # skips transformers' per-call argument conversion (half the cost of a short decode).
        backend = getattr(self.tokenizer, "backend_tokenizer", None)
        self._backend_decode = backend.decode if backend is not None else None
        # A prompt's forward needs the logits of its last position only: models that take
        # transformers' logits_to_keep skip the LM head for the others.
        self._keeps_logits = "logits_to_keep" in inspect.signature(self.model.forward).parameters
        self.step_mask_4d = takes_prepared_step_mask(self.model.config)
        # What one more forward costs in tokens of compute, for extend_batch's grouping of tails:
        # on a CPU a small model's forward is about 30 tokens' worth of fixed cost; on a GPU a
        # forward is launch-bound, so padding is nearly free and the rows stay in one batch.
        self.forward_overhead_tokens = 32.0 if self.device.type == "cpu" else 4096.0
        config = self.model.config
        self.n_layers = config.num_hidden_layers
        if not -(self.n_layers + 1) <= layer <= self.n_layers:
            raise ValueError(f"layer={layer} is out of range for a model with {self.n_layers} layers: use -1..{self.n_layers}.")
        self.layer = layer
        self.hidden_size = config.hidden_size
        # The LM head may be padded beyond the tokenizer; every head row is a valid action.
        self.vocab_size = self.model.get_output_embeddings().weight.shape[0]
        self.eos_token_id = int(self.tokenizer.eos_token_id)
        self.max_positions = int(
            getattr(config, "n_positions", None) or getattr(config, "max_position_embeddings", None) or 2048
        )

    def __reduce__(self):
        # Pickle by reference: unpickling (an async vector env's worker, a checkpoint of an env)
        # loads or reuses the shared model of that name instead of copying weights. A model whose
        # weights were changed in memory must be saved with save_pretrained and passed by folder.
        return load, (self.name, str(self.device), self.dtype, self.layer)

    # -- text ------------------------------------------------------------------------------
    def encode(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def decode(self, ids: list[int]) -> str:
        """The text of ``ids``, special tokens left out: ``tokenizer.decode(ids, skip_special_tokens=True)``."""
        if self._backend_decode is not None and type(ids) is list and not self.tokenizer.clean_up_tokenization_spaces:
            return self._backend_decode(ids, skip_special_tokens=True)
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    # -- forwards --------------------------------------------------------------------------
    @torch.inference_mode()
    def prefill(self, ids: list[int]) -> tuple[Sequence, torch.Tensor, torch.Tensor]:
        """Run ``ids`` once and keep the cache.

        Returns:
            The sequence, the observed layer's hidden states of every position ``(T, d)`` and the
            next-token logits at the last position ``(V,)``.
        """
        if not ids:
            raise ValueError("Cannot run the model on an empty sequence: give at least one token.")
        self.check_length(len(ids))
        cache = DynamicCache()
        last = torch.tensor([[len(ids) - 1]], device=self.device)
        hidden, logits = self._forward(torch.tensor([ids], device=self.device), cache, logits_at=last)
        return Sequence(list(ids), cache), hidden[0], logits[0, -1]

    @torch.inference_mode()
    def prefill_batch(self, batch: list[list[int]]) -> list[tuple[Sequence, torch.Tensor, torch.Tensor]]:
        """:meth:`prefill` of several sequences with ONE right-padded forward.

        Every sequence starts at position 0 and its padding comes after its last token, so the
        causal mask already keeps the padding out of its view: each result equals :meth:`prefill`
        of that sequence alone, up to float rounding. Each sequence's cache is a view of the batch's.
        """
        if len(batch) == 1:
            return [self.prefill(batch[0])]
        for ids in batch:
            if not ids:
                raise ValueError("Cannot run the model on an empty sequence: give at least one token.")
            self.check_length(len(ids))
        lengths = [len(ids) for ids in batch]
        input_ids = torch.full((len(batch), max(lengths)), self.eos_token_id, dtype=torch.long)
        mask = torch.zeros_like(input_ids)
        for b, ids in enumerate(batch):
            input_ids[b, : len(ids)] = torch.tensor(ids)
            mask[b, : len(ids)] = 1
        cache = DynamicCache()
        last = torch.tensor(lengths, device=self.device)[:, None] - 1  # (B, 1) each sequence's last position
        hidden, logits = self._forward(input_ids.to(self.device), cache, mask.to(self.device), logits_at=last)
        logits = logits.gather(1, last[:, :, None].expand(-1, -1, logits.shape[-1])) if logits.shape[1] > 1 else logits
        out = []
        for b, n in enumerate(lengths):
            own = DynamicCache(
                ddp_cache_data=[(layer.keys[b : b + 1, :, :n], layer.values[b : b + 1, :, :n]) for layer in cache.layers]
            )
            out.append((Sequence(list(batch[b]), own), hidden[b, :n], logits[b, 0]))
        return out

    @torch.inference_mode()
    def extend(self, seq: Sequence, ids: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """Append ``ids`` to one sequence with one incremental forward over its cache.

        Returns:
            Hidden states ``(len(ids), d)`` and next-token logits ``(len(ids), V)`` of the new positions.
        """
        self.check_length(len(seq) + len(ids))
        hidden, logits = self._forward(torch.tensor([ids], device=self.device), seq.cache)
        seq.ids.extend(ids)
        return hidden[0], logits[0]

    @torch.inference_mode()
    def extend_batch(
        self, seqs: list[Sequence], tails: list[list[int]]
    ) -> list[tuple[torch.Tensor, torch.Tensor] | None]:
        """Append ``tails[i]`` to ``seqs[i]`` for every i, in as few batched incremental forwards as pay.

        Caches of different lengths are right-padded into one temporary batch cache; an attention
        mask hides the padding and explicit position ids keep every sequence's positions, so each
        result equals :meth:`extend` on that sequence alone. Each sequence keeps its own cache.
        Tails of very different lengths would make one batch mostly padding, so the rows are split
        into groups of similar tail length where that saves more padded tokens than the extra
        forwards cost (:func:`plan_tail_groups` with :attr:`forward_overhead_tokens`).

        Returns:
            Per sequence, hidden states ``(n_i, d)`` and logits ``(n_i, V)`` of its new positions,
            or ``None`` where its tail is empty (nothing is run for it).
        """
        results: list[tuple[torch.Tensor, torch.Tensor] | None] = [None] * len(seqs)
        active = [i for i, tail in enumerate(tails) if tail]
        for group in plan_tail_groups([len(tails[i]) for i in active], self.forward_overhead_tokens):
            rows = [active[k] for k in group]
            if len(rows) == 1:
                results[rows[0]] = self.extend(seqs[rows[0]], tails[rows[0]])
                continue
            for i, out in zip(rows, self._extend_padded([seqs[i] for i in rows], [tails[i] for i in rows])):
                results[i] = out
        return results

    def _extend_padded(self, seqs: list[Sequence], tails: list[list[int]]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """ONE right-padded, masked forward appending ``tails[i]`` (non-empty) to ``seqs[i]``."""
        lengths = [len(seq) for seq in seqs]
        sizes = [len(tail) for tail in tails]
        for n, m in zip(lengths, sizes):
            self.check_length(n + m)
        past, new = max(lengths), max(sizes)
        layers = []
        for layer in range(len(seqs[0].cache.layers)):
            ks, vs = [], []
            for seq, n in zip(seqs, lengths):
                cached = seq.cache.layers[layer]  # keys / values: (1, H, n, hd)
                ks.append(torch.nn.functional.pad(cached.keys, (0, 0, 0, past - n)))
                vs.append(torch.nn.functional.pad(cached.values, (0, 0, 0, past - n)))
            layers.append((torch.cat(ks), torch.cat(vs)))  # (B, H, past, hd)
        cache = DynamicCache(ddp_cache_data=layers)
        mask = torch.zeros(len(seqs), past + new, dtype=torch.long)  # (B, past + new)
        input_ids = torch.full((len(seqs), new), self.eos_token_id, dtype=torch.long)
        for b, (tail, n, m) in enumerate(zip(tails, lengths, sizes)):
            mask[b, :n] = 1
            mask[b, past : past + m] = 1
            input_ids[b, :m] = torch.tensor(tail)
        position_ids = torch.tensor(lengths)[:, None] + torch.arange(new)[None]  # (B, new)
        hidden, logits = self._forward(
            input_ids.to(self.device), cache, mask.to(self.device), position_ids.to(self.device)
        )
        out = []
        for b, (seq, tail, n, m) in enumerate(zip(seqs, tails, lengths, sizes)):
            own = seq.cache.layers
            for layer, batch_layer in enumerate(cache.layers):
                k, v = batch_layer.keys[b : b + 1], batch_layer.values[b : b + 1]  # (1, H, past + new, hd)
                own[layer].keys = torch.cat([k[:, :, :n], k[:, :, past : past + m]], dim=2)
                own[layer].values = torch.cat([v[:, :, :n], v[:, :, past : past + m]], dim=2)
            seq.ids.extend(tail)
            out.append((hidden[b, :m], logits[b, :m]))
        return out

    def crop(self, seq: Sequence, length: int) -> None:
        """Keep the first ``length`` positions of ``seq`` (ids and cache)."""
        for layer in seq.cache.layers:  # keys / values: (1, H, T, hd)
            layer.keys = layer.keys[:, :, :length]
            layer.values = layer.values[:, :, :length]
        del seq.ids[length:]

    def _forward(self, input_ids, cache, attention_mask=None, position_ids=None, logits_at=None):
        """The model's forward: observed-layer hidden states and logits, both float32.

        ``logits_at`` ``(B, k)``: the only positions whose logits are wanted (a prompt's last), so
        the LM head skips the rest where the model supports transformers' ``logits_to_keep``; the
        logits are then ``(B, k, V)``, otherwise ``(B, T, V)`` for the caller to index.
        """
        kwargs = {"logits_to_keep": logits_at} if logits_at is not None and self._keeps_logits else {}
        out = self.model(
            input_ids=input_ids, past_key_values=cache, attention_mask=attention_mask, position_ids=position_ids,
            use_cache=True, output_hidden_states=True, **kwargs,
        )
        return out.hidden_states[self.layer].float(), out.logits.float()

    def check_length(self, n: int) -> None:
        if n > self.max_positions:
            raise ValueError(
                f"A sequence of {n} tokens exceeds the context of model {self.name!r} ({self.max_positions} "
                "positions): shorten the source text, lower max_new_tokens / max_len, or use a model with a "
                "longer context."
            )

    @torch.inference_mode()
    def greedy(self, prompt_ids: list[int], max_new_tokens: int) -> str:
        """Greedy continuation of ``prompt_ids`` until EOS or ``max_new_tokens``; the decoded new text."""
        seq, _, logits = self.prefill(prompt_ids)
        new: list[int] = []
        for _ in range(max_new_tokens):
            token = int(logits.argmax())
            if token == self.eos_token_id:
                break
            new.append(token)
            _, logits = self.extend(seq, [token])
            logits = logits[-1]
        return self.decode(new).strip()


_SHARED: dict[tuple, LanguageModel] = {}


def load(
    model: str | os.PathLike | LanguageModel = TINY, device: str | torch.device = "cpu",
    dtype: torch.dtype | None = None, layer: int = -1,
) -> LanguageModel:
    """A :class:`LanguageModel`, shared between environments that ask for the same one.

    Environments only read the model (eval mode, no gradients), so N environments of one process
    hold one copy. An instance passed in is returned as it is.
    """
    if isinstance(model, LanguageModel):
        if layer != model.layer:
            raise ValueError(
                f"The LanguageModel passed in observes layer {model.layer}, not layer={layer}: build it with "
                f"LanguageModel(..., layer={layer}) or pass layer={model.layer}."
            )
        return model
    key = (os.fspath(model), str(torch.device(device)), dtype, layer)
    if key not in _SHARED:
        _SHARED[key] = LanguageModel(model, device, dtype, layer)
    return _SHARED[key]


class LockstepBatch:
    """N sequences in ONE right-padded batch cache, each advanced by one token per call.

    The generation vector env keeps its sub-envs here so that a step is a single batched forward
    with no per-step copying of caches: row ``i`` of every layer's keys / values holds sequence
    ``i``, an attention mask ``(N, S)`` marks its valid slots and ``lengths`` (on the host, so a
    step never waits for the device to read them back) its token count, which is also the
    position of its next token. Rows of different lengths, and rows restarted at any time, share
    the batch. Slots freed by a restarted row are reclaimed by :meth:`compact` once more than
    ``slack`` columns are wasted, which keeps memory flat over any number of steps.
    """

    def __init__(self, lm: LanguageModel, n: int, slack: int = 16) -> None:
        self.lm, self.n, self.slack = lm, n, slack
        self.cache: DynamicCache | None = None
        self.mask = torch.zeros(n, 0, dtype=torch.long, device=lm.device)  # (N, S)
        self.lengths = [0] * n  # tokens held by each row: its valid slots, and its next position
        self._ones = torch.ones(n, 1, dtype=torch.long, device=lm.device)

    @property
    def slots(self) -> int:
        return self.mask.shape[1]

    @property
    def positions(self) -> torch.Tensor:
        """The position of each row's next token ``(N,)``, on the model's device."""
        return torch.tensor(self.lengths, device=self.lm.device)

    @torch.inference_mode()
    def load(self, i: int, seq: Sequence) -> None:
        """Put sequence ``seq`` (cached by :meth:`LanguageModel.prefill`) into row ``i``; its own cache is released."""
        layers = seq.cache.layers
        length = len(seq)
        if self.cache is None:
            self.cache = DynamicCache(ddp_cache_data=[
                (torch.zeros((self.n, *layer.keys.shape[1:]), dtype=layer.keys.dtype, device=layer.keys.device),
                 torch.zeros((self.n, *layer.values.shape[1:]), dtype=layer.values.dtype, device=layer.values.device))
                for layer in layers
            ])
            self.mask = torch.zeros(self.n, length, dtype=torch.long, device=self.lm.device)
        if length > self.slots:
            self._grow(length - self.slots)
        for own, new in zip(self.cache.layers, layers):
            own.keys[i] = 0
            own.values[i] = 0
            own.keys[i, :, :length] = new.keys[0]
            own.values[i, :, :length] = new.values[0]
        self.mask[i] = 0
        self.mask[i, :length] = 1
        self.lengths[i] = length
        seq.cache = None  # the batch holds it now

    @torch.inference_mode()
    def advance(self, tokens: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """Append ``tokens[i]`` to row ``i`` for all rows: ONE forward. Returns hidden ``(N, d)``, logits ``(N, V)``."""
        if self.cache is None:
            raise RuntimeError("LockstepBatch.advance() before any load(): load every row first.")
        self.lm.check_length(max(self.lengths) + 1)
        self.mask = torch.cat([self.mask, self._ones], dim=1)  # (N, S + 1)
        new = torch.tensor([tokens, self.lengths], device=self.lm.device)  # (2, N): new tokens, their positions
        # One new token per row attends to exactly the row's valid slots (see takes_prepared_step_mask).
        mask = self.mask.bool()[:, None, None, :] if self.lm.step_mask_4d else self.mask
        hidden, logits = self.lm._forward(new[0][:, None], self.cache, mask, new[1][:, None])
        self.lengths = [n + 1 for n in self.lengths]
        if self.slots - max(self.lengths) > self.slack:
            self.compact()
        return hidden[:, 0], logits[:, 0]

    @torch.inference_mode()
    def compact(self) -> None:
        """Move every row's valid slots to the front and drop the columns no row uses."""
        keep = max(self.lengths)
        # Stable order of slots per row: valid ones first, in their original order.
        order = torch.sort(1 - self.mask, dim=1, stable=True).indices[:, :keep]  # (N, keep)
        for layer in self.cache.layers:
            index = order[:, None, :, None].expand(-1, layer.keys.shape[1], -1, layer.keys.shape[3])
            layer.keys = torch.gather(layer.keys, 2, index)
            layer.values = torch.gather(layer.values, 2, index)
        self.mask = torch.gather(self.mask, 1, order)

    def _grow(self, extra: int) -> None:
        for layer in self.cache.layers:
            layer.keys = torch.nn.functional.pad(layer.keys, (0, 0, 0, extra))
            layer.values = torch.nn.functional.pad(layer.values, (0, 0, 0, extra))
        self.mask = torch.nn.functional.pad(self.mask, (0, extra))
