"""How long checking a feature cache against its checksums takes, against reading the same file without them.

    python bench/bench_cache_verify.py --out /big/refcoco+_sized.cache   # writes a 4.5 GB cache first (minutes)
    python bench/bench_cache_verify.py --out /tmp/c.cache --gib 0.5     # a smaller one

A run verifies every cache it opens once (`vilbert.features.FeatureCache.verify`), as do `download_dataset.sh
--check` and `selfcheck.py`. The cache is written by `write_feature_cache`, as a build from an LMDB writes it:
float16 features of `--images` images of 10-100 regions (a RefCOCO+-sized cache by default: 4.5 GB). Then, on
the same file: `plain read` reads it whole in the same 1 MiB pieces on the same threads without checksums (what
the disk or the page cache gives), `verify` checks every block's crc32 (`FeatureCache.damage`); each once from
the page cache (warm: a later run) and once after `posix_fadvise(DONTNEED)` dropped the file's pages (cold: the
first run after a reboot or a copy; the disk's speed). `ratio` = verify seconds / plain read seconds.
"""

import argparse
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from host import describe_cpu  # noqa: E402
from vilbert.features import (CACHE_ALIGN, CHECKSUM_BLOCK, FeatureCache, RegionFeatures,  # noqa: E402
                              write_feature_cache)
from vilbert.runtime import cpu_threads  # noqa: E402


def regions(images: int, seed: int = 0):
    """(image id, RegionFeatures) of `images` images of 10-100 regions; the features cycle through 16 random
    arrays (their values do not change the checksum's speed)."""
    rng = np.random.default_rng(seed)
    pool = rng.standard_normal((16, 101, 2048), dtype=np.float32)
    for image in range(images):
        rows = int(rng.integers(11, 102))
        boxes = np.tile(np.float32([0, 0, 10, 10]), (rows, 1))
        yield str(image), RegionFeatures(pool[image % 16, :rows], np.zeros((rows, 5), np.float32), boxes, rows,
                                         640, 480)


def plain_read(path: Path) -> None:
    """Reads the file's data in the pieces and on the threads `verify` uses, checking nothing."""
    size = path.stat().st_size

    def read(start):
        piece = bytearray(1 << 20)
        with open(path, "rb", buffering=0) as f, memoryview(piece) as view:
            end = min(start + CHECKSUM_BLOCK, size)
            while start < end:
                start += os.preadv(f.fileno(), [view[:min(len(piece), end - start)]], start)

    with ThreadPoolExecutor(cpu_threads()) as pool:
        list(pool.map(read, range(CACHE_ALIGN, size, CHECKSUM_BLOCK)))


def drop_from_page_cache(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())
        os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)


def timed(work) -> float:
    started = time.perf_counter()
    work()
    return time.perf_counter() - started


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True, help="the cache file to write and verify")
    parser.add_argument("--gib", type=float, default=4.5, help="its size (default: RefCOCO+'s float16 cache)")
    args = parser.parse_args(argv)
    images = int(args.gib * 2 ** 30 / (56 * 2048 * 2))  # 56 regions a mean image holds, float16
    if not args.out.exists():
        print(f"Writing {images:,} images to {args.out} ...", flush=True)
        seconds = timed(lambda: write_feature_cache(args.out, regions(images), float16=True, source={},
                                                    source_path="synthetic"))
        print(f"  written in {seconds:.0f} s", flush=True)
    size = args.out.stat().st_size
    print(f"{describe_cpu()}; {cpu_threads()} threads")
    print(f"cache {args.out}: {size / 2 ** 30:.2f} GiB, {-(-(size - CACHE_ALIGN) // CHECKSUM_BLOCK):,} blocks of "
          f"{CHECKSUM_BLOCK >> 20} MiB")
    print(f"{'':<6} {'plain read s':>13} {'verify s':>9} {'verify GiB/s':>13} {'ratio':>6}")
    for state in ("warm", "cold"):
        cache = FeatureCache(args.out, verify=False)
        if state == "warm":
            plain_read(args.out)  # into the page cache
        else:
            drop_from_page_cache(args.out)
        plain = timed(lambda: plain_read(args.out))
        if state == "cold":
            drop_from_page_cache(args.out)
        found = {}
        verify = timed(lambda: found.setdefault("damage", cache.damage()))
        assert found["damage"] is None, f"the written cache does not match its checksums: {found['damage']}"
        print(f"{state:<6} {plain:>13.2f} {verify:>9.2f} {size / 2 ** 30 / verify:>13.2f} {verify / plain:>6.2f}")


if __name__ == "__main__":
    main()
