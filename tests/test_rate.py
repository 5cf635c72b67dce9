"""Human ratings without a browser: the database, the items, the export, the page over
Starlette's test client, ``reward="human"`` with a rater thread, and the reward model."""

from __future__ import annotations

import json
import math
import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time

import gymnasium as gym
import numpy as np
import pytest
import torch

import textenvs  # noqa: F401  (registers the ids)
from tests.conftest import ENCODER_DIR
from textenvs.rate import Item, RatingStore
from textenvs.rate.export import preference_rows, score_rows, write_jsonl
from textenvs.rate.items import items_from_env, items_from_jsonl

pytest.importorskip("starlette")
from starlette.testclient import TestClient  # noqa: E402

from textenvs.rate.app import RatingServer, access_token, rating_app  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture
def store(tmp_path):
    return RatingStore(tmp_path / "ratings.sqlite")


def test_store_keeps_one_rating_per_rater_and_item(store):
    a, b = store.add([Item("p", ("one",)), Item("p", ("x", "y"))])
    assert store.add([Item("p", ("one",))]) == [a]  # the same item is added once
    assert store.record(a, "ann", score=4)
    assert not store.record(a, "ann", score=1)  # a second rating changes nothing
    assert store.record(b, "ann", choice="b")
    assert [(r.item, r.score, r.choice) for r in store.ratings()] == [(a, 4, None), (b, None, "b")]
    assert store.scores([a, b, a]) == {a: [4], b: []}  # one query; a pair item has no score
    assert store.next_item("ann") is None
    assert store.next_item("bob").id in (a, b)
    assert store.next_item("bob", ratings_per_item=1) is None  # each item has its one rating
    with pytest.raises(ValueError, match="score 1-5"):
        store.record(a, "bob", score=6)
    with pytest.raises(ValueError, match="choice in"):
        store.record(b, "bob", choice="left")
    with pytest.raises(ValueError, match="one text .* or two"):
        Item("p", ("a", "b", "c"))
    with pytest.raises(ValueError, match="needs a name"):
        store.record(a, "  ", score=3)
    with pytest.raises(KeyError, match="No item 99"):
        store.record(99, "bob", score=3)


def test_the_database_refuses_a_second_rating_itself(store):
    """The one-rating rule is the table's, so no writer (another process, an old version) can
    break it."""
    (item,) = store.add([Item("p", ("t",))])
    store.record(item, "ann", score=3)
    db = sqlite3.connect(store.path)
    with pytest.raises(sqlite3.IntegrityError):
        db.execute(
            "INSERT INTO ratings (item, rater, score, created) VALUES (?, 'ann', 5, 0)", (item,)
        )


def test_each_rater_has_a_fixed_order_and_live_items_come_first(store):
    ids = store.add([Item(f"p{i}", (f"t{i}",)) for i in range(8)])
    orders = {}
    for rater in ("ann", "bob"):
        seen = []
        while (item := store.next_item(rater)) is not None:
            seen.append(item.id)
            store.record(item.id, rater, score=3)
        orders[rater] = seen
        assert sorted(seen) == ids
    assert orders["ann"] != orders["bob"]  # 1 chance in 8! that two orders match by luck
    assert store.waiting() == 0 and store.summary()["live_items_waiting"] == 0
    (live,) = store.add([Item("live", ("now",))], live=True)
    assert store.waiting() == 1 and store.summary()["live_items_waiting"] == 1
    assert store.next_item("ann").id == live
    store.record(live, "ann", score=4)
    assert store.waiting() == 0


def test_a_file_that_is_not_a_database_is_refused(tmp_path):
    bad = tmp_path / "notes.sqlite"
    bad.write_text("not a database, but someone's notes\n" * 100)
    with pytest.raises(ValueError, match="not a ratings database"):
        RatingStore(bad)
    assert bad.read_text().startswith("not a database")
    with pytest.raises(ValueError, match="folder"):
        RatingStore(tmp_path)


def test_items_from_jsonl_and_their_errors(tmp_path):
    path = tmp_path / "gen.jsonl"
    rows = [
        {"prompt": "Q1", "text": "A1", "reference": "R1", "model": "base"},
        {"prompt": "Q2", "texts": ["A2", "B2"]},
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows) + "\n")
    first, second = items_from_jsonl(path)
    assert (first.prompt, first.texts, first.reference, first.kind) == (
        "Q1",
        ("A1",),
        "R1",
        "score",
    )
    assert first.origin == {"model": "base", "file": "gen.jsonl", "line": 1}
    assert second.texts == ("A2", "B2") and second.kind == "pair"
    path.write_text('{"prompt": "Q", "text": "A"}\n{"prompt": "Q", "texts": ["a", "b", "c"]}\n')
    with pytest.raises(ValueError, match="line 2: .*one text"):
        items_from_jsonl(path)
    path.write_text('{"prompt": "Q"}\n')
    with pytest.raises(ValueError, match='line 1 needs "text"'):
        items_from_jsonl(path)


