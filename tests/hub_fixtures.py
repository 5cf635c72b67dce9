"""Small local copies of the benchmark datasets, in each hub dataset's exact schema.

The schemas (column names, nesting, split names) are those of the hub datasets' cards:
``abisee/cnn_dailymail`` 3.0.0 (``article``, ``highlights``, ``id``), ``EdinburghNLP/xsum``
(``document``, ``summary``, ``id``), ``wmt/wmt16`` (``translation: {"de": ..., "en": ...}``, one
config per pair), ``stanfordnlp/imdb`` (``text``, ``label``: 0 neg / 1 pos; splits train, test,
unsupervised) and ``allenai/common_gen`` (``concept_set_idx``, ``concepts``: a list of strings,
``target``; its test split has empty targets) and ``li2017dailydialog/daily_dialog``
(``dialog``: a list of utterances, ``act`` and ``emotion``: a label per utterance). They are read
through the same ``datasets.load_dataset`` call as the hub copies
(``dataset_kwargs={"data_files": ...}``).
"""

from __future__ import annotations

import json
import os
import tempfile

from textenvs.lm import quiet_loading

_WORDS = (
    "the council met on monday to discuss a new plan for the river bridge and the school "
    "near the old market where farmers sell fruit every week while the mayor said that"
).split()


def _sentence(i: int, n: int) -> str:
    return " ".join(_WORDS[(i * 7 + j * 3) % len(_WORDS)] for j in range(n)).capitalize() + "."


def _article(i: int, sentences: int) -> str:
    return " ".join(_sentence(i + s, 12) for s in range(sentences))


def _write(folder: str, name: str, rows: list[dict]) -> str:
    path = os.path.join(folder, name)
    with open(path, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    return path


def _rows(kind: str, split: str, n: int) -> list[dict]:
    offset = {"train": 0, "validation": 100, "test": 200, "unsupervised": 300}[split]
    out = []
    for j in range(n):
        i = offset + j
        if kind == "cnn_dailymail":  # long articles: several need truncation on a small model
            out.append(
                {
                    "article": _article(i, 4 + (i % 5) * 12),
                    "highlights": _sentence(i, 6) + "\n" + _sentence(i + 1, 5),
                    "id": f"{i:040x}",
                }
            )
        elif kind == "xsum":
            out.append(
                {
                    "document": _article(i, 3 + i % 4),
                    "summary": _sentence(i, 9),
                    "id": str(30000000 + i),
                }
            )
        elif kind == "wmt16":
            out.append(
                {
                    "translation": {
                        "de": "Der Rat " + _sentence(i, 6),
                        "en": "The council " + _sentence(i, 6),
                    }
                }
            )
        elif kind == "imdb":
            out.append(
                {
                    "text": _article(i, 2 + i % 3) + " I liked it.",
                    "label": (-1 if split == "unsupervised" else i % 2),
                }
            )
        elif kind == "common_gen":  # 3 targets per concept set, as the hub's rows come
            concepts = [_WORDS[(i + k * 5) % len(_WORDS)] for k in range(3)]
            for t in range(3):
                out.append(
                    {
                        "concept_set_idx": i,
                        "concepts": concepts,
                        "target": "" if split == "test" else _sentence(i + t, 7),
                    }
                )
        elif kind == "daily_dialog":  # 2 to 7 utterances, a dialog act and emotion each
            length = 2 + i % 6
            out.append(
                {
                    "dialog": [_sentence(i + u, 5 + u % 3) + " " for u in range(length)],
                    "act": [1 + (i + u) % 4 for u in range(length)],
                    "emotion": [(i + u) % 7 for u in range(length)],
                }
            )
    return out


SPLITS = {
    "cnn_dailymail": ("train", "validation", "test"),
    "xsum": ("train", "validation", "test"),
    "wmt16": ("train", "validation", "test"),
    "imdb": ("train", "test", "unsupervised"),
    "common_gen": ("train", "validation", "test"),
    "daily_dialog": ("train", "validation", "test"),
}
_FOLDER: str | None = None


def hub_fixture(kind: str, n: int = 12) -> dict:
    """``dataset_kwargs`` pointing benchmark ``kind`` at its local fixture (written once per
    process)."""
    global _FOLDER
    if _FOLDER is None:
        _FOLDER = tempfile.mkdtemp(prefix="textenvs-hub-fixtures-")
    from textenvs.tasks.hub import BENCHMARKS, DIALOGUE_BENCHMARKS

    benchmark = {**BENCHMARKS, **DIALOGUE_BENCHMARKS}[kind]
    read = {hub for hub, _, _ in benchmark.splits.values()}
    files = {}
    for split in SPLITS[kind]:  # every hub split is written; the task's own are passed
        path = os.path.join(_FOLDER, f"{kind}-{split}-{n}.jsonl")
        if not os.path.exists(path):
            _write(_FOLDER, os.path.basename(path), _rows(kind, split, n))
        if split in read:
            files[split] = path
    return {"data_files": files}


def _bert_tokenizer(folder: str):
    """A BERT WordPiece tokenizer over a small vocabulary (special tokens, letters, words)."""
    from transformers import BertTokenizerFast

    words = sorted(set(_WORDS) | set("der rat liked it i".split()))
    letters = list("abcdefghijklmnopqrstuvwxyz0123456789.,:;!?'\"-()")
    vocab = [
        "[PAD]",
        "[UNK]",
        "[CLS]",
        "[SEP]",
        "[MASK]",
        *letters,
        *(f"##{c}" for c in letters),
        *words,
    ]
    path = os.path.join(folder, "vocab.txt")
    with open(path, "w", encoding="utf-8") as f:
        f.write("\n".join(dict.fromkeys(vocab)) + "\n")
    return BertTokenizerFast(vocab_file=path, model_max_length=128)


def _save_bert(folder: str, model_class, **config) -> str:
    """A randomly initialised 2-layer BERT (``model_class``) and its tokenizer, saved with
    save_pretrained."""
    import torch
    from transformers import BertConfig

    os.makedirs(folder, exist_ok=True)
    tokenizer = _bert_tokenizer(folder)
    torch.manual_seed(0)
    layout = BertConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=128,
        **config,
    )
    with quiet_loading():  # no "Writing model shards" bar
        model_class(layout).save_pretrained(folder, safe_serialization=True)
        tokenizer.save_pretrained(folder)
    return folder


def random_encoder_dir(folder: str) -> str:
    """A random BERT encoder (a stand-in for BERTScore's roberta-large)."""
    from transformers import BertModel

    return _save_bert(folder, BertModel)


def random_classifier_dir(folder: str) -> str:
    """A random BERT sentiment classifier, labels NEGATIVE / POSITIVE (a stand-in for
    lvwerra/distilbert-imdb)."""
    from transformers import BertForSequenceClassification

    labels = {0: "NEGATIVE", 1: "POSITIVE"}
    return _save_bert(
        folder,
        BertForSequenceClassification,
        id2label=labels,
        label2id={v: k for k, v in labels.items()},
    )
