"""BatchLoader: the same batches as collating samples and converting them with paddle.to_tensor (the path it
replaces), with and without worker threads and the float16 cache, also when the caller keeps every batch;
HostBuffers reuses memory only once nothing refers to it; errors reach the caller; the pinned-memory branch
of a GPU run, forced on this CPU build."""

import threading

import numpy as np
import paddle
import pytest

from vilbert import loader as loader_module
from vilbert.dataset import ReferExpressionDataset, collate
from vilbert.demo_data import DETECTED_LMDB, GT_LMDB, make_demo_dataset
from vilbert.engine import EpochBatchSampler
from vilbert.features import open_features
from vilbert.loader import BatchLoader, HostBuffers, host_place, tensor_of
from vilbert.tokenization import BertTokenizer


@pytest.fixture(scope="module")
def datasets(tmp_path_factory):
    """Train and val datasets of a generated root with up to 30 detections per image (batches are padded),
    read from the LMDBs and from float16 caches."""
    root = make_demo_dataset(tmp_path_factory.mktemp("loader"), num_train_images=12, num_val_images=4,
                             num_test_images=1, max_detections=30)
    tokenizer = BertTokenizer()
    out = {}
    for cached in (False, True):
        readers = [open_features(root / name, cache=cached, build=cached) for name in (DETECTED_LMDB, GT_LMDB)]
        for split in ("train", "val"):
            out[split, cached] = ReferExpressionDataset(root, split, tokenizer, readers[0],
                                                        readers[1] if split == "train" else None)
    return out


def old_batches(dataset, batches):
    """What the loader replaced: samples collated, then converted by paddle.to_tensor."""
    for indices in batches:
        yield {key: paddle.to_tensor(value, place=paddle.CPUPlace())
               for key, value in collate([dataset[i] for i in indices]).items()}


def assert_same_batches(got, expected):  # the padding of regions included
    count = 0
    for a, b in zip(got, expected, strict=True):
        assert a.keys() == b.keys()
        for key in b:
            assert a[key].dtype == b[key].dtype and a[key].shape == b[key].shape, key
            np.testing.assert_array_equal(a[key].numpy(), b[key].numpy(), err_msg=key)
        count += 1
    assert count


@pytest.mark.parametrize("workers", [0, 3])
@pytest.mark.parametrize("cached", [False, True])
@pytest.mark.parametrize("split", ["train", "val"])
def test_batches_equal_the_collate_to_tensor_path(datasets, split, cached, workers):
    dataset = datasets[split, cached]
    sampler = EpochBatchSampler(len(dataset), 16, shuffle=split == "train", seed=1)
    batches = list(sampler)
    assert_same_batches(BatchLoader(dataset, sampler, workers), old_batches(dataset, batches))
    assert any((batch["image_mask"].numpy() == 0).any() for batch in BatchLoader(dataset, batches, workers))
    if cached:
        assert next(iter(BatchLoader(dataset, batches, workers)))["features"].dtype == paddle.float16


@pytest.mark.parametrize("workers", [0, 3])
def test_batches_the_caller_keeps_are_never_overwritten(datasets, workers):
    dataset = datasets["train", True]
    batches = list(EpochBatchSampler(len(dataset), 16, shuffle=True, seed=2))
    kept = list(BatchLoader(dataset, batches, workers))
    assert_same_batches(kept, old_batches(dataset, batches))


def test_dropped_batches_memory_is_reused(datasets, monkeypatch):
    """Iterating with one worker and dropping each batch: the features need at most three blocks (the batch
    the caller has, the next one, the one being assembled), not one per batch, and later passes reuse them.
    Whether a pass needs two or all three depends on the threads' timing, so the bound is on all passes."""
    large = []
    allocate = loader_module._allocate

    def recording(shape, dtype, place):
        if np.prod(shape) * dtype.itemsize >= HostBuffers.min_bytes:
            large.append(list(shape))
        return allocate(shape, dtype, place)

    monkeypatch.setattr(loader_module, "_allocate", recording)
    dataset = datasets["train", True]
    batches = [list(range(16))] * 12  # the same batch: same shapes, so no block is outgrown
    loader = BatchLoader(dataset, batches, 1)
    for _ in range(3):  # epochs; blocks made anew each pass would be at least two per pass
        for batch in loader:
            assert batch["features"].shape[0] == 16
        del batch  # as a pass begins no batch is held (else its block is busy while the workers start again)
    assert 1 <= len(large) <= 3


