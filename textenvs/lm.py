"""Language-model backend: load any Hugging Face causal LM, step it incrementally over a KV cache.

The environments never call the model any other way than through :class:`LanguageModel` (and
the batched forwards of :mod:`textenvs.batching`, built on :meth:`LanguageModel.forward`):

* :meth:`LanguageModel.prefill` runs a token sequence once and keeps its KV cache in a
  :class:`~textenvs.kvcache.TokenSequence`;
* :meth:`LanguageModel.extend` appends tokens to a sequence with one incremental forward over its
  cached keys and values (the whole cost of an environment step);
* :meth:`LanguageModel.crop` drops cached positions from ``p`` on, so an edit at ``p`` recomputes
  only positions ``>= p`` (valid for causal LMs: earlier positions never attend to later ones).

:func:`shared_model` keeps one :class:`LanguageModel` per (name, device, dtype, layer) in a process,
so N environments hold one copy of the weights.

The model is loaded by hub name, local ``save_pretrained`` folder, or the built-in name
``textenvs/tiny`` (a small GPT-2 shipped inside the package, see :mod:`textenvs.models.train_tiny`).
``trust_remote_code`` is never set and weights load from safetensors only.

The forwards run under ``torch.inference_mode()`` (about 25% faster per step than ``no_grad`` on
the tiny model): the tensors they return are inference tensors, so clone one before writing into
it, and compute log-probabilities for a gradient step with a separate forward.
"""

from __future__ import annotations

import inspect
import os
import warnings
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from textenvs import kvcache
from textenvs.kvcache import TokenSequence

TINY = "textenvs/tiny"
BUILTIN_MODELS = {TINY: Path(__file__).parent / "models" / "tiny"}


