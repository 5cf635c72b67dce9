"""The C library's memory and process controls (textenvs.system), on this glibc machine."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

from textenvs import system

# Where a 16 MB block goes once a block of that size was freed: glibc's mallinfo2 counts the
# bytes in blocks of their own mapping (hblkhd), which are unmapped when freed.
PROBE = textwrap.dedent(
    """
    import ctypes, sys, torch
    from textenvs import system
    class MallInfo2(ctypes.Structure):
        _fields_ = [(name, ctypes.c_size_t) for name in (
            "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks",
            "fordblks", "keepcost")]
    system.libc().mallinfo2.restype = MallInfo2
    def mapped_mb():
        return system.libc().mallinfo2().hblkhd // 2**20
    if sys.argv[1] == "pinned":
        assert system.return_large_frees_at_once()
    first = torch.ones(4 * 2**20)  # 16 MB
    del first  # freed: glibc raises its mmap threshold to its size
    before = mapped_mb()
    block = torch.ones(4 * 2**20)  # the next one of that size
    print(mapped_mb() - before)
    """
)


@pytest.mark.skipif(
    system.libc() is None or not hasattr(system.libc(), "mallinfo2"), reason="needs glibc 2.33+"
)
def test_a_pinned_mmap_threshold_keeps_large_blocks_in_their_own_mappings():
    """By default glibc serves a block of a size it has freed before from its heap, where it
    stays resident once freed (a sharded update gathers and frees the same sizes again and
    again); with the threshold pinned, every large block gets its own mapping, unmapped when
    freed."""
    mapped = {
        mode: int(subprocess.check_output([sys.executable, "-c", PROBE, mode], text=True))
        for mode in ("default", "pinned")
    }
    assert mapped == {"default": 0, "pinned": 16}


def test_malloc_trim_says_whether_it_ran():
    # (return_large_frees_at_once is process-wide: it runs in the probe's process only)
    assert system.release_freed_memory() is (system.libc() is not None)
