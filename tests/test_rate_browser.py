"""The rating page in a real browser: headless Chromium (Debian's ``chromium`` and
``chromium-driver``, which ``.ci/run`` installs) driven by Selenium.

Two raters rate ten items at once; the page is killed half-way and started again on the same
database; the database then holds exactly the ratings they gave, the export equals it, a text
with HTML in it showed as text, and ``reward="human"`` paid the rating given on the page.
"""

from __future__ import annotations

import os
import shutil
import threading

import gymnasium as gym
import pytest

import textenvs  # noqa: F401
from textenvs.rate import Item, RatingStore
from textenvs.rate.export import preference_rows, score_rows

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")
selenium = pytest.importorskip("selenium")
pytest.importorskip("starlette")
pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(
        not (CHROMIUM and CHROMEDRIVER),
        reason="needs Debian's chromium and chromium-driver (apt-get install chromium "
        "chromium-driver; .ci/run installs them)",
    ),
]

from selenium import webdriver  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support import expected_conditions as seen  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402

from textenvs.rate.app import RatingServer  # noqa: E402

HOSTILE = '<script>document.title = "pwned"; window.pwned = 1</script><b>not bold</b> & more'


@pytest.fixture
def browser(tmp_path):
    """A factory of headless Chromium sessions, each with its own profile (its own cookies:
    its own rater); all closed at the end."""
    drivers = []

    def start() -> webdriver.Chrome:
        options = webdriver.ChromeOptions()
        options.binary_location = CHROMIUM
        profile = tmp_path / f"profile{len(drivers)}"
        for flag in (
            "--headless=new",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-dev-shm-usage",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",  # this machine's network is closed
            "--disable-component-update",
            "--disable-sync",
            "--window-size=1200,900",
            f"--user-data-dir={profile}",
        ):
            options.add_argument(flag)
        driver = webdriver.Chrome(
            options=options, service=webdriver.ChromeService(executable_path=CHROMEDRIVER)
        )
        driver.set_page_load_timeout(30)
        drivers.append(driver)
        return driver

    yield start
    for driver in drivers:
        driver.quit()


def _wait(driver, *conditions):
    """Wait (30 s at most) until one of ``conditions`` holds: a click's form post and redirect
    finish after ``click()`` returns, later still on a loaded machine."""
    return WebDriverWait(driver, 30).until(seen.any_of(*conditions))


def _click_and_wait(driver, element) -> None:
    """Click, then wait until the page it was on has been replaced."""
    element.click()
    _wait(driver, seen.staleness_of(element))


def _log_in(driver, url: str, name: str) -> None:
    driver.get(url)
    _wait(driver, seen.presence_of_element_located((By.ID, "name")))
    driver.find_element(By.ID, "name").send_keys(name)
    _click_and_wait(driver, driver.find_element(By.ID, "start"))
    rater = _wait(driver, seen.presence_of_element_located((By.ID, "rater")))
    assert rater.text == name


def _rate_one(driver, store: RatingStore, rater: str, answer) -> tuple | None:
    """Answer the item on the page; return (item id, score, choice) as the database should now
    hold it, or None on the "nothing left" page."""
    _wait(
        driver,
        seen.presence_of_element_located((By.ID, "done")),
        seen.presence_of_element_located((By.NAME, "item")),
    )
    if driver.find_elements(By.ID, "done"):
        return None
    item_id = int(driver.find_element(By.NAME, "item").get_attribute("value"))
    item = store.item(item_id)
    assert driver.find_element(By.ID, "prompt").text == item.prompt.strip()
    if item.kind == "score":
        score = answer(item_id)
        assert driver.find_element(By.ID, "text").text == item.texts[0].strip()
        _click_and_wait(driver, driver.find_element(By.ID, f"score-{score}"))
        return item_id, score, None
    shown = [driver.find_element(By.ID, f"text-{k}").text for k in (1, 2)]
    assert sorted(shown) == sorted(t.strip() for t in item.texts)
    _click_and_wait(driver, driver.find_element(By.ID, "choose-1"))  # the first shown, whichever
    return item_id, None, "a" if shown[0] == item.texts[0].strip() else "b"


