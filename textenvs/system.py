"""The C library's memory and process controls that PyTorch leaves alone (glibc, Linux).

Each helper does nothing and returns False where the call does not exist (macOS, musl, Windows):
they lower memory or tidy processes up, and nothing depends on them for correctness.

* :func:`release_freed_memory`: ``malloc_trim(0)``, the heap's free pages back to the system now.
* :func:`return_large_frees_at_once`: ``mallopt(M_MMAP_THRESHOLD)``: every allocation of at least
  that size gets its own mapping, unmapped when freed. glibc otherwise raises its threshold to the
  size of each large block freed, so the next blocks of that size come from the heap and stay
  resident after they are freed: a sharded update, which gathers and frees a block's parameters
  and gradients again and again, then holds about twice what it uses.
* :func:`die_with_parent`: ``prctl(PR_SET_PDEATHSIG, SIGTERM)``: the kernel ends this process when
  its parent dies.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import os
import signal
import sys

M_MMAP_THRESHOLD = -3  # mallopt's parameter number (glibc's malloc.h)
PR_SET_PDEATHSIG = 1  # prctl's option number (linux/prctl.h)


@functools.cache
def libc() -> ctypes.CDLL | None:
    """The C library, loaded once; None where it cannot be found."""
    name = ctypes.util.find_library("c")
    try:
        return ctypes.CDLL(name, use_errno=True) if name else None
    except OSError:
        return None


def _function(name: str):
    return getattr(libc(), name, None) if libc() is not None else None


def release_freed_memory() -> bool:
    """Give the heap's free pages back to the operating system (glibc's ``malloc_trim``).

    A batched prefill of long prompts needs working memory (attention scores, MLP activations,
    the batch's cache before its rows move into the persistent one) many times its KV cache;
    freed, glibc keeps it in the process's heap, so a 124M GPT-2's sub-env on a 992-token prompt
    held 214 MB resident instead of its 72 MB cache (``benchmarks.workloads``). Returns whether
    anything was called (False off glibc)."""
    trim = _function("malloc_trim")
    if trim is None:
        return False
    trim(0)
    return True


def return_large_frees_at_once(threshold: int = 1 << 20) -> bool:
    """Make every allocation of ``threshold`` bytes or more its own mapping, returned to the system
    the moment it is freed (glibc's ``mallopt(M_MMAP_THRESHOLD)``, which also stops glibc raising
    the threshold by itself). Process-wide; call it before the large allocations. The 2-process
    sharded update of the 124M layout (``benchmarks.scale``): peak resident memory per process
    3,735 / 3,218 MB without it (``benchmarks/latest/scale.json``), 1,992 / 1,993 MB with it
    (``scale_sharded.json``). Returns whether it took effect."""
    set_option = _function("mallopt")
    return set_option is not None and set_option(M_MMAP_THRESHOLD, int(threshold)) == 1


def die_with_parent() -> bool:
    """Ask the kernel (Linux) to send this process SIGTERM when its parent dies. Returns whether
    it is armed; if the parent died before the request, the process ends now."""
    prctl = _function("prctl") if sys.platform.startswith("linux") else None
    if prctl is None:
        return False
    parent = os.getppid()
    if prctl(PR_SET_PDEATHSIG, signal.SIGTERM) != 0:
        return False
    if os.getppid() != parent:  # the parent died before the request was made
        os.kill(os.getpid(), signal.SIGTERM)
    return True
