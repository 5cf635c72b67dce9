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

import collections
import contextlib
import functools
import inspect
import json
import os
import warnings
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer
from transformers.activations import ACT2CLS, ACT2FN

from textenvs import kvcache
from textenvs.kvcache import TokenSequence

TINY = "textenvs/tiny"
TINY_CHAT = "textenvs/tiny-chat"  # the tiny model taught ChatML turns (models/train_tiny_chat.py)
GREEDY_CACHE = 8192  # greedy() results a shared (read-only) model remembers, least recent dropped
CANDIDATE_FEATURES = 8  # numbers per candidate token in candidate observations
BUILTIN_MODELS = {
    TINY: Path(__file__).parent / "models" / "tiny",
    TINY_CHAT: Path(__file__).parent / "models" / "tiny-chat",
}
# The hub's legacy model ids without an organisation: the only bare names sent to the hub. Any
# other bare name is taken for a local folder, so a typo fails at once instead of retrying a hub.
LEGACY_HUB_NAMES = frozenset(
    {
        "gpt2",
        "gpt2-medium",
        "gpt2-large",
        "gpt2-xl",
        "distilgpt2",
        "openai-gpt",
        "ctrl",
        "transfo-xl-wt103",
        "xlnet-base-cased",
        "xlnet-large-cased",
    }
)
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def resolve_dtype(dtype: torch.dtype | str | None) -> torch.dtype | None:
    """``dtype`` as a torch dtype: a ``torch.dtype``, None (the checkpoint's) or a DTYPES name."""
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    if isinstance(dtype, str) and dtype.removeprefix("torch.") in DTYPES:
        return DTYPES[dtype.removeprefix("torch.")]
    raise ValueError(
        f"dtype={dtype!r} is not a dtype: pass None (the checkpoint's), a torch.dtype such as "
        f"torch.bfloat16, or one of {sorted(DTYPES)}."
    )


def resolve_device(device: str | torch.device) -> torch.device:
    """``device`` as a torch device that this machine and this torch build can use."""
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise ValueError(
            f"device={device!r} is not a torch device: use 'cpu', 'cuda', 'cuda:1' or 'mps'."
        ) from e
    if resolved.type == "cuda":
        if torch.version.cuda is None:
            raise ValueError(
                f"device={device!r}, but this torch build ({torch.__version__}) has no CUDA: "
                "install a CUDA build of torch (see pytorch.org) or use device='cpu'."
            )
        if not torch.cuda.is_available() or (resolved.index or 0) >= torch.cuda.device_count():
            raise ValueError(
                f"device={device!r}, but {torch.cuda.device_count()} CUDA device(s) are visible: "
                "check CUDA_VISIBLE_DEVICES and the driver (nvidia-smi), or use device='cpu'."
            )
    return resolved


def refuse_remote_code(path: str) -> None:
    """A local model that needs its own Python code (``auto_map``) is refused: we never run it."""
    config = Path(path) / "config.json"
    if config.is_file():
        try:
            auto_map = json.loads(config.read_text(encoding="utf-8")).get("auto_map")
        except (json.JSONDecodeError, UnicodeDecodeError, AttributeError):
            return  # transformers reports a broken config with its own message
        if auto_map:
            raise ValueError(
                f"The model in {path} needs its own Python code (config.json has an 'auto_map'), "
                "and textenvs never runs code that comes with a model (trust_remote_code stays "
                "off). Use an architecture that transformers ships (GPT-2, Llama, Qwen2, ...) or "
                "convert the checkpoint to one."
            )


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
    # Hub names are "org/name" (or a legacy bare id); anything else must exist locally.
    bare_local = "/" not in name and name not in LEGACY_HUB_NAMES
    if bare_local or name.startswith((".", "/", "~")) or name.count("/") > 1 or "\\" in name:
        raise FileNotFoundError(
            f"Model {name!r} is not a folder here and not a hub name: pass a folder written by "
            "`save_pretrained`, a Hugging Face hub name 'org/name' (or a legacy id such as "
            f"'gpt2'), or the built-in {TINY!r}."
        )
    return name


@contextlib.contextmanager
def quiet_loading():
    """transformers' progress bars ("Loading weights", "Writing model shards") off while a model
    loads or is saved: an env (or each of N workers) loading a model, or a trainer writing a
    checkpoint, prints nothing; restored after, so a user's own loads keep theirs."""
    from transformers.utils import logging as hf_logging

    shown = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if shown:
            hf_logging.enable_progress_bar()


