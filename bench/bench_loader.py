"""Samples/s of the loaders train.py uses (train and eval, built as `vilbert.training` builds them), against
the time memcpy takes to copy one batch's feature bytes once, for every task.

    python bench/bench_loader.py --root /big/refcoco+_sized --make_root   # generate it first (~24 GB, minutes)
    python bench/bench_loader.py --root data/referExpression                # a root you have
    python bench/bench_loader.py --task vqa --root /big/vqa/VQA --make_root --images 10000   # VQA (features in ../coco)

Options are those of the task's config (config/refcoco+.yml, config/vqa.yml: batch 256, eval batch 1024, up to
100 regions) on the given root; a generated root has 10-100 detections per image, as real detectors return.
Rows: num_workers 0, 1, 2, 4 of the shipped loader (`vilbert.loader.BatchLoader`: threads) on the float16
cache (built on first use, as train.py does; its build time is printed) and on the LMDB alone, and Paddle's
`paddle.io.DataLoader` with worker processes, each assembling whole batches with the same `dataset.batch`, and
`use_shared_memory=True` on the cache, the alternative to threads, for the train split only: at eval batch 1024
(420 MB of features per batch) its 4 workers and their prefetched batches were killed by the kernel's
out-of-memory killer on this 24 GB machine. Each row times `--samples` samples (`--lmdb_samples` without the
cache; whole batches, passes repeated) after the first batches (worker start-up, and the batches the workers
had ready by then: 2 + 4 for threads, the extra one filling the blocks `HostBuffers` reuses, plus a whole pass
when the timed batches reach into another one; 1 + 2 x 4 for processes), so every row of a loader times the
same batches. The cache files are read once before timing, so the rows see them in the page cache, as every
epoch after the first does. On the cache each row's loader is built once and timed in every round, as
train.py keeps its loaders: the first round pays for the first touch of the memory its `HostBuffers` keep, the
later ones show what every later epoch gets (without the cache, decoding dominates, and the float32 batches
of every row kept at once would crowd the LMDB out of the page cache).
`memcpy ms` is the time `np.copyto` takes for an array of the row's mean feature bytes per batch (warm
buffers, best of 7), the floor for any loader that copies each feature byte once; `ratio` = loader ms per
batch / memcpy ms. The header's memory bandwidth with 1, 2 and 4 threads copying at once is how far more
workers can take a loader whose work is mostly copying on this machine. The rows are measured in `--rounds`
interleaved rounds, each keeping its best, which keeps the ratios stable on a shared machine.
"""

import argparse
import dataclasses
import functools
import sys
import threading
import time
from pathlib import Path

import numpy as np

from host import describe_cpu

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import vilbert  # noqa: E402,F401  (CPU settings before paddle loads)
import paddle  # noqa: E402

from vilbert.demo_data import make_demo_dataset  # noqa: E402
from vilbert.features import default_cache_path  # noqa: E402
from vilbert.loader import throughput  # noqa: E402
from vilbert.options import PROJECT_ROOT, RunOptions, load_task_config  # noqa: E402
from vilbert.tasks import TASKS  # noqa: E402
from vilbert.tokenization import BertTokenizer  # noqa: E402
from vilbert.vqa_demo_data import make_vqa_demo  # noqa: E402
from vilbert.training import build_dataset, eval_loader, train_loader  # noqa: E402

WORKERS = (0, 1, 2, 4)


