"""What every task's dataset does to make a batch: region rows gathered and padded, token arrays cut, entries cached.

`region_rows` copies each sample's region rows (slices of the feature readers' memory-mapped rows) into the
batch with one NumPy call per array, padding included, so threads assembling batches hold the GIL little and
every feature byte is copied once (`vilbert.loader`). `EntriesCache` keeps a split's tokenized entries in an npz
whose name carries a hash of everything they depend on, so a stale cache is never read (the official code's
`<task>_<split>_<L>.pkl` is reused whatever changed).
"""

import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Dict, List, Sequence, Tuple

import numpy as np

from .fileio import atomic_path, user_cache, writable

log = logging.getLogger(__name__)


def region_rows(samples: Sequence[Sequence[Tuple[object, int, int]]], empty=np.empty):
    """Per sample a list of (RegionFeatures, start, stop) row ranges, concatenated in that order, zero-padded
    to the most rows any sample has. Returns ({features [B,R,2048], spatials [B,R,5], boxes [B,R,4],
    image_mask [B,R] int64}, real [B,R] bool: the rows that hold a region).

    `empty(shape, dtype)` allocates every array (the loader's: the memory the device copy reads)."""
    counts = np.array([sum(stop - start for _, start, stop in parts) for parts in samples])
    size, regions = len(samples), int(counts.max())
    real = np.arange(regions) < counts[:, None]
    first = samples[0][0][0]
    width = first.features.shape[1]
    dtype = np.result_type(*{part[0].features.dtype for parts in samples for part in parts})
    padding = np.zeros((regions, width), dtype)
    features, spatials, boxes = [], [], []  # row blocks; features also take each sample's padding
    for parts, count in zip(samples, counts):
        for region, start, stop in parts:
            features.append(region.features[start:stop])
            spatials.append(region.spatials[start:stop])
            boxes.append(region.boxes[start:stop])
        if count < regions:
            features.append(padding[:regions - count])
    out = {"features": empty((size, regions, width), dtype)}
    np.concatenate(features, out=out["features"].reshape(-1, width))
    for name, blocks in (("spatials", spatials), ("boxes", boxes)):
        array = out[name] = empty((size, regions, blocks[0].shape[1]), np.result_type(*blocks))
        array[real] = np.concatenate(blocks)
        array[~real] = 0
    out["image_mask"] = empty((size, regions), np.int64)
    out["image_mask"][...] = real
    return out, real


def token_arrays(input_ids: np.ndarray, input_mask: np.ndarray, indices: np.ndarray, length: int,
                 segment_ids: np.ndarray = None) -> Dict[str, np.ndarray]:
    """input_ids, input_mask, segment_ids [len(indices), length]: the first `length` token positions."""
    segments = (np.zeros((len(indices), length), np.int64) if segment_ids is None
                else segment_ids[indices, :length])
    return {"input_ids": input_ids[indices, :length], "input_mask": input_mask[indices, :length],
            "segment_ids": segments}


def fill(out: dict, empty, values: Dict[str, np.ndarray]) -> None:
    """Copies each of `values` into a new array from `empty` (the loader's memory) under its name in `out`."""
    for name, array in values.items():
        out[name] = empty(array.shape, array.dtype)
        out[name][...] = array


def batch_tokens(lengths: np.ndarray) -> int:
    """The token positions a batch keeps: its longest text (at least 1)."""
    return max(int(lengths.max()), 1)


class EntriesCache:
    """One split's entry arrays in `<folder>/<stem>_<hash>.npz`, the hash over `key` (a JSON-able dict of all
    they depend on) and the size and mtime of `files` (the annotation files they are read from). Where `folder`
    cannot be written (a read-only data root), the file goes under the user's cache folder instead
    (`fileio.user_cache`, in a folder named by a hash of `folder`), as the feature cache does."""

    def __init__(self, folder, stem: str, key: dict, files: List[Path]):
        stats = [(Path(p).name, Path(p).stat().st_size, Path(p).stat().st_mtime_ns) for p in files]
        digest = hashlib.sha256(json.dumps({**key, "files": stats}, sort_keys=True).encode()).hexdigest()[:12]
        if not writable(folder):
            real = os.path.realpath(folder)
            name = f"{Path(real).parent.name}-{hashlib.sha256(real.encode()).hexdigest()[:12]}"  # the data root's
            folder = user_cache("entries") / name
        self.path = Path(folder) / f"{stem}_{digest}.npz"

    def load(self, names: Sequence[str], check=None):
        """The arrays, or None when there is no cache or it is unreadable or inconsistent (then it is rebuilt:
        a cache is never trusted). `check(arrays)` raises ValueError on arrays of the wrong shape."""
        if not self.path.is_file():
            return None
        try:
            with np.load(self.path, allow_pickle=False) as data:
                arrays = {name: data[name] for name in names}
            if check:
                check(arrays)
            return arrays
        except Exception as err:  # any unreadable cache is rebuilt, never trusted
            log.warning("Rebuilding the entries cache %s: it is unreadable (%s)", self.path, err)
            return None

    def save(self, arrays: Dict[str, np.ndarray]) -> None:
        with atomic_path(self.path) as tmp, open(tmp, "wb") as f:
            np.savez(f, **arrays)