def test_items_from_env_pair_two_configurations_on_the_same_prompts():
    items = items_from_env(
        "textenvs/Summarize-v0", 3, policy="greedy", versus_kwargs={"max_steps": 2}
    )
    env = gym.make("textenvs/Summarize-v0", split="test")
    for index, item in enumerate(items):
        _, info = env.reset(options={"index": index})
        assert item.prompt == info["prompt"] and item.reference == info["reference"]
        assert item.kind == "pair"
        assert len(item.texts[1]) <= len(item.texts[0])  # 2 tokens at most against 20
    sampled = items_from_env("textenvs/Summarize-v0", 4, seed=1)
    assert sampled == items_from_env("textenvs/Summarize-v0", 4, seed=1)  # seeded
    with pytest.raises(ValueError, match="editing env"):
        items_from_env("textenvs/Edit-v0", 2)
    with pytest.raises(ValueError, match="greedy decoding would repeat"):
        items_from_env("textenvs/Summarize-v0", 2, policy="greedy", pairs=True)


def test_export_follows_the_ratings(store, tmp_path):
    pair, s1, s2, s3 = store.add(
        [
            Item("P", ("left", "right")),
            Item("Q", ("good",)),
            Item("Q", ("bad",)),
            Item("R", ("alone",)),
        ]
    )
    store.record(pair, "ann", choice="b")
    store.record(pair, "bob", choice="tie")  # a tie gives no row
    store.record(s1, "ann", score=5)
    store.record(s2, "ann", score=2)
    store.record(s2, "bob", score=3)
    store.record(s3, "ann", score=4)
    assert preference_rows(store) == [
        {"prompt": "P", "chosen": "right", "rejected": "left"},
        {"prompt": "Q", "chosen": "good", "rejected": "bad"},  # 5 against a mean of 2.5
    ]
    assert preference_rows(store, from_scores=False) == preference_rows(store)[:1]
    scores = score_rows(store)
    assert [(r["rater"], r["text"], r["score"]) for r in scores] == [
        ("ann", "good", 5),
        ("ann", "bad", 2),
        ("bob", "bad", 3),
        ("ann", "alone", 4),
    ]
    out = write_jsonl(scores, tmp_path / "scores.jsonl")
    assert [json.loads(line) for line in out.read_text().splitlines()] == scores
    with pytest.raises(ValueError, match="exists; nothing was written"):
        write_jsonl([], out)
    assert len(out.read_text().splitlines()) == 4
    # a user's file named like a work file beside the target is never touched
    beside = tmp_path / "again.jsonl.partial"
    beside.write_text("mine\n")
    write_jsonl(scores, tmp_path / "again.jsonl")
    assert beside.read_text() == "mine\n"
    assert sorted(p.name for p in tmp_path.iterdir() if "again" in p.name) == [
        "again.jsonl",
        "again.jsonl.partial",
    ]


def test_the_page_records_answers_and_shows_html_as_text(store):
    hostile = '<script>document.title="pwned"</script><b>bold</b>'
    score_item, pair_item = store.add([Item("a prompt", (hostile,), "ref"), Item("p", ("x", "y"))])
    client = TestClient(rating_app(store))
    page = client.get("/")
    assert page.status_code == 200 and 'name="rater"' in page.text
    page = client.post("/start", data={"rater": "ann"})
    for _ in range(2):
        if 'id="score-4"' in page.text:
            assert "&lt;script&gt;" in page.text and "<script>" not in page.text
            assert "Content-Security-Policy" in page.headers
            assert "script-src" not in page.headers["Content-Security-Policy"]  # none allowed
            page = client.post("/rate", data={"item": score_item, "score": "4"})
        else:
            page = client.post("/rate", data={"item": pair_item, "choice": "a"})
    assert 'id="done"' in page.text
    assert {(r.item, r.score, r.choice) for r in store.ratings()} == {
        (score_item, 4, None),
        (pair_item, None, "a"),
    }
    again = client.post("/rate", data={"item": score_item, "score": "1"})  # a resubmitted form
    assert again.status_code == 200 and store.ratings(score_item)[0].score == 4
    for bad in ({"item": score_item, "score": "9"}, {"item": pair_item, "choice": "left"}):
        refused = client.post("/rate", data=bad)
        assert refused.status_code == 400 and "Not recorded" in refused.text
    assert len(store.ratings()) == 2


