"""Batches of tensors from a dataset, assembled once into the host memory the device copy reads.

Each batch is assembled in Paddle host tensors (page-locked `CUDAPinnedPlace` when training on a GPU, so the
copy to the GPU is one DMA; `CPUPlace` otherwise) and filled through NumPy views of their memory by the
dataset's `batch`, which copies every feature row straight from the memory-mapped cache into it: one copy per
byte, where gathering, padding and `paddle.to_tensor` made three. The memory of the large arrays is kept and
reused from batch to batch (`HostBuffers`).

Workers are threads, not processes: assembling a batch is mostly memcpy, which NumPy runs without the GIL, so
threads copy in parallel, and their batches need no further copy. Paddle's process workers must move every
batch (about 105 MB of float16 features at batch 256 x 100 regions) through shared memory or a pipe, which
cost more than assembling it (bench/bench_loader.py measures both). An error in a worker reaches the caller.
"""

import collections
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Dict

import numpy as np
import paddle
from paddle import _C_ops

from .runtime import available_cpus


def host_place():
    """Where batches are assembled: page-locked memory when the current device is a GPU (`engine.prepare`
    then copies each batch there in one DMA), else ordinary CPU memory, which the model reads as it is."""
    return paddle.CUDAPinnedPlace() if paddle.device.get_device().startswith("gpu") else paddle.CPUPlace()


class _HostTensor:
    """A Paddle host tensor as NumPy sees it (`__array_interface__`): `np.asarray` makes a view of its memory,
    whose `.base` is this object, which keeps the tensor alive and hands it back."""

    def __init__(self, tensor: paddle.Tensor, dtype: np.dtype):
        self.tensor = tensor
        self.__array_interface__ = {"shape": tuple(tensor.shape), "typestr": dtype.str, "version": 3,
                                    "data": (tensor.data_ptr(), False)}


def _allocate(shape, dtype: np.dtype, place) -> paddle.Tensor:
    # _C_ops.empty (what paddle.empty calls; the same in Paddle 2.6 and 3.x) is the one way to allocate a
    # tensor in a given place without copying anything into it
    return _C_ops.empty(list(shape), getattr(paddle, dtype.name), place)  # paddle.float16, ...


def empty_host_array(shape, dtype, place) -> np.ndarray:
    """An uninitialised array whose memory is a new Paddle tensor in `place` (`tensor_of(array)`)."""
    dtype = np.dtype(dtype)
    return np.asarray(_HostTensor(_allocate(shape, dtype, place), dtype))


def tensor_of(array: np.ndarray) -> paddle.Tensor:
    """The tensor behind an array from `empty_host_array` or `HostBuffers.empty`: the same memory, no copy."""
    return array.base.tensor


class HostBuffers:
    """Host memory for the large arrays of batches (the features: 105 MB at batch 256), kept and reused.

    Fresh memory for every batch costs more than filling it: Paddle's host allocator gives blocks this large
    back to the system, so the kernel maps and zeroes each page again when it is first written (about 30 ms per
    105 MB on this project's machine, against 4 ms to copy the features into memory written before), and on a
    GPU box each fresh page-locked block is a cudaHostAlloc. So an array is handed out as a tensor over the
    front of a kept block, and the block is handed out again only when nothing outside this object refers to
    that tensor any more (CPython's reference count): a batch its caller keeps is never overwritten. The blocks
    are those the batches alive at one time needed; they are freed with this object (PyTorch's pinned-memory
    cache also keeps its blocks). Thread-safe.
    """

    min_bytes = 1 << 20  # smaller arrays come fresh from the allocator

    def __init__(self, place):
        self.place = place
        self._blocks = []  # [1-D block tensor, tensor handed out over its front, or None]
        self._lock = threading.Lock()

    def empty(self, shape, dtype) -> np.ndarray:
        """Like `empty_host_array(shape, dtype, self.place)`."""
        dtype = np.dtype(dtype)
        count = int(np.prod(shape))
        if count * dtype.itemsize < self.min_bytes:
            return empty_host_array(shape, dtype, self.place)
        with self._lock:
            entry = self._free_block(count, dtype)
            tensor = entry[0]._slice(0, count)  # shares the block's memory, as does the in-place reshape
            tensor.reshape_(list(shape))
            entry[1] = tensor
        return np.asarray(_HostTensor(tensor, dtype))

    def _free_block(self, count: int, dtype: np.dtype) -> list:
        """The smallest free block that fits, else a new one: blocks are never resized or dropped, since a
        batch's arrays of several sizes share them (resizing a block too small for one array would take it
        from the smaller array that needs it next)."""
        fitting = [entry for entry in self._blocks if entry[0].dtype == getattr(paddle, dtype.name)
                   and entry[0].shape[0] >= count and not self._in_use(entry)]
        if fitting:
            return min(fitting, key=lambda entry: entry[0].shape[0])
        self._blocks.append([_allocate([count], dtype, self.place), None])
        return self._blocks[-1]

    @staticmethod
    def _in_use(entry: list) -> bool:
        # references to the handed-out tensor: the entry and getrefcount's argument, plus any outside
        return entry[1] is not None and sys.getrefcount(entry[1]) > 2


