"""Batches of tensors from a dataset, assembled once into the host memory the device copy reads.

Each batch is allocated as Paddle host tensors (page-locked `CUDAPinnedPlace` when training on a GPU, so the
copy to the GPU is one DMA; `CPUPlace` otherwise) and filled through NumPy views of their memory by `collate`,
which copies every feature row straight from the memory-mapped cache into it: one copy per byte, where
gathering, padding and `paddle.to_tensor` made three.

Workers are threads, not processes: assembling a batch is mostly memcpy, which NumPy runs without the GIL, so
threads copy in parallel, and their batches need no further copy. Paddle's process workers must move every
batch (about 105 MB of float16 features at batch 256 x 100 regions) through shared memory or a pipe, which
cost more than assembling it (bench/bench_loader.py measures both). An error in a worker reaches the caller.
"""

import collections
from concurrent.futures import ThreadPoolExecutor
from typing import Dict

import numpy as np
import paddle
from paddle import _C_ops

from .dataset import collate


def host_place():
    """Where batches are assembled: page-locked memory when the current device is a GPU (`engine.prepare`
    then copies each batch there in one DMA), else ordinary CPU memory, which the model reads as it is."""
    return paddle.CUDAPinnedPlace() if paddle.device.get_device().startswith("gpu") else paddle.CPUPlace()


class _HostTensor:
    """A Paddle host tensor as NumPy sees it (`__array_interface__`): `np.asarray` makes a view of its memory,
    whose `.base` is this object, which keeps the tensor alive and hands it back."""

    def __init__(self, shape, dtype: np.dtype, place):
        # _C_ops.empty (what paddle.empty calls; the same in Paddle 2.6 and 3.x) is the one way to allocate a
        # tensor in a given place without copying anything into it
        self.tensor = _C_ops.empty(list(shape), getattr(paddle, dtype.name), place)  # paddle.float16, ...
        self.__array_interface__ = {"shape": tuple(shape), "typestr": dtype.str, "version": 3,
                                    "data": (self.tensor.data_ptr(), False)}


def empty_host_array(shape, dtype, place) -> np.ndarray:
    """An uninitialised array whose memory is a new Paddle tensor in `place` (`tensor_of(array)`)."""
    return np.asarray(_HostTensor(shape, np.dtype(dtype), place))


def tensor_of(array: np.ndarray) -> paddle.Tensor:
    """The tensor behind an array from `empty_host_array`: the same memory, no copy."""
    return array.base.tensor


class BatchLoader:
    """Batches (dicts of tensors, see `dataset.collate`) of `dataset` in the order of `batch_sampler`.

    num_workers=0 assembles each batch in the calling thread when it is asked for; num_workers=N has N
    threads assemble the next N batches while the caller works on one. Iterating again starts over (the
    sampler decides the order).
    """

    def __init__(self, dataset, batch_sampler, num_workers: int = 0):
        self.dataset, self.batch_sampler, self.num_workers = dataset, batch_sampler, num_workers
        self.place = host_place()

    def __len__(self) -> int:
        return len(self.batch_sampler)

    def batch(self, indices) -> Dict[str, paddle.Tensor]:
        arrays = collate([self.dataset.sample(index) for index in indices],
                         lambda shape, dtype: empty_host_array(shape, dtype, self.place))
        return {key: tensor_of(array) for key, array in arrays.items()}

    def __iter__(self):
        if self.num_workers == 0:
            for indices in self.batch_sampler:
                yield self.batch(indices)
            return
        pool = ThreadPoolExecutor(self.num_workers, thread_name_prefix="batch")
        pending = collections.deque()
        try:
            for indices in self.batch_sampler:
                pending.append(pool.submit(self.batch, indices))
                if len(pending) > self.num_workers:
                    yield pending.popleft().result()
            while pending:
                yield pending.popleft().result()
        finally:  # also when the caller stops early or a batch failed: drop what has not started
            pool.shutdown(wait=True, cancel_futures=True)
