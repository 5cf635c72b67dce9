"""Model-based rewards, scored many texts per forward: BERTScore, a classifier, a batch callable.

* ``reward="bertscore"``: BERTScore (Zhang et al. 2020) from the ``bert-score`` package, the best
  over the references. ``reward_kwargs``: ``model`` (a hub name or a ``save_pretrained`` folder of
  an encoder; default ``roberta-large``, the package's English default), ``num_layers`` (the
  layer whose embeddings are matched; the package's default for a model it knows, else
  required), ``output`` (``"f1"``, default, ``"precision"`` or ``"recall"``), ``batch_size``
  (64); tokens are not idf-weighted.
* ``reward="classifier"``: any ``AutoModelForSequenceClassification`` (a sentiment classifier, a
  reward model). ``reward_kwargs``: ``model`` (required), ``label`` (a label name of its
  ``config.id2label`` or an index; default ``"POSITIVE"``, matched without case), ``output``
  (``"probability"`` of the label, default, or its ``"logit"``), ``input`` (``"text"``, default:
  the generated text alone, RL4LMs' sentiment reward; ``"prompt+text"``: the prompt and the text
  as a pair, what a reward model reads), ``batch_size`` (64), ``max_length`` (the model's).
* ``reward="lm_score"``: how likely a causal LM finds the text, the exp of its mean token
  log-probability (in (0, 1]: 1 for a text the LM is sure of; its inverse is the perplexity).
  ``reward_kwargs``: ``model`` (a hub name or folder of a causal LM; default: the env's own model,
  loaded again as a separate frozen copy), ``input`` (``"text"``, default: the text after the
  model's BOS token; ``"prompt+text"``: conditioned on the prompt), ``output`` (``"probability"``,
  default, or ``"logprob"``, the mean log-probability itself), ``batch_size`` (32).
* ``reward="human"``: people's 1-5 ratings of each finished episode's text on a local rating page,
  paid as ``(score - 1) / 4`` (:class:`textenvs.rate.human.HumanRating`; terminal only).
  ``reward_kwargs``: ``db`` (the ratings database file, required), ``serve`` (start the page in
  this process, default True), ``host`` / ``port`` / ``token`` (the page's address and access
  token), ``timeout`` (seconds to wait per batch, default 3600) and ``on_timeout`` (``"raise"``,
  default, or ``"default"``: pay ``default``, 0.5, for a text not rated in time), ``poll``.
* :class:`BatchMetric`: a user callable ``(texts, references) -> list[float]``.

Every model-based metric is loaded once per process (:func:`shared_metric`) and shared by the
envs that name it with the same arguments. It remembers the values of the last batch it scored:
a batched vector env scores the texts of all its sub-envs that need a score at a step in ONE call
(:meth:`BatchedMetric.prefetch`, one forward), and each sub-env then reads its own value; a
single env scores its text alone, a batch of one. The empty text scores 0.0 without a forward.

Weights load from safetensors with ``trust_remote_code`` off: a local folder without
``model.safetensors``, or one whose ``config.json`` needs its own code, is refused.
"""

from __future__ import annotations

import collections
import inspect
import math
import os
from collections.abc import Callable, Sequence

import torch

from textenvs.checks import check_choice

MODEL_METRICS = ("bertscore", "classifier", "lm_score", "human")
Item = tuple[str, tuple[str, ...], str]  # (text, references, prompt)