class BatchLoader:
    """Batches (dicts of tensors: `dataset.batch(indices)`, see `ReferExpressionDataset.batch`) of `dataset` in
    the order of `batch_sampler`.

    num_workers=0 assembles each batch in the calling thread when it is asked for; num_workers=N has N
    threads assemble the next N batches while the caller works on one, N at most the CPUs this process may
    use: threads beyond them only contend for the cores and the memory bus (at eval batch 1024 on this
    project's 2-core machine, 4 threads ran about a fifth slower than 2). Iterating again starts over (the
    sampler decides the order).
    """

    def __init__(self, dataset, batch_sampler, num_workers: int = 0):
        self.dataset, self.batch_sampler = dataset, batch_sampler
        self.threads = min(num_workers, available_cpus())
        self.memory = HostBuffers(host_place())  # kept for every pass, as each epoch needs the same blocks

    def __len__(self) -> int:
        return len(self.batch_sampler)

    def batch(self, indices) -> Dict[str, paddle.Tensor]:
        arrays = self.dataset.batch(indices, self.memory.empty)
        return {key: tensor_of(array) for key, array in arrays.items()}

    def __iter__(self):
        if self.threads == 0:
            for indices in self.batch_sampler:
                yield self.batch(indices)
            return
        pool = ThreadPoolExecutor(self.threads, thread_name_prefix="batch")
        pending = collections.deque()
        try:
            for indices in self.batch_sampler:
                pending.append(pool.submit(self.batch, indices))
                if len(pending) > self.threads:
                    yield pending.popleft().result()
            while pending:
                yield pending.popleft().result()
        finally:  # also when the caller stops early or a batch failed: drop what has not started
            pool.shutdown(wait=True, cancel_futures=True)


def throughput(loader, batches: int, skip: int, consume=None):
    """(samples/s, seconds per batch, mean feature bytes per batch) of `batches` batches of `loader` after its
    first `skip` (worker start-up, and the batches the workers had ready by then), starting another pass when
    one ends; `consume(batch)` runs on each timed batch (`engine.prepare`: the copy to the device). Also times
    a `paddle.io.DataLoader`, whose process workers are stopped here, not when the process exits."""
    iterators = [iter(loader)]

    def next_batch():
        try:
            return next(iterators[-1])
        except StopIteration:
            iterators.append(iter(loader))
            return next(iterators[-1])

    try:
        for _ in range(skip):
            next_batch()
        samples, nbytes = 0, 0
        started = time.perf_counter()
        for _ in range(batches):
            batch = next_batch()
            features = batch["features"]
            samples += features.shape[0]
            nbytes += int(np.prod(features.shape)) * features.element_size()
            if consume:
                consume(batch)
        seconds = time.perf_counter() - started
    finally:
        for iterator in iterators:  # ours: the generator's close(); Paddle's: its worker shutdown
            (getattr(iterator, "_try_shutdown_all", None) or iterator.close)()
    return samples / seconds, seconds / batches, nbytes // batches