def test_two_raters_ten_items_a_restart_and_the_export(tmp_path, browser):
    db = tmp_path / "study.sqlite"
    store = RatingStore(db)
    items = [
        Item(f"Source {i}: the council met.", (f"Summary {i}.",), f"Ref {i}") for i in range(5)
    ]
    items += [
        Item(f"Pair {i}: the bridge opened.", (f"Left {i}.", f"Right {i}.")) for i in range(4)
    ]
    items.append(Item("Hostile prompt <i>italic?</i>", (HOSTILE,)))
    store.add(items)
    raters = {"ann": browser(), "bob": browser()}
    expected = {name: [] for name in raters}

    def answer(item_id):
        return 1 + item_id % 5

    server = RatingServer(store, port=0).start()
    try:
        for name, driver in raters.items():
            _log_in(driver, server.url, name)
        for _ in range(5):  # half of the items each, the raters taking turns
            for name, driver in raters.items():
                expected[name].append(_rate_one(driver, store, name, answer))
    finally:
        server.stop()  # the page goes down half-way through

    for name in raters:  # nothing is lost: the ratings are in the file
        got = {(r.item, r.score, r.choice) for r in RatingStore(db).ratings() if r.rater == name}
        assert got == set(expected[name])

    server = RatingServer(RatingStore(db), port=0).start()  # started again on the same file
    try:
        for name, driver in raters.items():
            driver.get(server.url)  # the name is remembered by the browser's cookie
            while (done := _rate_one(driver, store, name, answer)) is not None:
                expected[name].append(done)
            assert driver.find_element(By.ID, "progress").text == "10 of 10 rated"
    finally:
        server.stop()

    ratings = RatingStore(db).ratings()
    assert len(ratings) == 20
    for name in raters:
        got = [(r.item, r.score, r.choice) for r in ratings if r.rater == name]
        assert sorted(got) == sorted(expected[name])
        assert sorted(item for item, _, _ in got) == list(range(1, 11))  # each item once

    prefs = preference_rows(store, from_scores=False)
    pair_ratings = [r for r in ratings if r.choice is not None]
    assert len(prefs) == len(pair_ratings) == 8
    for row, rating in zip(prefs, pair_ratings):
        texts = store.item(rating.item).texts
        chosen = texts[0] if rating.choice == "a" else texts[1]
        assert (row["chosen"], row["rejected"]) == (chosen, (set(texts) - {chosen}).pop())
    scores = score_rows(store)
    assert [(r["item"], r["rater"], r["score"]) for r in scores] == [
        (r.item, r.rater, r.score) for r in ratings if r.score is not None
    ]


def test_a_generated_html_text_shows_as_text(tmp_path, browser):
    store = RatingStore(tmp_path / "html.sqlite")
    store.add([Item("Prompt <b>bold?</b>", (HOSTILE,), "a <i>reference</i>")])
    driver = browser()
    with RatingServer(store, port=0) as server:
        _log_in(driver, server.url, "eve")
        assert driver.find_element(By.ID, "text").text == HOSTILE
        assert driver.find_element(By.ID, "prompt").text == "Prompt <b>bold?</b>"
        assert driver.find_elements(By.TAG_NAME, "b") == []  # no element came from the texts
        assert driver.title != "pwned"
        assert driver.execute_script("return window.pwned === undefined")
        driver.find_element(By.CSS_SELECTOR, "#reference summary").click()
        assert "a <i>reference</i>" in driver.find_element(By.ID, "reference").text


def test_the_token_is_asked_for_then_kept(tmp_path, browser):
    store = RatingStore(tmp_path / "token.sqlite")
    store.add([Item("p", ("t",))])
    driver = browser()
    with RatingServer(store, port=0, token="a-long-token") as server:
        driver.get(server.url.split("?")[0])
        assert driver.find_elements(By.ID, "denied")
        driver.get(server.url)
        assert "token" not in driver.current_url  # the address no longer shows it
        _log_in(driver, driver.current_url, "tom")
        _click_and_wait(driver, driver.find_element(By.ID, "score-5"))
        _wait(driver, seen.presence_of_element_located((By.ID, "done")))
    assert [(r.rater, r.score) for r in store.ratings()] == [("tom", 5)]


def test_human_reward_pays_the_score_given_on_the_page(tmp_path, browser):
    db = tmp_path / "live.sqlite"
    env = gym.make(
        "textenvs/Summarize-v0",
        reward="human",
        reward_kwargs={"db": str(db), "port": 0, "timeout": 120},
        max_steps=3,
    )
    metric = env.unwrapped.shaper.metric
    result = {}

    def episode():
        env.reset(seed=0)
        done = False
        while not done:
            _, reward, terminated, truncated, info = env.step(5)
            done = terminated or truncated
        result.update(reward=reward, text=info["text"], prompt=info["prompt"])

    thread = threading.Thread(target=episode)
    thread.start()
    try:
        driver = browser()
        for _ in range(600):  # the page starts when the episode's text waits
            if metric.server is not None:
                break
            thread.join(timeout=0.1)
        _log_in(driver, metric.server.url, "ann")
        assert driver.find_element(By.ID, "text").text == RatingStore(db).items()[0].texts[0]
        _click_and_wait(driver, driver.find_element(By.ID, "score-2"))
        thread.join(timeout=60)
    finally:
        metric.close()
    assert result["reward"] == 0.25  # (2 - 1) / 4
    assert [(r.rater, r.score) for r in RatingStore(db).ratings()] == [("ann", 2)]


@pytest.mark.skipif(
    not os.environ.get("TEXTENVS_SCREENSHOTS"), reason="writes the docs' screenshots on request"
)
def test_write_the_docs_screenshots(tmp_path, browser):
    """``TEXTENVS_SCREENSHOTS=docs/_static python -m pytest tests/test_rate_browser.py -k
    screenshots``: the pictures in the Human feedback guide (the tiny model's test episodes)."""
    from textenvs.rate.items import items_from_env

    out = os.path.abspath(os.environ["TEXTENVS_SCREENSHOTS"])  # the driver has its own cwd
    store = RatingStore(tmp_path / "shots.sqlite")
    store.add(items_from_env("textenvs/Summarize-v0", 1, seed=0))
    driver = browser()
    with RatingServer(store, port=0) as server:
        _log_in(driver, server.url, "ann")
        driver.save_screenshot(os.path.join(out, "rating_score.png"))
        _click_and_wait(driver, driver.find_element(By.ID, "score-2"))
        store.add(items_from_env("textenvs/Summarize-v0", 2, seed=0, pairs=True)[1:])
        driver.refresh()
        driver.save_screenshot(os.path.join(out, "rating_pair.png"))