def disk_size(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def make_root(task: str, root: Path, images: int) -> None:
    """A generated root with 10-100 detections per image: RefCOCO+'s split of images (85% train, 7.5% val,
    3.75% each test split), or VQA's (train2014 / val2014 / test2015 about 2 : 1 : 2 of COCO; `root` is the
    VQA data root, its features go to ../coco)."""
    print(f"Generating {images} images in {root} ...", flush=True)
    started = time.time()
    if task == "vqa":
        make_vqa_demo(root.parent, num_train_images=int(images * 0.4), num_val_images=int(images * 0.2),
                      num_test_images=int(images * 0.4), max_detections=100)
    else:
        make_demo_dataset(root, num_train_images=int(images * 0.85), num_val_images=int(images * 0.075),
                          num_test_images=int(images * 0.0375), max_detections=100)
    print(f"... {time.time() - started:.0f} s", flush=True)


def memcpy_seconds(nbytes: int, threads: int = 1) -> float:
    """Best of 7: from a common start until the last of `threads` threads has copied its own `nbytes` (warm
    buffers)."""
    pairs = [(np.ones(nbytes // 2, np.float16), np.zeros(nbytes // 2, np.float16)) for _ in range(threads)]
    best = float("inf")
    for _ in range(7):
        start, finished = threading.Barrier(threads + 1), []

        def copy(pair):
            start.wait()
            np.copyto(pair[1], pair[0])
            finished.append(time.perf_counter())

        workers = [threading.Thread(target=copy, args=(pair,)) for pair in pairs]
        for worker in workers:
            worker.start()
        start.wait()
        started = time.perf_counter()
        for worker in workers:
            worker.join()
        best = min(best, max(finished) - started)
    return best


class Batches(paddle.io.Dataset):
    """The batches of a sampler's pass, each assembled by `dataset.batch`, as items (Paddle's workers then
    assemble whole batches the way our threads do)."""

    def __init__(self, dataset, batch_sampler):
        self.dataset, self.batches = dataset, list(batch_sampler)

    def __len__(self) -> int:
        return len(self.batches)

    def __getitem__(self, index: int):
        return self.dataset.batch(self.batches[index])


def paddle_process_loader(dataset, batch_sampler, workers: int):
    return paddle.io.DataLoader(Batches(dataset, batch_sampler), batch_size=None, num_workers=workers,
                                use_shared_memory=True)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--task", default="refer", choices=list(TASKS), help="whose loader and config")
    parser.add_argument("--root", required=True, help="a data root of the task (RefCOCO+-format, VQA-format)")
    parser.add_argument("--make_root", action="store_true", help="generate the root first if it is not there")
    parser.add_argument("--images", type=int, default=20000, help="images of a generated root (RefCOCO+: 19,992)")
    parser.add_argument("--samples", type=int, default=50000, help="timed samples per row on the cache")
    parser.add_argument("--lmdb_samples", type=int, default=3000, help="timed samples per row without the cache")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds of all rows; the best counts")
    args = parser.parse_args(argv)
    root = Path(args.root)
    task = TASKS[args.task]
    config = PROJECT_ROOT / "config" / task.configs[0]
    options = RunOptions(**{**load_task_config(config), "dataroot": str(root)})
    if args.make_root and not task.data_marker(options).exists():
        make_root(args.task, root, args.images)
    print(describe_cpu())
    print(f"Paddle {paddle.__version__}, {'CUDA' if paddle.is_compiled_with_cuda() else 'CPU-only'} build")
    outside = {Path(options.data_path(name)).resolve() for name in (options.features_h5path1,
               options.features_h5path2, options.features_test) if name}  # VQA's features sit beside the root
    outside = [path for path in outside if path.exists() and root.resolve() not in path.parents]
    print(f"Root {root}: {(disk_size(root) + sum(map(disk_size, outside))) / 2**30:.1f} GiB on disk"
          + (f", its feature LMDBs {', '.join(p.name for p in outside)} included" if outside else ""), flush=True)
    batch_bytes = 105 << 20
    rates = {threads: threads * batch_bytes / memcpy_seconds(batch_bytes, threads) / 1e9 for threads in (1, 2, 4)}
    print("Memory bandwidth, 105 MB copied by each of 1 / 2 / 4 threads at once: "
          + " / ".join(f"{rate:.1f}" for rate in rates.values()) + " GB/s (the ceiling for more workers)", flush=True)

    tokenizer = BertTokenizer(options.bert_model)
    caches = [default_cache_path(options.data_path(name)) for name in (options.features_h5path1,
                                                                         options.features_h5path2) if name]
    if not all(path.exists() for path in caches):
        started = time.time()
        build_dataset(options, options.train_split, tokenizer)
        print(f"Feature caches built in {time.time() - started:.0f} s")
    started = time.time()
    for path in caches:  # into the page cache, as after a first epoch
        with open(path, "rb") as f:
            while f.read(64 << 20):
                pass
    print(f"Caches {', '.join(f'{p.name} {p.stat().st_size / 2**30:.2f} GiB' for p in caches)}; "
          f"read once in {time.time() - started:.0f} s", flush=True)

    rows = {}  # (loader, split, features, workers) -> (samples/s, s/batch, bytes/batch, memcpy s), best round
    for cached in (True, False):
        opts = dataclasses.replace(options, feature_cache=cached, build_feature_cache=False)
        data = {split: build_dataset(opts, split, tokenizer) for split in (options.train_split, options.val_split)}
        features = "cache fp16" if cached else "LMDB"
        specs = []  # (row, make the loader, batches to skip, batches to time)
        for split, make in ((options.train_split, train_loader), (options.val_split, eval_loader)):
            size = options.batch_size if split == options.train_split else options.eval_batch_size
            timed = -(-(args.samples if cached else args.lmdb_samples) // size)
            per_pass = len(make(data[split], opts))
            # the same timed batches in every row; a pass boundary in them is preceded by one untimed, where
            # HostBuffers add the block it needs there
            skip = 2 + max(WORKERS) + (per_pass if 2 + max(WORKERS) + timed > per_pass else 0)
            for workers in WORKERS:
                specs.append((("threads (shipped)", split, features, workers),
                              functools.partial(make, data[split], dataclasses.replace(opts, num_workers=workers)),
                              skip, timed))
            for workers in WORKERS[1:] if cached and split == options.train_split else ():
                sampler = make(data[split], opts).batch_sampler
                specs.append((("paddle processes, shm", split, features, workers),
                              functools.partial(paddle_process_loader, data[split], sampler, workers),
                              1 + 2 * max(WORKERS), timed))  # Paddle's prefetch_factor 2
        kept = {}  # on the cache, each row's loader, for every round
        for _ in range(args.rounds):  # interleaved rounds: a busy spell hits every row alike
            for row, make_loader, skip, timed in specs:
                loader = kept[row] if row in kept else make_loader()
                if cached:
                    kept[row] = loader
                try:
                    rate, seconds, nbytes = throughput(loader, timed, skip)
                except SystemError as err:  # Paddle's process workers died (out of shared memory, say)
                    print(*row, "failed:", str(err).splitlines()[0], flush=True)
                    continue
                if rate > rows.get(row, (0,))[0]:
                    rows[row] = rate, seconds, nbytes, memcpy_seconds(nbytes)  # the copy under the same load
                print(*row, f"{rate:,.0f}/s", flush=True)

    print(f"\nLoaders at config/{config.name} (batch {options.batch_size}, eval batch {options.eval_batch_size}, "
          f"up to {options.max_region_num} regions), one process, best of {args.rounds} rounds")
    print(f"{'loader':<23}{'split':<10}{'features':<12}{'workers':>8}{'samples/s':>11}{'ms/batch':>10}"
          f"{'MB/batch':>10}{'memcpy ms':>11}{'ratio':>7}")
    for (name, split, features, workers), (rate, seconds, nbytes, copy) in rows.items():
        print(f"{name:<23}{split:<10}{features:<12}{workers:>8}{rate:>11,.0f}{seconds * 1e3:>10.1f}"
              f"{nbytes / 1e6:>10.0f}{copy * 1e3:>11.2f}{seconds / copy:>7.1f}")


if __name__ == "__main__":
    main()