def resolve_model_path(name: str | os.PathLike) -> str:
    """The folder or hub name to load for ``name``; a missing local path fails here."""
    name = os.fspath(name)
    if name in BUILTIN_MODELS:
        path = BUILTIN_MODELS[name]
        if not (path / "model.safetensors").exists():
            raise FileNotFoundError(
                f"The built-in model {name!r} is missing from {path}: reinstall textenvs or "
                "rebuild it with `python -m textenvs.models.train_tiny`."
            )
        return str(path)
    if os.path.isdir(name):
        return name
    # Hub names are "name" or "org/name"; anything else path-like must exist locally.
    if name.startswith((".", "/", "~")) or name.count("/") > 1 or "\\" in name:
        raise FileNotFoundError(
            f"Model {name!r} looks like a local path but no such folder exists: pass a folder "
            "written by `save_pretrained`, a Hugging Face hub name such as 'gpt2', or the "
            f"built-in {TINY!r}."
        )
    return name


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
        self,
        name: str | os.PathLike = TINY,
        device: str | torch.device = "cpu",
        dtype: torch.dtype | None = None,
        layer: int = -1,
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
                f"Could not load model {self.name!r} as a causal LM with safetensors weights "
                f"({e}). Use the built-in {TINY!r}, a folder written by `save_pretrained` holding "
                "model.safetensors, or a hub name (needs network)."
            ) from e
        self.model.to(self.device).eval()
        self.model.requires_grad_(False)
        if self.tokenizer.pad_token_id is None:
            warnings.warn(
                f"The tokenizer of {self.name!r} has no pad token; using its EOS token "
                f"{self.tokenizer.eos_token!r}.",
                stacklevel=2,
            )
            self.tokenizer.pad_token = self.tokenizer.eos_token
        if self.tokenizer.eos_token_id is None:
            raise ValueError(
                f"The tokenizer of {self.name!r} has no EOS token: episodes could never end by "
                "themselves."
            )
        # An env decodes its text every step. Without clean-up of tokenization spaces, a fast
        # tokenizer's decode is exactly its backend's, so decode() calls the backend directly and
        # skips transformers' per-call argument conversion (half the cost of a short decode).
        backend = getattr(self.tokenizer, "backend_tokenizer", None)
        self._backend_decode = backend.decode if backend is not None else None
        # A prompt's forward needs the logits of its last position only: models that take
        # transformers' logits_to_keep skip the LM head for the others.
        self.keeps_logits = "logits_to_keep" in inspect.signature(self.model.forward).parameters
        # What one more forward costs in tokens of compute, for batching.extend_batch's grouping
        # of tails: on a CPU a small model's forward is about 30 tokens' worth of fixed cost; on a
        # GPU a forward is launch-bound, so padding is nearly free and the rows stay in one batch.
        self.forward_overhead_tokens = 32.0 if self.device.type == "cpu" else 4096.0
        config = self.model.config
        self.n_layers = config.num_hidden_layers
        if not -(self.n_layers + 1) <= layer <= self.n_layers:
            raise ValueError(
                f"layer={layer} is out of range for a model with {self.n_layers} layers: use "
                f"-1..{self.n_layers}."
            )
        self.layer = layer
        self.hidden_size = config.hidden_size
        # The LM head may be padded beyond the tokenizer; every head row is a valid action.
        self.vocab_size = self.model.get_output_embeddings().weight.shape[0]
        self.eos_token_id = int(self.tokenizer.eos_token_id)
        self.max_positions = int(
            getattr(config, "n_positions", None)
            or getattr(config, "max_position_embeddings", None)
            or 2048
        )

    def __reduce__(self):
        # Pickle by reference: unpickling (an async vector env's worker, a checkpoint of an env)
        # loads or reuses the shared model of that name instead of copying weights. A model whose
        # weights were changed in memory must be saved with save_pretrained and passed by folder.
        return shared_model, (self.name, str(self.device), self.dtype, self.layer)

    # -- text ------------------------------------------------------------------------------
    def encode(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def decode(self, ids: list[int]) -> str:
        """The text of ``ids``, special tokens left out: ``tokenizer.decode(ids,
        skip_special_tokens=True)``.
        """
        if (
            self._backend_decode is not None
            and type(ids) is list
            and not self.tokenizer.clean_up_tokenization_spaces
        ):
            return self._backend_decode(ids, skip_special_tokens=True)
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    # -- forwards --------------------------------------------------------------------------
    @torch.inference_mode()
    def prefill(self, ids: list[int]) -> tuple[TokenSequence, torch.Tensor, torch.Tensor]:
        """Run ``ids`` once and keep the cache.

        Returns:
            The sequence, the observed layer's hidden states of every position ``(T, d)`` and the
            next-token logits at the last position ``(V,)``.
        """
        if not ids:
            raise ValueError("Cannot run the model on an empty sequence: give at least one token.")
        self.check_length(len(ids))
        cache = kvcache.empty_cache()
        last = torch.tensor([[len(ids) - 1]], device=self.device)
        hidden, logits = self.forward(
            torch.tensor([ids], device=self.device), cache, logits_at=last
        )
        return TokenSequence(list(ids), cache), hidden[0], logits[0, -1]

    @torch.inference_mode()
    def extend(self, seq: TokenSequence, ids: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """Append ``ids`` to one sequence with one incremental forward over its cache.

        Returns:
            Hidden states ``(len(ids), d)`` and next-token logits ``(len(ids), V)`` of the new
            positions.
        """
        self.check_length(len(seq) + len(ids))
        hidden, logits = self.forward(torch.tensor([ids], device=self.device), seq.cache)
        seq.ids.extend(ids)
        return hidden[0], logits[0]

    def crop(self, seq: TokenSequence, length: int) -> None:
        """Keep the first ``length`` positions of ``seq`` (ids and cache)."""
        kvcache.crop(seq.cache, length)
        del seq.ids[length:]

    def forward(self, input_ids, cache, attention_mask=None, position_ids=None, logits_at=None):
        """The model's forward over a cache: observed-layer hidden states and logits, both float32.

        ``input_ids`` ``(B, T)`` are appended to ``cache`` (updated in place). ``logits_at``
        ``(B, k)``: the only positions whose logits are wanted (a prompt's last), so the LM head
        skips the rest where the model supports transformers' ``logits_to_keep``; the logits are
        then ``(B, k, V)``, otherwise ``(B, T, V)`` for the caller to index.
        """
        kwargs = (
            {"logits_to_keep": logits_at} if logits_at is not None and self.keeps_logits else {}
        )
        out = self.model(
            input_ids=input_ids,
            past_key_values=cache,
            attention_mask=attention_mask,
            position_ids=position_ids,
            use_cache=True,
            output_hidden_states=True,
            **kwargs,
        )
        return out.hidden_states[self.layer].float(), out.logits.float()

    def check_length(self, n: int) -> None:
        if n > self.max_positions:
            raise ValueError(
                f"A sequence of {n} tokens exceeds the context of model {self.name!r} "
                f"({self.max_positions} positions): shorten the source text, lower max_new_tokens "
                "/ max_len, or use a model with a longer context."
            )

    @torch.inference_mode()
    def greedy(self, prompt_ids: list[int], max_new_tokens: int) -> str:
        """Greedy continuation of ``prompt_ids`` until EOS or ``max_new_tokens``; the decoded new
        text.
        """
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


def shared_model(
    model: str | os.PathLike | LanguageModel = TINY,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | None = None,
    layer: int = -1,
) -> LanguageModel:
    """A :class:`LanguageModel`, shared between environments that ask for the same one.

    Environments only read the model (eval mode, no gradients), so N environments of one process
    hold one copy. An instance passed in is returned as it is.
    """
    if isinstance(model, LanguageModel):
        if layer != model.layer:
            raise ValueError(
                f"The LanguageModel passed in observes layer {model.layer}, not layer={layer}: "
                f"build it with LanguageModel(..., layer={layer}) or pass layer={model.layer}."
            )
        return model
    key = (os.fspath(model), str(torch.device(device)), dtype, layer)
    if key not in _SHARED:
        _SHARED[key] = LanguageModel(model, device, dtype, layer)
    return _SHARED[key]