@pytest.mark.parametrize("name", ["李雷", "Zoë Müller", 'a;b "c" = d'])
def test_a_rater_may_have_any_name(store, name):
    (item,) = store.add([Item("p", ("t",))])
    client = TestClient(rating_app(store))
    page = client.post("/start", data={"rater": name})
    assert page.status_code == 200 and 'id="score-3"' in page.text
    client.post("/rate", data={"item": item, "score": "3"})
    assert [(r.rater, r.score) for r in store.ratings()] == [(name, 3)]


def test_the_token_guards_every_page(store):
    client = TestClient(rating_app(store, token="s3cret-token"))
    assert client.get("/").status_code == 403
    assert client.get("/?token=wrong-token").status_code == 403
    assert client.post("/rate", data={"item": 1, "score": 3}).status_code == 403
    entered = client.get("/?token=s3cret-token")  # then a cookie carries it
    assert entered.status_code == 200 and "token" not in str(entered.url)
    assert client.get("/").status_code == 200


def test_off_loopback_a_token_is_always_required():
    assert access_token("127.0.0.1", None) is None
    assert access_token("localhost", None) is None
    assert len(access_token("0.0.0.0", None)) >= 16  # made up
    assert access_token("0.0.0.0", "given-token") == "given-token"
    with pytest.raises(ValueError, match="at least 8"):
        access_token("0.0.0.0", "short")


def test_a_taken_port_is_refused_clearly(store):
    with RatingServer(store, port=0) as first:
        with pytest.raises(OSError, match="another rating page"):
            RatingServer(store, port=first.port)


def _rate_in_background(db, score: int, stop: threading.Event) -> threading.Thread:
    def rate():
        store = RatingStore(db)
        while not stop.is_set():
            item = store.next_item("rater-thread")
            if item is None:
                time.sleep(0.05)
            else:
                store.record(item.id, "rater-thread", score=score)

    thread = threading.Thread(target=rate, daemon=True)
    thread.start()
    return thread


def test_human_reward_pays_the_rating_at_the_end(tmp_path):
    db = tmp_path / "live.sqlite"
    stop = threading.Event()
    _rate_in_background(db, 4, stop)
    env = gym.make(
        "textenvs/Summarize-v0",
        reward="human",
        reward_kwargs={"db": str(db), "serve": False, "timeout": 60},
        max_steps=3,
    )
    try:
        env.reset(seed=0)
        rewards, done = [], False
        while not done:
            _, reward, terminated, truncated, info = env.step(int(env.action_space.sample()) or 5)
            rewards.append(reward)
            done = terminated or truncated
    finally:
        stop.set()
    assert rewards[:-1] == [0.0] * (len(rewards) - 1) and rewards[-1] == 0.75  # (4 - 1) / 4
    assert info["metric_name"] == "human"
    (item,) = RatingStore(db).items()
    assert item.texts == (info["text"],) and item.prompt == info["prompt"]


def test_human_reward_in_a_batched_vector_env_asks_once_per_step(tmp_path):
    db = tmp_path / "live.sqlite"
    stop = threading.Event()
    _rate_in_background(db, 5, stop)
    kwargs = {"db": str(db), "serve": False, "timeout": 60}
    envs = gym.make_vec(
        "textenvs/Summarize-v0", num_envs=3, reward="human", reward_kwargs=kwargs, max_steps=2
    )
    try:
        envs.reset(seed=0)
        _, first, *_ = envs.step(np.array([5, 6, 7]))
        _, last, *_ = envs.step(np.array([5, 6, 7]))
    finally:
        stop.set()
        envs.close()
    assert first.tolist() == [0.0] * 3
    nonempty = [len(t.strip()) > 0 for t in [i.texts[0] for i in RatingStore(db).items()]]
    assert all(nonempty) and last.tolist() == [1.0] * 3


