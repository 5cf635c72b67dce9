"""The C library's memory and process controls (textenvs.system), on this glibc machine."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

from textenvs import system

PROBE = textwrap.dedent(
    """
    import sys, torch
    from textenvs import system
    def rss():
        line = [l for l in open("/proc/self/status") if l.startswith("VmRSS")][0]
        return int(line.split()[1]) // 1024
    if sys.argv[1] == "pinned":
        assert system.return_large_frees_at_once()
    base = rss()
    for _ in range(3):  # large blocks freed, then as many of the same size again
        blocks = [torch.ones(4 * 2**20) for _ in range(4)]  # 4 x 16 MB, every page touched
        del blocks
    print(rss() - base)
    """
)


@pytest.mark.skipif(system.libc() is None, reason="needs the C library")
def test_a_pinned_mmap_threshold_gives_freed_blocks_back_at_once():
    """Without it, glibc raises its threshold to the first freed block's size and serves the
    next ones from its heap, where they stay resident once freed (97 MB of 64 here); with it,
    nothing stays."""
    kept = {
        mode: int(subprocess.check_output([sys.executable, "-c", PROBE, mode], text=True))
        for mode in ("default", "pinned")
    }
    assert kept["default"] > 48 and kept["pinned"] < 16, kept


def test_the_helpers_say_whether_they_acted():
    assert system.release_freed_memory() is (system.libc() is not None)
    assert isinstance(system.return_large_frees_at_once(1 << 30), bool)
