"""Keep freed CPU memory in the process heap instead of handing it back to the OS after every op.

PyTorch has no caching allocator on CPU: every activation is a fresh `malloc` and every release a
`free`. glibc serves large requests with `mmap` and trims the heap top back to the OS, so the next
tensor of that size page-faults its memory in again (the kernel zeroes each page). For the routed
forward's many medium tensors (the token dispatch's packed buffers, per-expert activations) that
re-faulting costs more than the arithmetic: 12.8 ms against 4.2 ms per MiniLM projection at E=32 in
`bench/routing.py --part speed` (issue #14). This is why CPU inference guides (Intel's extension for
PyTorch, vLLM's CPU backend) preload jemalloc or tcmalloc; with glibc the same effect comes from two
`mallopt` settings, which `keep_heap()` makes once per process:

    M_MMAP_THRESHOLD = 32 MiB   (glibc's maximum; smaller blocks come from the heap)
    M_TRIM_THRESHOLD = 1 GiB    (freed heap memory is kept for reuse, up to 1 GiB above the peak)

The process's resident memory then stays near its peak instead of shrinking between forwards, as it
would with a caching allocator. Set LORAPLEX_MALLOC=system to leave the allocator as it is; on a libc
other than glibc (macOS, musl) nothing is changed.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
MMAP_THRESHOLD = 32 * 2**20
TRIM_THRESHOLD = 2**30

_done: bool | None = None


def keep_heap() -> bool:
    """Apply the settings above once; True when they are in effect (glibc, not switched off)."""
    global _done
    if _done is None:
        choice = os.environ.get("LORAPLEX_MALLOC", "keep").strip().lower() or "keep"
        if choice not in ("keep", "system"):
            from loraplex.errors import InvalidSpec

            raise InvalidSpec(f"LORAPLEX_MALLOC={os.environ['LORAPLEX_MALLOC']!r}: expected keep (the default) or system")
        _done = False
        if choice == "keep" and sys.platform.startswith("linux"):
            try:
                libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
                mallopt = libc.mallopt  # glibc only
            except (OSError, AttributeError):
                return False
            _done = bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD))
    return _done