def test_human_reward_timeout_policy_and_refusals(tmp_path):
    from textenvs.rate.human import HumanRating

    db = tmp_path / "none.sqlite"
    waiting = HumanRating(db=db, serve=False, timeout=0.2, poll=0.05)
    with pytest.raises(TimeoutError, match="1 of 1 texts had no rating.*shown first"):
        waiting.score_batch(["a text"], [("ref",)], ["a prompt"])
    lenient = HumanRating(db=db, serve=False, timeout=0.2, on_timeout="default", default=0.25)
    RatingStore(db).record(1, "ann", score=2)  # the text rated since, once
    assert lenient.score_batch(["a text", "new"], [("r",), ("r",)], ["a prompt", "p"]) == [
        0.25,  # (2 - 1) / 4
        0.25,  # not rated in time: the default
    ]
    with pytest.raises(ValueError, match="needs reward_kwargs=\\{'db'"):
        HumanRating()
    for bad, says in ((dict(poll=0), "poll must be"), (dict(timeout=-1), "timeout must be")):
        with pytest.raises(ValueError, match=says):
            HumanRating(db=db, serve=False, **bad)
    with pytest.raises(ValueError, match="scored once per episode"):
        gym.make("textenvs/Summarize-v0", reward="human", reward_kwargs={"db": str(db)}, dense=True)
    with pytest.raises(ValueError, match="scored once per episode"):
        gym.make(
            "textenvs/Summarize-v0",
            reward={"human": 0.5, "rougeL": 0.5},
            reward_kwargs={"human": {"db": str(db)}},
            dense=True,
        )


def test_a_reward_model_learns_the_exported_preferences(store, tmp_path):
    """Ratings -> export -> a reward model (a random small encoder, a few steps) -> a classifier
    reward that scores the preferred kind of text higher."""
    from agents.reward_model import main
    from textenvs.model_rewards import shared_metric

    # the random encoder's small vocabulary reads most words as [UNK]: what tells the preferred
    # texts apart here is their length, which the model has to learn
    good = ["the council met on monday", "the bridge opened in june", "a new vote passed today"]
    bad = ["zx qq", "kk", "qq zz"]
    ids = store.add([Item(f"Question {i}:", (good[i % 3], bad[i % 3])) for i in range(24)])
    for i in ids:
        store.record(i, "ann", choice="a")
    prefs = write_jsonl(preference_rows(store), tmp_path / "prefs.jsonl")
    folder = tmp_path / "rm"
    main(
        [
            "--preferences", str(prefs), "--model", ENCODER_DIR, "--save", str(folder),
            "--epochs", "6", "--learning-rate", "1e-2", "--batch-size", "8",
        ]
    )  # fmt: skip
    report = json.loads((folder / "reward_model.json").read_text())
    assert report["pairs_trained"] + report["pairs_held_out"] == 24
    assert report["epoch_losses"][-1] < report["epoch_losses"][0]
    assert (folder / "model.safetensors").exists()
    reward = shared_metric(
        "classifier",
        {"model": str(folder), "label": "reward", "output": "logit", "input": "prompt+text"},
    )
    assert all(
        reward(g, (), "Question 99:") > reward(b, (), "Question 99:") for g, b in zip(good, bad)
    )
    with pytest.raises(ValueError, match="one output .* 'logit'"):
        shared_metric("classifier", {"model": str(folder), "label": "reward"})
    # trained on the input the classifier reward reads: the same score, truncation included
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from agents.reward_model import rewards

    net = AutoModelForSequenceClassification.from_pretrained(folder).eval()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    short = shared_metric(
        "classifier",
        {"model": str(folder), "label": "reward", "output": "logit", "input": "prompt+text",
         "max_length": 12},
    )  # fmt: skip
    long_text = " ".join(good * 4)
    with torch.no_grad():
        direct = rewards(net, tokenizer, ["Question 99: " * 3], [long_text], 12)
    assert short(long_text, (), "Question 99: " * 3) == pytest.approx(float(direct[0]), abs=1e-5)


def _command(*argv: str, **kwargs) -> subprocess.Popen:
    env = {**os.environ, "TEXTENVS_TRACEBACK": "0", "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen(
        [sys.executable, "-m", *argv],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        **kwargs,
    )


def test_the_command_adds_exports_and_reports(tmp_path, capsys):
    from textenvs.rate.__main__ import main

    db, gen = tmp_path / "study.sqlite", tmp_path / "gen.jsonl"
    gen.write_text('{"prompt": "Q", "texts": ["a", "b"]}\n{"prompt": "Q", "text": "c"}\n')
    main(["add", "--db", str(db), "--jsonl", str(gen)])
    main(["add", "--db", str(db), "--jsonl", str(gen)])
    assert "0 new items" in capsys.readouterr().out.splitlines()[-1]
    store = RatingStore(db)
    store.record(1, "ann", choice="a")
    store.record(2, "ann", score=5)
    prefs, scores = tmp_path / "prefs.jsonl", tmp_path / "scores.jsonl"
    main(["export", "--db", str(db), "--preferences", str(prefs), "--scores", str(scores)])
    assert [json.loads(x) for x in prefs.read_text().splitlines()] == preference_rows(store)
    assert [json.loads(x) for x in scores.read_text().splitlines()] == score_rows(store)
    main(["status", "--db", str(db)])
    assert json.loads(capsys.readouterr().out.split("\n", 2)[-1])["ratings"] == 2


