"""The rgb_array frame: the source, the text so far and the reference, each under its heading,
wrapped to the width and legible; the same size on every step."""

from __future__ import annotations

import gymnasium as gym
import numpy as np
import pytest

from tests.conftest import FAST_KWARGS
from textenvs.envs.base import FRAME_SIZE, _wrap, frame_image

BUILTIN = ["textenvs/Summarize-v0", "textenvs/EditSummary-v0", "textenvs/Dialogue-v0"]


def text_rows(frame: np.ndarray) -> int:
    """How many separate bands of ink the frame holds (a line of text is one band)."""
    ink = (frame < 200).any(axis=(1, 2))
    return int(np.sum(ink[1:] & ~ink[:-1]) + ink[0])


@pytest.mark.parametrize("env_id", BUILTIN)
def test_the_frame_shows_source_text_and_reference_on_every_step(env_id):
    env = gym.make(env_id, render_mode="rgb_array", **FAST_KWARGS[env_id]).unwrapped
    env.reset(seed=0)
    for _ in range(3):
        sections = env._render_sections()
        titles = [title for title, _, _ in sections]
        assert titles[0] in ("source", "conversation") and "reference" in titles[-1]
        assert ("edits" if "Edit" in env_id else "turn" if "Dialogue" in env_id else "steps") in (
            titles[1]
        )  # how far the episode is, in its own unit
        if titles[0] == "source":
            assert sections[0][1] == env.sample.source
            assert sections[1][1] == env.text
            assert sections[2][1] == env.sample.references[0]
        frame = env.render()
        assert frame.shape == (FRAME_SIZE[1], FRAME_SIZE[0], 3) and frame.dtype == np.uint8
        assert text_rows(frame) >= 6  # three headings and their bodies, not one run-together line
        _, _, terminated, truncated, _ = env.step(env.action_space.sample())
        if terminated or truncated:
            break


def test_wrapping_keeps_every_word_within_the_width():
    from PIL import ImageFont

    font = ImageFont.load_default(size=15)
    text = "word " * 200 + "x" * 300
    lines = _wrap(font, text, 400)
    assert all(font.getlength(line) <= 400 for line in lines)
    assert "".join(lines).replace(" ", "") == text.replace(" ", "")


def test_a_body_too_long_is_shortened_at_the_side_it_does_not_keep():
    long = "\n".join(f"line {i}" for i in range(100))
    ends = frame_image([("conversation", long, "end"), ("reference", "short", "start")])
    starts = frame_image([("source", long, "start"), ("reference", "short", "start")])
    assert ends.shape == starts.shape == (FRAME_SIZE[1], FRAME_SIZE[0], 3)
    assert not np.array_equal(ends, starts)  # the last lines against the first ones
    assert text_rows(ends) == text_rows(starts) >= 15


def test_before_reset_the_frame_says_so():
    env = gym.make("textenvs/Summarize-v0", render_mode="rgb_array").unwrapped
    frame = env.render()
    assert frame.shape == (FRAME_SIZE[1], FRAME_SIZE[0], 3) and text_rows(frame) == 2
