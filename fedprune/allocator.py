"""Keep freed memory in the process's heap instead of handing it back to the OS at every step (glibc).

PyTorch allocates CPU tensors with ``malloc``. With glibc's default, dynamic thresholds a training
loop's activations keep crossing them: large blocks are ``mmap``-ed and unmapped, and the top of
the heap is trimmed, so every step faults the same pages in again (about a thousand page faults per
step of the small CNN at batch 32). Fixed thresholds end that: blocks up to ``mmap_threshold`` come
from the heap and freed memory stays there for the next step. The peak is the same; the process
holds it until it exits (a deployed ClientApp serves one message per process).

``python -m benchmarks.cpu_paths`` measures the saving in training and evaluation CPU time
(benchmarks/results/cpu_paths.json). Elsewhere (not glibc: macOS, musl) this does nothing.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools

M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD_MAX = 32 * 1024 * 1024
"""glibc's largest mmap threshold on 64-bit (``DEFAULT_MMAP_THRESHOLD_MAX``); mallopt refuses more."""


@functools.cache
def keep_freed_memory(mmap_threshold: int = MMAP_THRESHOLD_MAX, trim_threshold: int = 1 << 30) -> bool:
    """Fix glibc's mmap and trim thresholds for this process (once); False where there is no glibc."""
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
        libc.gnu_get_libc_version  # noqa: B018 - glibc only
    except (OSError, AttributeError, TypeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return bool(mallopt(M_MMAP_THRESHOLD, mmap_threshold)) and bool(mallopt(M_TRIM_THRESHOLD, trim_threshold))
