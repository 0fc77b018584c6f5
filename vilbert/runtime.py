"""Process-wide CPU settings for Paddle, measured on this project's 2-core AMD EPYC machine.

- Threads: Paddle's CPU wheel runs on one thread unless told otherwise. `MKL_NUM_THREADS` (default: the CPUs
  this process may use, shared among the ranks of a launch) sets MKL's threads (matmuls), Paddle's OpenMP
  threads (other kernels) and those of BertAdam's CPU update (`cpu_threads`). `OMP_NUM_THREADS` cannot serve:
  importing Paddle sets it to 1 when unset (and warns when it is above 1), so its value would depend on what
  was imported first.
- MKL takes a slow generic path on AMD CPUs unless `MKL_DEBUG_CPU_TYPE=5`: with both, a 800x1024x1024 matmul
  goes from 25 to 136 GFLOP/s.
- Strided views (on by default) make a transpose free but the reshape after it, and its gradient, a slow copy
  (8.8 ms per [8, 100, 1024] against 1.9 ms for the transpose kernel); off on CPU-only builds, outputs identical.
- glibc hands large freed blocks back to the OS, so every backward pass faulted ~550 MB of fresh pages in again
  (the 94 MB word-embedding gradient took 171 ms instead of 3.5 ms); kept instead, so memory stays at its peak.
  One arena for all threads: a block above 64 MB allocated in another thread (a batch the loader's threads
  assemble) bypasses the kept heap and is faulted in fresh every time (105 MB: ~100 ms instead of ~10 ms).
Values already in the environment are respected.
"""

import ctypes
import os
import sys
import warnings


def set_cpu_defaults() -> None:
    """Call before Paddle is first imported."""
    os.environ.setdefault("MKL_NUM_THREADS", str(available_cpus()))
    os.environ.setdefault("MKL_DEBUG_CPU_TYPE", "5")
    # Paddle warns about a missing C++ compiler cache on every import; this project builds no extension.
    warnings.filterwarnings("ignore", message="No ccache found")
    _keep_freed_memory()


def available_cpus() -> int:
    """The CPUs this process may use: those it may run on (its affinity mask: what a job scheduler or `taskset`
    granted), shared with the other ranks `paddle.distributed.launch` started on this machine (`PADDLE_LOCAL_SIZE`),
    so that 2 ranks on 2 cores take one each instead of each running 2 threads on both."""
    try:
        ranks = max(1, int(os.environ.get("PADDLE_LOCAL_SIZE", "1")))
    except ValueError:
        ranks = 1
    return max(1, len(os.sched_getaffinity(0)) // ranks)


def cpu_threads() -> int:
    """The thread count set by `MKL_NUM_THREADS`, for Paddle's kernels and BertAdam's CPU update alike."""
    return int(os.environ["MKL_NUM_THREADS"])


def set_paddle_threads() -> None:
    """After Paddle is imported: its threads as `MKL_NUM_THREADS` says, and no strided views on CPU-only builds."""
    import paddle

    paddle.base.core.set_num_threads(cpu_threads())
    if not paddle.is_compiled_with_cuda() and "FLAGS_use_stride_kernel" not in os.environ:
        paddle.set_flags({"FLAGS_use_stride_kernel": False})


def _keep_freed_memory() -> None:
    if not sys.platform.startswith("linux") or "MALLOC_MMAP_MAX_" in os.environ:
        return
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:  # not glibc: nothing to tune
        return
    m_trim_threshold, m_top_pad, m_mmap_max, m_arena_max = -1, -2, -4, -8  # mallopt parameters of glibc's malloc.h
    libc.mallopt(m_mmap_max, 0)  # big blocks from the heap, which keeps them
    libc.mallopt(m_arena_max, 1)  # ... also for other threads
    libc.mallopt(m_trim_threshold, 2 ** 31 - 1)  # never shrink the heap
    libc.mallopt(m_top_pad, 64 << 20)  # grow it in 64 MB steps