@pytest.mark.parametrize(
    ("argv", "says"),
    [
        (("add", "--db", "{db}"), "add needs --jsonl FILE or --env ID"),
        (("export", "--db", "{db}"), "export needs --preferences"),
        (("add", "--db", "{db}", "--jsonl", "/nonexistent/gen.jsonl"), "No such file"),
        (("add", "--db", "{db}", "--env", "textenvs/Edit-v0", "--n", "2"), "editing env"),
    ],
)
def test_the_command_reports_a_user_error_in_one_line(tmp_path, argv, says):
    run = _command("textenvs.rate", *(a.format(db=tmp_path / "x.sqlite") for a in argv))
    out, err = run.communicate(timeout=120)
    assert run.returncode == 2 and err.startswith("error: ") and says in err
    assert len(err.strip().splitlines()) == 1


def test_the_reward_model_command_reports_a_user_error(tmp_path):
    bad = tmp_path / "prefs.jsonl"
    bad.write_text('{"chosen": "a"}\n')
    run = _command(
        "agents.reward_model", "--preferences", str(bad), "--model", ENCODER_DIR, "--no-save"
    )
    _, err = run.communicate(timeout=120)
    assert run.returncode == 2 and "line 1: a preference row is" in err


def test_a_killed_page_loses_no_rating(tmp_path):
    """``python -m textenvs.rate serve`` killed with SIGKILL between two answers, then started
    again: every answer given before is in the database, and the rater goes on where they were."""
    import httpx

    db = tmp_path / "study.sqlite"
    RatingStore(db).add([Item(f"Q{i}", (f"A{i}",)) for i in range(3)])

    def serve() -> tuple[subprocess.Popen, str]:
        page = _command("textenvs.rate", "serve", "--db", str(db), "--port", "0")
        line = page.stdout.readline()
        assert line.startswith("Rating page: http://127.0.0.1:"), line + page.stderr.read()
        return page, line.split()[2]

    page, url = serve()
    client = httpx.Client(follow_redirects=True, timeout=30)
    try:
        client.post(url + "start", data={"rater": "ann"})
        for score in (2, 4):
            item = RatingStore(db).next_item("ann")
            assert client.post(url + "rate", data={"item": item.id, "score": score}).is_success
        page.send_signal(signal.SIGKILL)
        page.wait(timeout=30)
        assert sorted(r.score for r in RatingStore(db).ratings()) == [2, 4]
        page, url = serve()
        last = RatingStore(db).next_item("ann")
        form = client.get(url + "rate").text
        assert f'name="item" value="{last.id}"' in form  # where the rater stopped
        done = client.post(url + "rate", data={"item": last.id, "score": 5})
        assert 'id="done"' in done.text
    finally:
        page.kill()
        page.wait(timeout=30)
        client.close()
    assert sorted(r.score for r in RatingStore(db).ratings()) == [2, 4, 5]


def test_token_ppo_learns_from_human_scores_given_as_they_come(tmp_path):
    """RL from human scores on the tiny model: every rollout's finished texts wait on the rating
    page's database, a rater (a thread here) scores them, and the trainer's update reads those
    scores as the episodes' rewards."""
    from agents.token_ppo import TokenPPO, TokenPPOConfig

    db = tmp_path / "rlhf.sqlite"
    stop = threading.Event()
    _rate_in_background(db, 3, stop)
    config = TokenPPOConfig(
        num_envs=4,
        max_new_tokens=3,
        total_episodes=8,
        minibatch_size=4,
        num_epochs=1,
        seed=0,
        env_kwargs={"reward": "human", "reward_kwargs": {"db": str(db), "serve": False}},
    )
    try:
        history = TokenPPO(config).train(progress=False)
    finally:
        stop.set()
    ratings = RatingStore(db).ratings()
    assert len(ratings) >= 1 and {r.score for r in ratings} == {3}
    # every rated text pays (3 - 1) / 4 = 0.5; an empty one pays 0 without a rating
    assert len(history) == 2 and all(0 < h["metric"] <= 0.5 for h in history)
    assert all(math.isfinite(h["policy_loss"]) for h in history)
