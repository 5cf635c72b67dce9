"""The built-in tasks, generated here from fixed seeds: identical on every machine, no download.

* ``summarize``: news-style articles (3-5 sentences, one main event and distractor details) to
  a headline that is a deterministic compression of the main event.
* ``translate``: sentences of an English-like source language to "Veltic", a rule-based target
  language with its own lexicon, postpositions, noun-adjective order and verb-final clauses.

Because the reference is a deterministic function of the source, a perfect policy scores 1.0 on
every metric, while the shipped tiny LM (trained mostly on unpaired text) scores far lower.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np

from textenvs.tasks.base import SPLITS, Sample, Task

SPLIT_SIZES = {"train": 2000, "validation": 200, "test": 200}
_TASK_SEED = {"summarize": 20261122, "translate": 20261123}

# ---------------------------------------------------------------------------------------------
# Summarization: articles to headlines
# ---------------------------------------------------------------------------------------------

_TOWNS = [
    "Norwick",
    "Halden",
    "Brisport",
    "Calloway",
    "Dunmore",
    "Eastvale",
    "Fenwick",
    "Glenrock",
    "Harlow",
    "Ivybridge",
    "Kestrel",
    "Lakemoor",
    "Marston",
    "Oakhurst",
    "Pemberton",
    "Redcliff",
    "Stanmore",
    "Thornbury",
    "Westfield",
    "Yarrow",
]
# (actor as written in the article, short actor for the headline)
_ACTORS = [
    ("the city council", "council"),
    ("the local school board", "school board"),
    ("the regional hospital", "hospital"),
    ("a group of farmers", "farmers"),
    ("the police department", "police"),
    ("the town mayor", "mayor"),
    ("a team of scientists", "scientists"),
    ("the football club", "football club"),
    ("the public library", "library"),
    ("a local bakery", "bakery"),
    ("the transport authority", "transport authority"),
    ("a group of students", "students"),
    ("the water company", "water company"),
    ("the state university", "university"),
    ("a charity", "charity"),
    ("the fire service", "fire service"),
]
# (past tense, headline present tense)
_VERBS = [
    ("approved", "approves"),
    ("rejected", "rejects"),
    ("announced", "announces"),
    ("opened", "opens"),
    ("closed", "closes"),
    ("delayed", "delays"),
    ("launched", "launches"),
    ("funded", "funds"),
    ("cancelled", "cancels"),
    ("expanded", "expands"),
    ("criticised", "criticises"),
    ("completed", "completes"),
]
# (article object phrase, headline object)
_OBJECTS = [
    ("a new plan for local parks", "park plan"),
    ("a bridge over the river", "river bridge"),
    ("a program for young readers", "reading program"),
    ("a new bus route", "bus route"),
    ("a study of air quality", "air study"),
    ("a summer festival", "summer festival"),
    ("a clinic for older patients", "new clinic"),
    ("a project to repair roads", "road project"),
    ("a market for farm produce", "farm market"),
    ("a fund for small shops", "shop fund"),
    ("a plan to plant trees", "tree plan"),
    ("a sports center", "sports center"),
    ("a flood defence wall", "flood wall"),
    ("a recycling scheme", "recycling scheme"),
]
_DAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"]
_DETAILS = [
    "Officials said the decision followed months of debate.",
    "The project is expected to cost {n} million dollars.",
    "About {n} hundred residents attended the meeting.",
    "Critics said the plan was rushed.",
    "Supporters called it a good day for the town.",
    "Work is due to start in {month}.",
    "A spokesperson declined to give further details.",
    "The vote passed by {n} votes to {m}.",
    "Local businesses welcomed the news.",
    "A similar plan failed {n} years ago.",
]
_MONTHS = ["January", "March", "April", "June", "August", "October", "December"]


@dataclass(frozen=True)
class NewsEvent:
    """One drawn article of the summarization domain and the facts behind it."""

    town: str
    actor: str  # as written in the article ("the city council")
    actor_short: str  # as in a headline ("council")
    past: str
    present: str
    obj: str
    obj_short: str
    day: str
    article: str

    @property
    def headline(self) -> str:
        return f"{self.town} {self.actor_short} {self.present} {self.obj_short}"


def news_event(rng: np.random.Generator, max_details: int = 4) -> NewsEvent:
    """An article drawn from ``rng``: its lead sentence (who did what where, and when) and 2 to
    ``max_details`` distractor details; the lead comes first 70% of the time."""
    town = _TOWNS[rng.integers(len(_TOWNS))]
    actor, actor_short = _ACTORS[rng.integers(len(_ACTORS))]
    past, present = _VERBS[rng.integers(len(_VERBS))]
    obj, obj_short = _OBJECTS[rng.integers(len(_OBJECTS))]
    day = _DAYS[rng.integers(len(_DAYS))]
    lead = f"On {day}, {actor} in {town} {past} {obj}."
    n_details = int(rng.integers(2, max_details + 1))
    details = []
    for i in rng.choice(len(_DETAILS), size=n_details, replace=False):
        details.append(
            _DETAILS[i].format(
                n=int(rng.integers(2, 10)),
                m=int(rng.integers(0, 2)),
                month=_MONTHS[rng.integers(len(_MONTHS))],
            )
        )
    # The lead is usually first, as in news writing, but not always: the headline must be found.
    position = 0 if rng.random() < 0.7 else 1
    sentences = details[:position] + [lead] + details[position:]
    article = " ".join(sentences)
    return NewsEvent(town, actor, actor_short, past, present, obj, obj_short, day, article)


def _summarize_sample(rng: np.random.Generator) -> Sample:
    event = news_event(rng)
    return Sample(event.article, (event.headline,))


# ---------------------------------------------------------------------------------------------
# Translation: English-like source to Veltic
# ---------------------------------------------------------------------------------------------

# Lexicon: English word -> Veltic word. Veltic order: [PP: det noun adj prep] [subject] [object]
# verb [adverb]; adjectives follow nouns; plural nouns take the particle "mi"; past verbs take
# the suffix "-ta".
_NOUNS = {
    "farmer": "kolo",
    "bird": "piru",
    "dog": "vasko",
    "cat": "mirra",
    "child": "tanu",
    "teacher": "seldo",
    "river": "duna",
    "house": "kasa",
    "tree": "elmo",
    "horse": "kavo",
    "fish": "nesu",
    "king": "rego",
    "woman": "fema",
    "man": "viro",
    "boat": "navo",
    "book": "libro",
    "garden": "orto",
    "road": "vio",
    "mountain": "monto",
    "village": "pago",
}
_PLURALS = {
    "farmer": "farmers",
    "bird": "birds",
    "dog": "dogs",
    "cat": "cats",
    "child": "children",
    "teacher": "teachers",
    "river": "rivers",
    "house": "houses",
    "tree": "trees",
    "horse": "horses",
    "fish": "fish",
    "king": "kings",
    "woman": "women",
    "man": "men",
    "boat": "boats",
    "book": "books",
    "garden": "gardens",
    "road": "roads",
    "mountain": "mountains",
    "village": "villages",
}
_ADJECTIVES = {
    "old": "vetu",
    "young": "juna",
    "red": "ruba",
    "small": "pika",
    "big": "granda",
    "happy": "gaja",
    "quiet": "kvieta",
    "dark": "skura",
    "green": "verda",
    "tall": "alta",
}
# present (3rd singular / plural), past -> Veltic stem
_VERBS_T = {
    "see": ("sees", "see", "saw", "vid"),
    "follow": ("follows", "follow", "followed", "sekv"),
    "help": ("helps", "help", "helped", "help"),
    "find": ("finds", "find", "found", "trov"),
    "carry": ("carries", "carry", "carried", "port"),
    "watch": ("watches", "watch", "watched", "rigard"),
    "call": ("calls", "call", "called", "vok"),
    "visit": ("visits", "visit", "visited", "vizit"),
    "paint": ("paints", "paint", "painted", "pentr"),
    "love": ("loves", "love", "loved", "am"),
}
_DETS = {"the": "la", "a": "un", "every": "cia", "no": "neni"}
_PREPS = {"near": "pres", "behind": "malan", "under": "sub", "across": "trans", "beside": "apud"}
_ADVERBS = {
    "slowly": "lante",
    "today": "hodiau",
    "again": "denove",
    "quietly": "silente",
    "often": "ofte",
}


def _noun_phrase(rng: np.random.Generator) -> tuple[str, str, bool]:
    noun = list(_NOUNS)[rng.integers(len(_NOUNS))]
    plural = bool(rng.random() < 0.3)
    det = "the" if plural else list(_DETS)[rng.integers(len(_DETS))]
    adj = list(_ADJECTIVES)[rng.integers(len(_ADJECTIVES))] if rng.random() < 0.5 else None
    en = [det] + ([adj] if adj else []) + [_PLURALS[noun] if plural else noun]
    ve = (
        [_DETS[det], _NOUNS[noun]]
        + (["mi"] if plural else [])
        + ([_ADJECTIVES[adj]] if adj else [])
    )
    return " ".join(en), " ".join(ve), plural


def _translate_sample(rng: np.random.Generator) -> Sample:
    subj_en, subj_ve, subj_plural = _noun_phrase(rng)
    obj_en, obj_ve, _ = _noun_phrase(rng)
    third_sg, plural_form, past, stem = _VERBS_T[list(_VERBS_T)[rng.integers(len(_VERBS_T))]]
    is_past = bool(rng.random() < 0.4)
    verb_en = past if is_past else (plural_form if subj_plural else third_sg)
    verb_ve = stem + ("ta" if is_past else "as")
    en = [subj_en, verb_en, obj_en]
    ve_front: list[str] = []
    if rng.random() < 0.5:
        prep = list(_PREPS)[rng.integers(len(_PREPS))]
        pp_en, pp_ve, _ = _noun_phrase(rng)
        en += [prep, pp_en]
        ve_front = [pp_ve, _PREPS[prep]]
    ve = ve_front + [subj_ve, obj_ve, verb_ve]
    if rng.random() < 0.3:
        adv = list(_ADVERBS)[rng.integers(len(_ADVERBS))]
        en.append(adv)
        ve.append(_ADVERBS[adv])
    source = " ".join(en)
    target = " ".join(ve)
    return Sample(source[0].upper() + source[1:] + ".", (target[0].upper() + target[1:] + ".",))


_GENERATORS = {"summarize": _summarize_sample, "translate": _translate_sample}
_TEMPLATES = {
    "summarize": "Article: {source}\nHeadline:",
    "translate": "English: {source}\nVeltic:",
}
_DEFAULT_REWARDS = {"summarize": "rougeL", "translate": "bleu"}
BUILTIN_TASKS = tuple(_GENERATORS)


def generate_samples(task: str, n: int, seed: int, exclude: Iterable[str] = ()) -> list[Sample]:
    """``n`` distinct samples of a built-in task from ``seed``, skipping sources in ``exclude``."""
    if task not in _GENERATORS:
        raise ValueError(f"Unknown built-in task {task!r}; choose one of {list(_GENERATORS)}.")
    rng = np.random.default_rng(seed)
    seen = set(exclude)
    out: list[Sample] = []
    for _ in range(200 * n + 1000):
        s = _GENERATORS[task](rng)
        if s.source not in seen:
            seen.add(s.source)
            out.append(s)
            if len(out) == n:
                return out
    raise RuntimeError(f"Could not draw {n} distinct samples for task {task!r}.")


@functools.cache
def builtin_task(name: str) -> Task:
    """The built-in task ``name`` with fixed, non-overlapping train / validation / test splits."""
    if name not in _GENERATORS:
        raise ValueError(f"Unknown built-in task {name!r}; choose one of {list(_GENERATORS)}.")
    pool = generate_samples(name, sum(SPLIT_SIZES.values()), _TASK_SEED[name])
    splits, start = {}, 0
    for split in SPLITS:  # one pool of distinct sources, cut in three: the splits cannot overlap
        splits[split] = tuple(pool[start : start + SPLIT_SIZES[split]])
        start += SPLIT_SIZES[split]
    return Task(name, splits, _TEMPLATES[name], _DEFAULT_REWARDS[name])


def unpaired_texts(name: str, n: int, seed: int) -> tuple[list[str], list[str]]:
    """Sources and references drawn independently (not as pairs), for LM pretraining.

    The samples exclude every source of the built-in splits, so pretraining never sees a test pair.
    """
    used = {s.source for split in builtin_task(name).splits.values() for s in split}
    a = generate_samples(name, n, seed, exclude=used)
    b = generate_samples(name, n, seed + 1, exclude=used)
    return [s.source for s in a], [s.references[0] for s in b]