class BatchedMetric:
    """A metric that scores a batch of texts at once and remembers the last batch's values.

    Subclasses implement :meth:`score_batch`. ``uses_prompt``: the score depends on the prompt
    too (a reward model), so the env passes it.
    """

    uses_prompt = False
    __name__ = "batched"

    def __init__(self) -> None:
        self._memo: dict[Item, float] = {}

    def score_batch(
        self, texts: list[str], references: list[tuple[str, ...]], prompts: list[str]
    ) -> list[float]:
        """One value per text (higher is better)."""
        raise NotImplementedError

    def _key(self, text: str, references: Sequence[str], prompt: str) -> Item:
        return (text, tuple(references), prompt if self.uses_prompt else "")

    def prefetch(self, items: list[Item]) -> None:
        """Score every ``(text, references, prompt)`` of ``items`` in one :meth:`score_batch` and
        remember the values (only these: the memory holds one batch)."""
        keys = [self._key(*item) for item in items if item[0].strip()]
        todo = [k for k in dict.fromkeys(keys) if k not in self._memo]
        kept = {k: self._memo[k] for k in keys if k in self._memo}
        if todo:
            values = self._checked(
                self.score_batch([k[0] for k in todo], [k[1] for k in todo], [k[2] for k in todo]),
                len(todo),
            )
            kept.update(zip(todo, values))
        self._memo = kept

    def __call__(self, hypothesis: str, references: Sequence[str], prompt: str = "") -> float:
        if not hypothesis.strip():
            return 0.0
        key = self._key(hypothesis, references, prompt)
        if key in self._memo:
            return self._memo[key]
        return self._checked(self.score_batch([key[0]], [key[1]], [key[2]]), 1)[0]

    def _checked(self, values, n: int) -> list[float]:
        values = [float(v) for v in values]
        if len(values) != n or not all(math.isfinite(v) for v in values):
            raise ValueError(
                f"Reward metric {self.__name__!r} returned {values!r} for {n} texts: it must "
                "return one finite number per text."
            )
        return values


class BatchMetric(BatchedMetric):
    """A user's batch metric: ``fn(texts, references) -> list[float]``, one call per batch.

    Pass it as ``reward=BatchMetric(fn)``; every sub-env of a batched vector env built with it
    shares it, so a vector step makes one call for all the sub-envs that need a score.

    Args:
        fn: ``(texts: list[str], references: list[tuple[str, ...]]) -> list[float]``.
        name: The ``info["metric_name"]`` (default: ``fn.__name__``).
    """

    def __init__(
        self,
        fn: Callable[[list[str], list[tuple[str, ...]]], Sequence[float]],
        name: str | None = None,
    ) -> None:
        super().__init__()
        if not callable(fn):
            raise TypeError(f"BatchMetric needs a callable, got {type(fn).__name__}.")
        self.fn = fn
        self.__name__ = name or getattr(fn, "__name__", "batch_metric")

    def score_batch(self, texts, references, prompts) -> list[float]:
        return list(self.fn(list(texts), list(references)))


def _check_positive(name: str, value: object) -> None:
    if not (isinstance(value, int) and not isinstance(value, bool) and value >= 1):
        raise ValueError(f"reward_kwargs[{name!r}] must be an int >= 1, got {value!r}.")


def _local_weights(model: str, what: str) -> dict | None:
    """A local folder must hold the safetensors weights transformers reads
    (``model.safetensors`` or its sharded index: another ``*.safetensors`` beside a
    ``pytorch_model.bin`` would leave the pickle to be read), a config that is a JSON object,
    and need no code of its own. Returns the folder's config (None for a hub name). A path that
    is not a folder here and not a hub name is refused with our message."""
    from textenvs.lm import refuse_remote_code, resolve_model_path
    from textenvs.weights import read_config, weight_files

    try:
        resolve_model_path(model)
    except FileNotFoundError as e:
        raise FileNotFoundError(f"The {what} {model!r}: {e}") from None
    if not os.path.isdir(model):
        return None  # a hub name: transformers resolves it (safetensors where the repo has them)
    refuse_remote_code(model)
    try:
        weight_files(model)
    except ValueError as e:
        raise ValueError(f"The {what}: {e}") from e
    return read_config(model)


def length_batches(items: list, lengths: list[int], batch_size: int, overhead: float) -> list[list]:
    """Cut ``items`` (sorted longest first) into consecutive batches of at most ``batch_size``
    that minimise the padded tokens (each batch's size times its longest) plus ``overhead``
    tokens per batch: an exact dynamic programme over the cut points. ``overhead=math.inf``
    gives the fewest batches (one unless past ``batch_size``)."""
    if any(a < b for a, b in zip(lengths, lengths[1:])):
        raise ValueError("length_batches needs its items sorted longest first.")
    n = len(items)
    if math.isinf(overhead):
        return [items[i : i + batch_size] for i in range(0, n, batch_size)]
    best = [0.0] + [math.inf] * n  # best[j]: the cost of the first j items
    cut = [0] * (n + 1)
    for j in range(1, n + 1):
        for i in range(max(0, j - batch_size), j):
            cost = best[i] + (j - i) * lengths[i] + overhead
            if cost < best[j]:
                best[j], cut[j] = cost, i
    batches, j = [], n
    while j > 0:
        batches.append(items[cut[j] : j])
        j = cut[j]
    return batches[::-1]