def test_host_buffers_keep_a_small_block_when_a_larger_array_comes(monkeypatch):
    """A batch's arrays of several sizes share the blocks: one too small for a request stays for the next
    small array (resized instead, it would leave that array to a new block)."""
    allocated = []
    allocate = loader_module._allocate
    monkeypatch.setattr(loader_module, "_allocate",
                        lambda shape, dtype, place: allocated.append(shape) or allocate(shape, dtype, place))
    memory = HostBuffers(paddle.CPUPlace())
    small = HostBuffers.min_bytes // 4  # float32 elements
    first = memory.empty((small,), np.float32)
    del first
    large = memory.empty((4, small), np.float32)
    again = memory.empty((small,), np.float32)  # the first block: free, and it fits
    assert allocated == [[small], [4 * small]] and large.size == 4 * small and again.size == small


def test_host_buffers_hand_out_a_block_again_only_when_unreferenced():
    memory = HostBuffers(paddle.CPUPlace())
    shape = (2, HostBuffers.min_bytes // 4)  # float16: half the minimum per row, so both rows are kept
    first = memory.empty(shape, np.float16)
    first[...] = 1
    tensor = tensor_of(first)
    del first  # the tensor handed out still refers to the block
    second = memory.empty(shape, np.float16)
    second[...] = 2
    assert tensor.data_ptr() != tensor_of(second).data_ptr()
    np.testing.assert_array_equal(tensor.numpy(), 1)
    address = tensor.data_ptr()
    del tensor
    third = memory.empty((1, shape[1] * 2), np.float16)  # smaller or equal blocks are reused, any shape
    assert tensor_of(third).data_ptr() == address and tensor_of(third).shape == [1, shape[1] * 2]
    small = memory.empty((4,), np.float16)  # below min_bytes: fresh memory
    assert tensor_of(small).data_ptr() not in (address, tensor_of(second).data_ptr())


class Broken:
    """A dataset whose sample 5 cannot be read."""

    def __init__(self, dataset):
        self.dataset = dataset

    def batch(self, indices, empty):
        if 5 in indices:
            raise ValueError("sample 5 is corrupt")
        return self.dataset.batch(indices, empty)


@pytest.mark.parametrize("workers", [0, 2])
def test_an_error_in_a_worker_reaches_the_caller(datasets, workers):
    batches = [[0, 1], [2, 3], [4, 5], [6, 7], [8, 9]]
    loader = BatchLoader(Broken(datasets["val", True]), batches, workers)
    seen = []
    with pytest.raises(ValueError, match="sample 5 is corrupt"):
        for batch in loader:
            seen.append(batch["sent_id"].shape[0])
    assert seen == [2, 2]
    assert len(list(BatchLoader(datasets["val", True], batches, workers))) == 5  # stopping early left nothing behind


def test_gpu_runs_assemble_batches_in_pinned_memory(datasets, monkeypatch):
    """The branch a GPU run takes, forced here: every batch array is requested in CUDAPinnedPlace and the
    batches are unchanged. A CPU build cannot even construct that place, so a stand-in takes its name, and the
    requests are served in CPU memory."""

    class PinnedPlace:
        pass

    monkeypatch.setattr(paddle.device, "get_device", lambda: "gpu:0")
    monkeypatch.setattr(paddle, "CUDAPinnedPlace", PinnedPlace)
    assert isinstance(host_place(), PinnedPlace)
    requested = []

    class RecordingOps:
        @staticmethod
        def empty(shape, dtype, place):
            requested.append(place)
            return paddle._C_ops.empty(shape, dtype, paddle.CPUPlace())

    monkeypatch.setattr(loader_module, "_C_ops", RecordingOps)
    dataset = datasets["train", True]
    batches = list(EpochBatchSampler(len(dataset), 16, shuffle=False))
    assert_same_batches(BatchLoader(dataset, batches, 2), old_batches(dataset, batches))
    assert requested and all(isinstance(place, PinnedPlace) for place in requested)


def test_threads_are_capped_at_the_cpus_the_process_may_use(datasets, monkeypatch):
    class Recording:
        def __init__(self, dataset):
            self.dataset, self.threads = dataset, set()

        def batch(self, indices, empty):
            self.threads.add(threading.current_thread().name)
            return self.dataset.batch(indices, empty)

    monkeypatch.setattr(loader_module, "available_cpus", lambda: 2)
    dataset = Recording(datasets["val", True])
    batches = [[i] for i in range(len(dataset.dataset))] * 4
    assert len(list(BatchLoader(dataset, batches, 8))) == len(batches)
    assert len(dataset.threads) == 2 and all(name.startswith("batch") for name in dataset.threads)