def fuse_tanh_gelu(model: torch.nn.Module) -> int:
    """Swap every ``NewGELUActivation`` (transformers' tanh GELU, seven elementwise ops) in
    ``model`` for ``GELUTanh``, PyTorch's one-kernel tanh GELU: the same function, within an ulp.
    GPT-2's MLPs use it, where its seven ops are about a tenth of the tiny model's CPU time
    (profiled). Returns how many modules were swapped (0 for models with other activations).
    """
    swapped = 0
    for module in list(model.modules()):
        for name, child in module.named_children():
            if type(child) is ACT2CLS["gelu_new"]:
                setattr(module, name, ACT2FN["gelu_pytorch_tanh"])
                swapped += 1
    return swapped


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
        empty: bool = False,
    ) -> None:
        self.name = os.fspath(name)
        # greedy()'s memo (text by prompt and budget): set by shared_model() only (read-only)
        self._greedy_cache: collections.OrderedDict | None = None
        self.device = resolve_device(device)
        self.dtype = dtype = resolve_dtype(dtype)
        self.path = resolve_model_path(self.name)
        if empty:  # the layout only, on the meta device: a sharded trainer loads its own shards
            self.tokenizer, self.model = self._layout(self.path, dtype)
            self.model.eval()
        else:
            self.tokenizer, self.model = self._load(self.path, dtype)
            self.model.to(self.device).eval()
        self.model.requires_grad_(False)
        fuse_tanh_gelu(self.model)
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
        self._note_fast_paths()
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
        # An episode ends at any token the model's generation config ends on (an instruction-tuned
        # model's end-of-turn token(s), `generation_config.eos_token_id` may be a list), as
        # transformers' generate() does, and at the tokenizer's EOS.
        stops = getattr(getattr(self.model, "generation_config", None), "eos_token_id", None)
        stops = [] if stops is None else [stops] if isinstance(stops, int) else list(stops)
        self.stop_token_ids = frozenset([self.eos_token_id, *map(int, stops)])
        self.max_positions = int(
            getattr(config, "n_positions", None)
            or getattr(config, "max_position_embeddings", None)
            or 2048
        )
        # transformers warns "We strongly recommend passing in an `attention_mask`" when an input
        # without a mask holds the pad id at either end. Our maskless inputs are never padded (one
        # sequence; every padded batch in textenvs.batching passes its mask), but models whose pad
        # id is their EOS (the tiny model, GPT-2 with pad = eos) trip it whenever an episode
        # writes EOS: a false alarm, so this model's modules (the check runs in the base model
        # inside the LM head model) skip it.
        for module in self.model.modules():
            if hasattr(module, "warn_if_padding_and_no_attention_mask"):
                module.warn_if_padding_and_no_attention_mask = lambda *args, **kwargs: None
        if not empty:
            self._check_causal()

    def loaded(self) -> LanguageModel:
        """Finish an ``empty=True`` model once its weights are in place (a sharded trainer's
        shards, :func:`agents.fsdp.load_local_shards`): the checks a loaded model gets at once.
        Returns the model itself."""
        self._check_causal()
        return self

    @staticmethod
    def _check_source(path: str) -> None:
        """Refuse a model that needs its own code, and a local folder whose config does not
        match its weights, before anything is allocated."""
        refuse_remote_code(path)
        if os.path.isdir(path):
            from textenvs.weights import check_model_folder

            check_model_folder(path)

    def _layout(self, path: str, dtype):
        """The tokenizer and the causal LM of ``path`` built on the meta device: its config and
        generation config read, no weight allocated (the same refusals as :meth:`_load`)."""
        from transformers import AutoConfig, GenerationConfig

        self._check_source(path)
        with quiet_loading():
            tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=False)
            config = AutoConfig.from_pretrained(path, trust_remote_code=False)
            with torch.device("meta"):
                model = AutoModelForCausalLM.from_config(config, dtype=dtype)
            try:
                model.generation_config = GenerationConfig.from_pretrained(path)
            except OSError:  # no generation_config.json: the config's own
                pass
        return tokenizer, model

    def _load(self, path: str, dtype):
        """The tokenizer and the causal LM of ``path`` (safetensors only, no remote code; a local
        folder's config checked against its weights first); a ValueError that says what to use
        instead."""
        self._check_source(path)
        try:
            with quiet_loading():
                tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=False)
                model, loading = AutoModelForCausalLM.from_pretrained(
                    path,
                    trust_remote_code=False,
                    use_safetensors=True,
                    dtype=dtype,
                    output_loading_info=True,
                )
        except (OSError, ValueError, KeyError) as e:
            reason = "it needs its own code" if "trust_remote_code" in str(e) else str(e)
            raise ValueError(
                f"Could not load model {self.name!r} as a causal LM with safetensors weights "
                f"({reason}). Use the built-in {TINY!r}, a folder written by `save_pretrained` "
                "holding model.safetensors, or a hub name (needs network)."
            ) from e
        mismatched = {k: v for k, v in loading.items() if k != "error_msgs" and v}
        if mismatched:
            raise ValueError(
                f"The weights of {self.name!r} do not match its config.json "
                f"({', '.join(f'{k}: {sorted(v)[:3]}' for k, v in mismatched.items())}): the model "
                "would run with random weights. Save model and config together with "
                "`save_pretrained`."
            )
        return tokenizer, model

    def _note_fast_paths(self) -> None:
        """What the step loop can skip for this model: transformers' decode wrapper, the LM head
        at positions no one reads; the KV cache's argument name; a forward's fixed cost."""
        # An env decodes its text every step. Without clean-up of tokenization spaces, a fast
        # tokenizer's decode is exactly its backend's, so decode() calls the backend directly and
        # skips transformers' per-call argument conversion (half the cost of a short decode).
        backend = getattr(self.tokenizer, "backend_tokenizer", None)
        self._backend_decode = backend.decode if backend is not None else None
        # A prompt's forward needs the logits of its last position only: models that take
        # transformers' logits_to_keep skip the LM head for the others.
        parameters = inspect.signature(self.model.forward).parameters
        self.keeps_logits = "logits_to_keep" in parameters
        # transformers 5.x names the KV cache argument `cache` (`past_key_values` is deprecated)
        self.cache_keyword = "cache" if "cache" in parameters else "past_key_values"
        # What one more forward costs in tokens of compute, for batching.extend_batch's grouping
        # of tails: on a CPU a small model's forward is about 30 tokens' worth of fixed cost; on a
        # GPU a forward is launch-bound, so padding is nearly free and the rows stay in one batch.
        self.forward_overhead_tokens = 32.0 if self.device.type == "cpu" else 4096.0

    @torch.no_grad()  # not inference_mode: a sharded model's gather buffers outlive this call
    def _check_causal(self) -> None:
        """Refuse a model whose earlier positions see later tokens (an encoder loaded as an LM).

        The KV cache, crop and every incremental observation assume that a position's hidden state
        never depends on later tokens; an encoder such as BERT would silently break all of them.
        """
        a = torch.tensor([[1, 2, 3, 4]], device=self.device) % self.vocab_size
        b = a.clone()
        b[0, -1] = (b[0, -1] + 1) % self.vocab_size
        h_a = self.model(input_ids=a, output_hidden_states=True).hidden_states[-1][0, :-1]
        h_b = self.model(input_ids=b, output_hidden_states=True).hidden_states[-1][0, :-1]
        if not torch.allclose(h_a.float(), h_b.float(), atol=1e-3):
            raise ValueError(
                f"The model {self.name!r} ({self.model.config.model_type}) is not causal: its "
                "earlier positions change when a later token changes, so KV caching, edits and "
                "every observation would be wrong. Use a causal (decoder-only) language model."
            )

    def __reduce__(self):
        # Pickle by reference: unpickling (an async vector env's worker, a checkpoint of an env)
        # loads or reuses the shared model of that name instead of copying weights. A model whose
        # weights were changed in memory must be saved with save_pretrained and passed by folder.
        return shared_model, (self.name, str(self.device), self.dtype, self.layer)

    # -- text ------------------------------------------------------------------------------
    def encode(self, text: str) -> list[int]:
        """The token ids of ``text`` as plain text: a special token's string (``"<|endoftext|>"``)
        in it is split like any other text, so no text can smuggle a special token in."""
        return self.tokenizer(text, add_special_tokens=False, split_special_tokens=True)[
            "input_ids"
        ]

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        """:meth:`encode` of several texts in one tokenizer call."""
        if not texts:
            return []
        return self.tokenizer(texts, add_special_tokens=False, split_special_tokens=True)[
            "input_ids"
        ]

    def encode_prompts(self, prompts: list[str], chat_template: bool = False) -> list[list[int]]:
        """The ids of several prompts: :meth:`encode_batch`, or with ``chat_template`` each
        prompt as one user turn of the tokenizer's chat template followed by its generation
        prompt (``apply_chat_template(..., add_generation_prompt=True)``'s ids exactly)."""
        if not chat_template:
            return self.encode_batch(prompts)
        self.check_chat_template()
        if not prompts:
            return []
        ids = self.tokenizer.apply_chat_template(  # one call for all the conversations
            [[{"role": "user", "content": prompt}] for prompt in prompts],
            add_generation_prompt=True,
            tokenize=True,
        )
        if not isinstance(ids, list):  # transformers 5 returns a BatchEncoding
            ids = ids["input_ids"]
        return [list(row) for row in ids]

    def check_chat_template(self) -> None:
        """Refuse ``chat_template=True`` for a tokenizer that has no chat template."""
        if not getattr(self.tokenizer, "chat_template", None):
            raise ValueError(
                f"chat_template=True, but the tokenizer of {self.name!r} has no chat template "
                "(tokenizer_config.json / chat_template.jinja): use an instruction-tuned model "
                "that ships one, set tokenizer.chat_template and save it, or pass "
                "chat_template=False to read the plain prompt."
            )

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

    def with_model(self, model: torch.nn.Module) -> LanguageModel:
        """A new :class:`LanguageModel` with this one's tokenizer and settings over ``model``, a
        module of the same architecture (NLPO's masking policy); this one is left as it is."""
        other = object.__new__(LanguageModel)
        other.__dict__.update(self.__dict__)
        other.__dict__.pop("_feature_projection", None)  # computed from the weights
        other.model, other._greedy_cache = model, None
        return other

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
            **{self.cache_keyword: cache},
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

    @functools.cached_property
    def _feature_projection(self) -> torch.Tensor:
        """``(d, CANDIDATE_FEATURES)``: the fixed Gaussian matrix (seed 0) of token_features."""
        weight = self.model.get_output_embeddings().weight
        generator = torch.Generator().manual_seed(0)
        projection = torch.randn(weight.shape[1], CANDIDATE_FEATURES, generator=generator)
        return projection.to(weight.device, torch.float32)

    @torch.inference_mode()
    def token_features(self, ids) -> torch.Tensor:
        """``(len(ids), CANDIDATE_FEATURES)`` float32: each token's output-embedding row,
        unit-normalised and projected by a fixed Gaussian matrix (seed 0): what an agent sees of
        which token an action stands for."""
        rows = self.model.get_output_embeddings().weight[torch.as_tensor(ids, device=self.device)]
        return torch.nn.functional.normalize(rows.float(), dim=-1) @ self._feature_projection

    @torch.inference_mode()
    def greedy(self, prompt_ids: list[int], max_new_tokens: int) -> str:
        """Greedy continuation of ``prompt_ids`` until EOS or ``max_new_tokens``; the decoded new
        text.

        A model from :func:`shared_model` (read-only: environments never train it) remembers the
        last ``GREEDY_CACHE`` results, so an edit env's draft of a sample it drew before costs no
        forward; a model built or passed in by the caller (which may train it) recomputes.
        :func:`textenvs.batching.greedy_batch` decodes many prompts at once and shares the memo.
        """
        text = self.recall_greedy(prompt_ids, max_new_tokens)
        if text is None:
            text = self._greedy(prompt_ids, max_new_tokens)
            self.remember_greedy(prompt_ids, max_new_tokens, text)
        return text

    @property
    def remembers_greedy(self) -> bool:
        """Whether greedy results are memoised (models from :func:`shared_model` only)."""
        return self._greedy_cache is not None

    def recall_greedy(self, prompt_ids: list[int], max_new_tokens: int) -> str | None:
        """The memoised greedy text of ``prompt_ids`` (None: not remembered, or no memo)."""
        cache = self._greedy_cache
        key = (tuple(prompt_ids), max_new_tokens)
        if cache is None or key not in cache:
            return None
        cache.move_to_end(key)
        return cache[key]

    def remember_greedy(self, prompt_ids: list[int], max_new_tokens: int, text: str) -> None:
        """Memoise a greedy text (a no-op without a memo); the least recent beyond
        ``GREEDY_CACHE`` are dropped."""
        cache = self._greedy_cache
        if cache is None:
            return
        cache[(tuple(prompt_ids), max_new_tokens)] = text
        while len(cache) > GREEDY_CACHE:
            cache.popitem(last=False)

    def _greedy(self, prompt_ids: list[int], max_new_tokens: int) -> str:
        seq, _, logits = self.prefill(prompt_ids)
        new: list[int] = []
        for _ in range(max_new_tokens):
            token = int(logits.argmax())
            if token in self.stop_token_ids:
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
    key = (os.fspath(model), str(resolve_device(device)), resolve_dtype(dtype), layer)
    if key not in _SHARED:
        _SHARED[key] = LanguageModel(model, device, dtype, layer)
        _SHARED[key]._greedy_cache = collections.OrderedDict()  # read-only: memoise greedy()
    return _SHARED[key]