class BERTScoreMetric(BatchedMetric):
    """BERTScore of each text against its references (the best over them), from ``bert-score``.

    The encoder, the tokenization, the padding and the greedy matching are the package's own
    (``bert_score.utils.sent_encode``, ``padding`` and ``greedy_cos_idf``, what
    ``BERTScorer.score`` runs); the references' embeddings are remembered (the last
    ``REFERENCES_KEPT``), because an env scores the same references at every step of an
    episode: a step encodes only the new texts, cut by length into the batches that waste the
    least compute on padding.

    Args:
        model: The encoder: a hub name or a local ``save_pretrained`` folder.
        num_layers: Which layer's embeddings are matched (required for a model the package does
            not know).
        output: ``"f1"``, ``"precision"`` or ``"recall"``.
        batch_size: Texts per forward of the encoder.
        device: Where the encoder runs.
    """

    OUTPUTS = ("precision", "recall", "f1")
    REFERENCES_KEPT = 4096
    # what one more encoder forward costs on the CPU, in tokens' compute (measured on a random
    # 4-layer, 256-wide BERT at one thread: a forward of 1 token took 4.5 ms, each further token
    # about 0.125 ms); off the CPU padding is nearly free and the texts go in the fewest forwards
    FORWARD_TOKENS = 40

    def __init__(
        self,
        model: str = "roberta-large",
        num_layers: int | None = None,
        output: str = "f1",
        batch_size: int = 64,
        device: str = "cpu",
    ) -> None:
        super().__init__()
        try:
            from bert_score import BERTScorer
            from bert_score.utils import model2layers
        except ImportError as e:
            raise ImportError(
                "reward='bertscore' needs the bert-score package: pip install 'textenvs[metrics]'."
            ) from e
        if output not in self.OUTPUTS:
            raise ValueError(f"output={output!r} is not valid: choose one of {list(self.OUTPUTS)}.")
        if num_layers is None and model not in model2layers:
            raise ValueError(
                f"reward_kwargs['num_layers'] is needed for the BERTScore model {model!r} "
                "(bert-score knows the best layer only of the models it lists): pass the layer "
                "to match, e.g. reward_kwargs={'model': ..., 'num_layers': 2}."
            )
        _check_positive("batch_size", batch_size)
        if num_layers is not None:
            _check_positive("num_layers", num_layers)
        config = _local_weights(os.fspath(model), "BERTScore encoder")
        layers = (config or {}).get("num_hidden_layers")
        if num_layers is not None and isinstance(layers, int) and num_layers > layers:
            raise ValueError(
                f"reward_kwargs['num_layers']={num_layers} is past the {layers} layers of the "
                f"BERTScore encoder {model!r}: pass a layer in [1, {layers}]."
            )
        self.__name__ = "bertscore"
        self.output = self.OUTPUTS.index(output)
        self.batch_size = batch_size
        from textenvs.lm import quiet_loading

        with quiet_loading():
            self.scorer = BERTScorer(
                model_type=os.fspath(model),
                num_layers=num_layers,
                batch_size=batch_size,
                device=device,
                use_fast_tokenizer=True,
            )
        # bert-score cuts texts at the tokenizer's model_max_length: a tokenizer saved without a
        # limit (a huge sentinel) would overflow it and overrun the encoder's positions
        tokenizer, config = self.scorer._tokenizer, self.scorer._model.config
        positions = getattr(config, "max_position_embeddings", None) or 512
        if not tokenizer.model_max_length or tokenizer.model_max_length > positions:
            tokenizer.model_max_length = positions
        # no idf weighting: every token weighs 1, the special tokens 0 (BERTScorer's default)
        self._idf = collections.defaultdict(lambda: 1.0)
        self._idf[tokenizer.sep_token_id] = 0
        self._idf[tokenizer.cls_token_id] = 0
        self._references: collections.OrderedDict[str, tuple] = collections.OrderedDict()

    def _embed(self, sentences: list[str]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """Each sentence's ``(embedding (T, d), idf (T,))``, encoded in batches of alike length.

        Every token of a batch is padded to the batch's longest, and on the CPU a padded token
        costs what a real one does: the sentences, longest first, are cut into the runs of
        :func:`length_batches`, which weigh the padding saved against one more forward.
        """
        from bert_score.utils import padding, sent_encode

        tokenizer, model = self.scorer._tokenizer, self.scorer._model
        ids = {s: sent_encode(tokenizer, s) for s in sentences}  # the package's tokenization
        order = sorted(ids, key=lambda s: len(ids[s]), reverse=True)
        device = self.scorer.device
        overhead = self.FORWARD_TOKENS if torch.device(device).type == "cpu" else math.inf
        out = {}
        for batch in length_batches(order, [len(ids[s]) for s in order], self.batch_size, overhead):
            # what bert_score.utils.get_bert_embedding does, on ids tokenized once above
            tokens, _, mask = padding([ids[s] for s in batch], tokenizer.pad_token_id, torch.long)
            idf, _, _ = padding([[self._idf[i] for i in ids[s]] for s in batch], 0, torch.float)
            embedding = model(tokens.to(device), attention_mask=mask.to(device))[0]
            for i, sentence in enumerate(batch):
                n = int(mask[i].sum())
                out[sentence] = (embedding[i, :n], idf[i, :n])
        return out

    @staticmethod
    def _padded(stats: list[tuple[torch.Tensor, torch.Tensor]]):
        from torch.nn.utils.rnn import pad_sequence

        embeddings, idfs = zip(*stats)
        lengths = torch.tensor([e.shape[0] for e in embeddings])
        mask = torch.arange(int(lengths.max()))[None] < lengths[:, None]  # (B, T)
        return (
            pad_sequence(list(embeddings), batch_first=True, padding_value=2.0),  # (B, T, d)
            mask.to(embeddings[0].device),
            pad_sequence(list(idfs), batch_first=True),  # (B, T)
        )

    @torch.inference_mode()
    def score_batch(self, texts, references, prompts) -> list[float]:
        from bert_score.utils import greedy_cos_idf

        new = [r for refs in references for r in refs if r not in self._references]
        self._references.update(self._embed(new))
        while len(self._references) > self.REFERENCES_KEPT:
            self._references.popitem(last=False)
        ref_stats = {r: self._references[r] for refs in references for r in refs}
        hyp_stats = self._embed(list(texts))
        pairs = [(text, r) for text, refs in zip(texts, references) for r in refs]
        precision, recall, f1 = greedy_cos_idf(
            *self._padded([ref_stats[r] for _, r in pairs]),
            *self._padded([hyp_stats[t] for t, _ in pairs]),
        )
        scores = torch.stack([precision, recall, f1], -1)[:, self.output].tolist()
        values, at = [], 0
        for refs in references:  # the best over each text's references
            values.append(max(scores[at : at + len(refs)]))
            at += len(refs)
        return values


class ClassifierMetric(BatchedMetric):
    """A sequence classifier's probability (or logit) of one label, of the text or of prompt +
    text.

    Args:
        model: A hub name or a ``save_pretrained`` folder of an
            ``AutoModelForSequenceClassification``.
        label: A label name of ``config.id2label`` (matched without case) or an index.
        output: ``"probability"`` (softmax over the labels) or ``"logit"``.
        input: ``"text"`` (the generated text alone) or ``"prompt+text"`` (a text pair).
        batch_size: Texts per forward.
        max_length: Longest input in tokens (default: the model's), longer ones cut.
        device: Where the classifier runs.
    """

    OUTPUTS = ("probability", "logit")
    INPUTS = ("text", "prompt+text")

    def __init__(
        self,
        model: str | None = None,
        label: str | int = "POSITIVE",
        output: str = "probability",
        input: str = "text",
        batch_size: int = 64,
        max_length: int | None = None,
        device: str = "cpu",
    ) -> None:
        super().__init__()
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        if model is None:
            raise ValueError(
                "reward='classifier' needs reward_kwargs={'model': ...}: a folder or hub name of "
                "a sequence classifier (RL4LMs and TRL's IMDB sentiment task use "
                "'lvwerra/distilbert-imdb', label 'POSITIVE')."
            )
        check_choice("output", output, self.OUTPUTS)
        check_choice("input", input, self.INPUTS)
        _check_positive("batch_size", batch_size)
        if max_length is not None:
            _check_positive("max_length", max_length)
        model = os.fspath(model)
        _local_weights(model, "classifier")
        try:
            from textenvs.lm import quiet_loading

            with quiet_loading():
                self.model, loading = AutoModelForSequenceClassification.from_pretrained(
                    model, trust_remote_code=False, use_safetensors=True, output_loading_info=True
                )
                self.tokenizer = AutoTokenizer.from_pretrained(model, trust_remote_code=False)
        except (OSError, ValueError, KeyError) as e:
            raise ValueError(
                f"Could not load {model!r} as a sequence classifier with safetensors weights: {e}"
            ) from e
        if loading.get("missing_keys"):
            raise ValueError(
                f"{model!r} is not a trained sequence classifier: its weights have no "
                f"classification head ({sorted(loading['missing_keys'])[:3]} would be random). "
                "Pass a model saved as AutoModelForSequenceClassification (a sentiment classifier "
                "or a reward model)."
            )
        self.model.to(device).eval().requires_grad_(False)
        self.device = torch.device(device)
        self.label = self._label_index(model, label)
        if output == "probability" and self.model.config.num_labels == 1:
            raise ValueError(
                f"{model!r} has one output (a reward model): the softmax over one label is always "
                "1. Pass reward_kwargs={'output': 'logit'} to use its score."
            )
        self.__name__ = "classifier"
        self.output, self.uses_prompt = output, input == "prompt+text"
        self.batch_size = batch_size
        if self.tokenizer.pad_token is None:  # GPT-2-style classifiers pad with EOS
            self.tokenizer.pad_token = self.tokenizer.eos_token
            self.model.config.pad_token_id = self.tokenizer.eos_token_id
        self.max_length = max_length or getattr(self.tokenizer, "model_max_length", None)
        if not self.max_length or self.max_length > 100_000:  # a tokenizer without a limit
            config = self.model.config
            self.max_length = getattr(config, "max_position_embeddings", None) or 512

    def _label_index(self, model: str, label: str | int) -> int:
        names = {int(i): str(n) for i, n in self.model.config.id2label.items()}
        if isinstance(label, int) and not isinstance(label, bool) and label in names:
            return label
        if isinstance(label, str):
            matches = [i for i, n in names.items() if n.lower() == label.lower()]
            if matches:
                return matches[0]
        raise ValueError(
            f"The classifier {model!r} has no label {label!r}: its labels are {names} "
            "(config.id2label); pass reward_kwargs={'label': <one of those names or indices>}."
        )

    @torch.inference_mode()
    def score_batch(self, texts, references, prompts) -> list[float]:
        values: list[float] = []
        for start in range(0, len(texts), self.batch_size):
            batch = list(texts[start : start + self.batch_size])
            pairs = (list(prompts[start : start + self.batch_size]),) if self.uses_prompt else ()
            encoded = self.tokenizer(
                *pairs,
                batch,
                padding=True,
                truncation=True,
                max_length=self.max_length,
                return_tensors="pt",
            ).to(self.device)
            logits = self.model(**encoded).logits.float()  # (B, labels)
            if self.output == "probability":
                logits = logits.softmax(-1)
            values += logits[:, self.label].tolist()
        return values


class LMScoreMetric(BatchedMetric):
    """A causal LM's score of a text: ``exp`` of the mean log-probability of its tokens.

    Args:
        model: A hub name or ``save_pretrained`` folder of a causal LM (safetensors).
        input: ``"text"`` (the text after the model's BOS token, unconditioned) or
            ``"prompt+text"`` (the text's tokens given the prompt's).
        output: ``"probability"`` (``exp`` of the mean log-probability, in (0, 1]) or
            ``"logprob"`` (the mean log-probability, <= 0).
        batch_size: Texts per forward.
        device: Where the LM runs.
    """

    OUTPUTS = ("probability", "logprob")
    INPUTS = ("text", "prompt+text")

    def __init__(
        self,
        model: str | None = None,
        input: str = "text",
        output: str = "probability",
        batch_size: int = 32,
        device: str = "cpu",
    ) -> None:
        super().__init__()
        from textenvs.lm import LanguageModel

        if model is None:
            raise ValueError(
                "reward='lm_score' needs reward_kwargs={'model': ...} outside an env (an env "
                "passes its own model's name): a folder or hub name of a causal LM."
            )
        check_choice("input", input, self.INPUTS)
        check_choice("output", output, self.OUTPUTS)
        _check_positive("batch_size", batch_size)
        self.lm = LanguageModel(os.fspath(model), device=device)  # its own frozen copy
        self.lm.model.eval().requires_grad_(False)
        self.__name__ = "lm_score"
        self.uses_prompt, self.output, self.batch_size = input == "prompt+text", output, batch_size

    def _rows(self, text: str, prompt: str) -> tuple[list[int], int]:
        """The ids the LM reads and how many of them, at the end, are the text's."""
        tokenizer = self.lm.tokenizer
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        context = (
            tokenizer(prompt, add_special_tokens=False)["input_ids"]
            if self.uses_prompt and prompt
            else []
        ) or [
            tokenizer.bos_token_id if tokenizer.bos_token_id is not None else self.lm.eos_token_id
        ]
        room = self.lm.max_positions - len(ids)
        if room < 1:  # a text longer than the context: its last tokens, after one of context
            ids, room = ids[-(self.lm.max_positions - 1) :], 1
        return context[-room:] + ids, len(ids)

    @torch.inference_mode()
    def score_batch(self, texts, references, prompts) -> list[float]:
        values: list[float] = []
        for start in range(0, len(texts), self.batch_size):
            rows = [
                self._rows(t, p)
                for t, p in zip(texts[start : start + self.batch_size], prompts[start:])
            ]
            width = max(len(ids) for ids, _ in rows)
            input_ids = torch.full((len(rows), width), self.lm.eos_token_id, dtype=torch.long)
            mask = torch.zeros_like(input_ids)
            for b, (ids, _) in enumerate(rows):
                input_ids[b, : len(ids)] = torch.tensor(ids)
                mask[b, : len(ids)] = 1
            logits = self.lm.model(
                input_ids=input_ids.to(self.lm.device), attention_mask=mask.to(self.lm.device)
            ).logits.float()
            logprobs = (
                logits[:, :-1]
                .log_softmax(-1)
                .gather(-1, input_ids[:, 1:, None].to(self.lm.device))[..., 0]
            )  # (B, W - 1): log p(token t | tokens < t)
            for b, (ids, n) in enumerate(rows):
                mean = logprobs[b, len(ids) - 1 - n : len(ids) - 1].mean().item()
                values.append(math.exp(mean) if self.output == "probability" else mean)
        return values


_SHARED: dict[tuple, BatchedMetric] = {}


def shared_metric(name: str, reward_kwargs: dict | None, device: str = "cpu") -> BatchedMetric:
    """The model-based metric ``name`` with ``reward_kwargs``, loaded once per process."""
    kwargs = {"device": device, **(reward_kwargs or {})}
    key = (name, repr(sorted(kwargs.items())))
    if key not in _SHARED:
        if name == "human":  # the rating page's package, imported only when asked for
            from textenvs.rate.human import HumanRating as cls
        else:
            cls = {
                "bertscore": BERTScoreMetric,
                "classifier": ClassifierMetric,
                "lm_score": LMScoreMetric,
            }[name]
        known = set(inspect.signature(cls).parameters)
        unknown = sorted(set(kwargs) - known)
        if unknown:
            raise ValueError(
                f"reward={name!r} takes the reward_kwargs {sorted(known)}, not {unknown}."
            )
        _SHARED[key] = cls(**kwargs)
    return _SHARED[key]
