"""Bottom-up region features: the official LMDB files read as the official reader returns them, and a
decoded, memory-mapped cache of the same values for speed.

`ImageFeaturesReader` reads both official LMDB layouts, detected per record: vilbert_beta's (a pickled dict of
str fields, base64 float32 `boxes`/`features`; the files behind the 72.34) and 12-in-1's (ints and float32
numpy arrays). Where the official reader scans a list per lookup and opens LMDB once before DataLoader workers
fork, this one keeps a dict index and opens the LMDB in each process that reads it. Records are unpickled
with a whitelist of globals (dicts and numpy arrays only), so a downloaded file cannot run code.

`FeatureCache` (built by `build_feature_cache`, CLI `tools/build_feature_cache.py`) stores what the reader
returns, so lookups are slices of memory-mapped arrays. A float16 cache hands its features on as float16;
the model side casts each batch to float32 once. `open_features` picks a valid cache, else builds one
(`ensure_feature_cache`: float16, beside the LMDB or, when its folder is read-only, under the user's cache
folder; one process builds while others wait on a file lock), else reads the LMDB.

`stored_keys`, `read_stored`, `unpickle_record`, `record_layout` and `decode_record` expose the same steps record
by record, for what writes and audits LMDBs (`vilbert/feature_lmdb.py`) and reads 12-in-1's pickled .npy files.
"""

import binascii
import contextlib
import hashlib
import io
import json
import logging
import os
import shutil
import struct
import threading
import time
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Dict, List, NamedTuple, Optional, Union

import lmdb
import numpy as np

from pyutils.restricted_pickle import RestrictedUnpickler, feature_record_globals

from .fileio import atomic_path, file_lock, user_cache, writable
from .progress import progress as progress_bar
from .runtime import cpu_threads

FEATURE_DIM = 2048  # pool5_flat of the bottom-up ResNet-101 / ResNeXt-152 detectors
DOWNLOAD_HINT = "run `bash download_dataset.sh` (or point the features path at the LMDB folder)"
CACHE_SUFFIX = ".cache"
CACHE_MAGIC = b"VLBFEAT1"
CACHE_ALIGN = 64
CACHE_VERSION = 2  # 2: block checksums

log = logging.getLogger(__name__)


class FeaturesError(ValueError):
    """A features file that cannot be read: not an LMDB, incomplete, corrupt, or a stale cache."""


class StaleCache(FeaturesError):
    """A feature cache of another version of its LMDB, or written by an earlier version of this code: outdated,
    not damaged (the next run that builds caches replaces it)."""


class ImageNotInFeatures(KeyError):
    """An image id the features file does not hold."""

    def __str__(self):  # KeyError would show the message in quotes
        return self.args[0]


class RegionFeatures(NamedTuple):
    """One image's regions; row 0 is the whole image (the official "global" region)."""

    features: np.ndarray  # [n+1, 2048] float32 (float16 from a float16 cache); row 0 = mean of the n boxes
    spatials: np.ndarray  # [n+1, 5] float32: x1/W, y1/H, x2/W, y2/H, area/(W*H); row 0 = [0, 0, 1, 1, 1]
    boxes: np.ndarray  # [n+1, 4] float32, pixels x1y1x2y2; row 0 = [0, 0, W, H]
    num_boxes: int  # n + 1
    image_w: int
    image_h: int


def region_features(features: np.ndarray, boxes: np.ndarray, image_w: int, image_h: int) -> RegionFeatures:
    """The official reader's output for n stored boxes, with its float32 arithmetic in its order."""
    n = len(features)
    out_features = np.empty((n + 1, features.shape[1]), np.float32)
    out_features[0] = np.sum(features, axis=0) / n
    out_features[1:] = features
    location = np.zeros((n, 5), np.float32)
    location[:, :4] = boxes
    location[:, 4] = ((location[:, 3] - location[:, 1]) * (location[:, 2] - location[:, 0])
                      / (float(image_w) * float(image_h)))
    out_boxes = np.empty((n + 1, 4), np.float32)
    out_boxes[0] = (0, 0, image_w, image_h)
    out_boxes[1:] = location[:, :4]
    location[:, 0] /= float(image_w)
    location[:, 1] /= float(image_h)
    location[:, 2] /= float(image_w)
    location[:, 3] /= float(image_h)
    spatials = np.empty((n + 1, 5), np.float32)
    spatials[0] = (0, 0, 1, 1, 1)
    spatials[1:] = location
    return RegionFeatures(out_features, spatials, out_boxes, n + 1, int(image_w), int(image_h))


def _key(image_id) -> bytes:
    return str(image_id).encode()  # the official LMDB key


def _check_lmdb_dir(path: str) -> None:
    if not os.path.exists(path):
        raise FileNotFoundError(f"region features {path} not found; {DOWNLOAD_HINT}")
    if not os.path.isfile(os.path.join(path, "data.mdb")):
        raise FeaturesError(f"{path} is not an LMDB folder (no data.mdb in it); {DOWNLOAD_HINT}")


def lmdb_signature(path) -> Dict[str, int]:
    """Size and mtime of the LMDB's data.mdb: what a cache built from it must match."""
    path = os.fspath(path)
    _check_lmdb_dir(path)
    stat = os.stat(os.path.join(path, "data.mdb"))
    return {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns}


_RECORD_GLOBALS = feature_record_globals()

# The feature caches this process has checked against their checksums, or written, by `_file_identity`: the splits
# of a run share a cache, which is read whole once, not once per split (nor right after it was built).
_VERIFIED: set = set()


def unpickle_record(data: bytes, what: str):
    """`data` unpickled with only the globals a feature record needs (`feature_record_globals`), so a downloaded
    file cannot run code; any failure is a `FeaturesError` naming `what`."""
    try:
        return RestrictedUnpickler(io.BytesIO(data), what, _RECORD_GLOBALS, "not part of a feature record").load()
    except Exception as err:
        raise FeaturesError(f"{what} is corrupt: cannot unpickle it ({type(err).__name__}: {err})") from None


# py-lmdb refuses to open the same LMDB files twice in one process, and an environment still open when the
# process forks stays registered in the child, which then cannot open its own (and must not use the parent's).
# So this module keeps one environment per LMDB and process, and closes them all right before every fork
# (DataLoader workers); the next read reopens. The lock keeps a fork from closing an environment mid-read.
_ENVIRONMENTS: Dict[str, tuple] = {}  # realpath -> (identity of data.mdb, environment)
_ENVIRONMENTS_LOCK = threading.Lock()


def _file_identity(path) -> tuple:
    """(device, inode, size, mtime): what changes when a file is replaced or rewritten."""
    stat = os.stat(path)
    return stat.st_dev, stat.st_ino, stat.st_size, stat.st_mtime_ns


def _lmdb_identity(path: str) -> tuple:
    return _file_identity(os.path.join(path, "data.mdb"))


def _environment(path: str, identity: tuple) -> "lmdb.Environment":
    """This process's environment of the LMDB folder `path` (a realpath); the caller holds the lock."""
    opened, env = _ENVIRONMENTS.get(path, (None, None))
    if opened != identity:  # not open yet, or the files were replaced since
        if env is not None:
            env.close()
        try:
            env = lmdb.open(path, readonly=True, lock=False, readahead=False, meminit=False)
        except lmdb.Error as err:
            raise FeaturesError(f"{path} cannot be opened as an LMDB ({err}); {DOWNLOAD_HINT}") from None
        # A truncated data.mdb is still mapped, and the first read past its end kills the process (SIGBUS).
        needed = (env.info()["last_pgno"] + 1) * env.stat()["psize"]
        if identity[2] < needed:
            env.close()
            raise FeaturesError(f"{path}/data.mdb is truncated ({identity[2]:,} bytes, the database needs "
                                f"{needed:,}): the download was probably interrupted; {DOWNLOAD_HINT}")
        _ENVIRONMENTS[path] = (identity, env)
    return env


def _read_lmdb(path: str, identity: tuple, key: bytes) -> Optional[bytes]:
    """The value of `key`, from this process's environment of the LMDB folder `path` (a realpath)."""
    with _ENVIRONMENTS_LOCK, _damage_named(path), _environment(path, identity).begin() as txn:
        return txn.get(key)


def stored_keys(path) -> List[bytes]:
    """Every key the LMDB folder `path` holds, b'keys' included, in LMDB order: what an audit walks."""
    path = os.fspath(path)
    _check_lmdb_dir(path)
    real = os.path.realpath(path)
    with _ENVIRONMENTS_LOCK, _damage_named(real), _environment(real, _lmdb_identity(path)).begin() as txn:
        return list(txn.cursor().iternext(keys=True, values=False))


@contextlib.contextmanager
def _damage_named(path: str):
    """A page LMDB finds damaged (MDB_CORRUPTED, MDB_PAGE_NOTFOUND, ...) as one error naming the folder."""
    try:
        yield
    except lmdb.Error as err:
        raise FeaturesError(f"{path} is damaged ({type(err).__name__}: {err}); {DOWNLOAD_HINT}") from None


def read_stored(path, key: bytes) -> Optional[bytes]:
    """The raw value of `key` in the LMDB folder `path`, None when there is none."""
    path = os.fspath(path)
    _check_lmdb_dir(path)
    return _read_lmdb(os.path.realpath(path), _lmdb_identity(path), key)


def _close_environments_before_fork() -> None:
    _ENVIRONMENTS_LOCK.acquire()
    for _, env in _ENVIRONMENTS.values():
        env.close()
    _ENVIRONMENTS.clear()


os.register_at_fork(before=_close_environments_before_fork, after_in_parent=_ENVIRONMENTS_LOCK.release,
                    after_in_child=_ENVIRONMENTS_LOCK.release)


class _KeyedStore:
    """What both readers share: the official key list, in file order, and lookups by image id."""

    _keys: List[bytes]
    _positions: Dict[bytes, int]  # key -> its index in _keys

    def __len__(self) -> int:
        return len(self._keys)

    def __contains__(self, image_id) -> bool:
        return _key(image_id) in self._positions

    @property
    def image_ids(self) -> List[int]:
        return [int(k) for k in self._keys]

    def keys(self) -> List[bytes]:
        """The raw LMDB keys, in file order (the official reader's `keys()`)."""
        return list(self._keys)


class ImageFeaturesReader(_KeyedStore):
    """`reader[image_id] -> RegionFeatures` from an official LMDB folder (beta or 12-in-1 records)."""

    dtype = np.dtype(np.float32)  # of the features handed on

    def __init__(self, path):
        self.path = os.fspath(path)
        _check_lmdb_dir(self.path)
        self._lmdb = os.path.realpath(self.path), _lmdb_identity(self.path)
        raw = _read_lmdb(*self._lmdb, b"keys")
        if raw is None:
            raise FeaturesError(
                f"{self.path} has no b'keys' record, which the official conversion writes last: the conversion "
                f"or download was probably interrupted; convert or download it again")
        keys = unpickle_record(raw, f"the b'keys' record of {self.path}")
        if not isinstance(keys, list):
            raise FeaturesError(f"the b'keys' record of {self.path} is corrupt: a {type(keys).__name__}, not a list")
        self._keys: List[bytes] = [k.encode() if isinstance(k, str) else bytes(k) for k in keys]
        self._positions = {k: i for i, k in enumerate(self._keys)}

    def __getitem__(self, image_id) -> RegionFeatures:
        key = _key(image_id)
        if key not in self._positions:
            raise ImageNotInFeatures(f"image id {image_id} not in {self.path}; the features do not cover this split?")
        raw = _read_lmdb(*self._lmdb, key)
        what = f"the record of image id {image_id} in {self.path}"
        if raw is None:
            raise FeaturesError(f"{what} is listed in b'keys' but missing: the LMDB is incomplete; download it again")
        return decode_record(unpickle_record(raw, what), what)


def record_layout(item: dict) -> str:
    """'mt' for a 12-in-1 record (numpy arrays), 'beta' for a vilbert_beta one (str fields, base64 arrays)."""
    return "mt" if isinstance(item.get("features"), np.ndarray) else "beta"


def decode_record(item, what: str) -> RegionFeatures:
    """A beta (str + base64) or 12-in-1 (ints + arrays) record -> RegionFeatures."""
    if not isinstance(item, dict):
        raise FeaturesError(f"{what} is corrupt: a {type(item).__name__}, not a dict")
    missing = [f for f in ("image_w", "image_h", "boxes", "features") if f not in item]
    if missing:
        raise FeaturesError(f"{what} is corrupt: no field {missing[0]!r} (fields: {sorted(item)})")
    try:
        image_w, image_h = int(item["image_w"]), int(item["image_h"])
    except (TypeError, ValueError):
        raise FeaturesError(f"{what} is corrupt: image_w/image_h {item['image_w']!r}/{item['image_h']!r} "
                            f"are not integers") from None
    if record_layout(item) == "mt":  # 12-in-1: the box count is the array's
        features = _array(item["features"], FEATURE_DIM, "features", what)
        boxes = _array(item["boxes"], 4, "boxes", what)
        if len(boxes) != len(features):
            raise FeaturesError(f"{what} is corrupt: {len(boxes)} boxes but {len(features)} feature rows")
    else:  # vilbert_beta: str fields, base64 float32 arrays of `num_boxes` rows
        try:
            num_boxes = int(item["num_boxes"])
        except (KeyError, TypeError, ValueError):
            raise FeaturesError(f"{what} is corrupt: num_boxes {item.get('num_boxes')!r} is not an integer") from None
        features = _base64_array(item["features"], num_boxes, FEATURE_DIM, "features", what)
        boxes = _base64_array(item["boxes"], num_boxes, 4, "boxes", what)
    if len(features) == 0:
        raise FeaturesError(f"{what} has no boxes (its mean feature would be NaN)")
    if image_w <= 0 or image_h <= 0:
        raise FeaturesError(f"{what} is corrupt: image size {image_w}x{image_h}")
    return region_features(features, boxes, image_w, image_h)


def _array(value, width: int, field: str, what: str) -> np.ndarray:
    if not isinstance(value, np.ndarray) or value.size % width:
        shape = getattr(value, "shape", type(value).__name__)
        raise FeaturesError(f"{what} is corrupt: field {field!r} ({shape}) is not an array of rows of {width}")
    return np.asarray(value, np.float32).reshape(-1, width)


def _base64_array(value, rows: int, width: int, field: str, what: str) -> np.ndarray:
    try:
        data = binascii.a2b_base64(value)  # what base64.b64decode does, without its argument copying
    except (binascii.Error, TypeError, ValueError) as err:
        raise FeaturesError(f"{what} is corrupt: field {field!r} is not base64 ({err})") from None
    if len(data) != rows * width * 4:
        raise FeaturesError(f"{what} is corrupt or truncated: field {field!r} holds {len(data)} bytes, expected "
                            f"{rows} x {width} float32 = {rows * width * 4}")
    return np.frombuffer(data, np.float32).reshape(rows, width)


# ---------------------------------------------------------------------------------------------------------
# Decoded cache: one file, written atomically.
#   [magic 8 B][header offset u64][header length u64][header crc32 u32][pad to 64]
#   features [rows, 2048] (float32 or float16) | spatials [rows, 5] f32 | boxes [rows, 4] f32 |
#   index [images, 4] int64 (first row, row count, image_w, image_h)      (each array 64-byte aligned)
#   header: JSON {version, source signature, keys, arrays: {name: [offset, dtype, shape]},
#                 checksums: {block: bytes, crc32: [one per block of the bytes from 64 to the header]}}
# ---------------------------------------------------------------------------------------------------------
CHECKSUM_BLOCK = 4 << 20  # 4 MiB: about 28 images of 36 regions in float16, the finest a damage report names


def default_cache_path(lmdb_path) -> Path:
    """Where `build_feature_cache` writes and `open_features` looks: next to the LMDB folder."""
    return Path(os.path.normpath(os.fspath(lmdb_path)) + CACHE_SUFFIX)


def build_feature_cache(lmdb_path, out=None, *, float16: bool = False, progress: bool = True) -> Path:
    """Decode every record of the LMDB once into a cache file; returns its path."""
    reader = ImageFeaturesReader(lmdb_path)
    if not len(reader):
        raise FeaturesError(f"{reader.path} lists no images: nothing to cache")
    out = Path(out) if out else default_cache_path(lmdb_path)
    dtype = np.dtype(np.float16 if float16 else np.float32)
    _check_disk_space(reader, out, dtype)
    keys = progress_bar(reader.keys(), f"Caching {os.path.basename(reader.path)}", enabled=progress, unit="images")
    regions = ((key.decode(), reader[key.decode()]) for key in keys)
    return write_feature_cache(out, regions, float16=float16, source=lmdb_signature(lmdb_path),
                               source_path=reader.path)


def write_feature_cache(out, regions, *, float16: bool, source: dict, source_path: str) -> Path:
    """Write the cache of `regions`, (image id, RegionFeatures) pairs in the LMDB's key order, atomically to `out`,
    with the checksum of every `CHECKSUM_BLOCK` bytes."""
    dtype = np.dtype(np.float16 if float16 else np.float32)
    keys, index, spatials, boxes, rows = [], [], [], [], 0
    with atomic_path(out) as tmp, open(tmp, "wb") as f:
        writer = _ChecksummedWriter(f)
        for key, region in regions:
            if not np.isfinite(region.features).all():
                raise FeaturesError(f"image id {key} of {source_path} has NaN or infinite features: the LMDB is "
                                    f"damaged there; extract that image again (tools/convert_features.py)")
            with np.errstate(over="ignore"):  # checked just below
                features = region.features.astype(dtype)
            if float16 and not np.isfinite(features).all():
                raise FeaturesError(f"image id {key} has features beyond the float16 range; "
                                    f"build the cache without --float16")
            writer.write(features)
            keys.append(key)
            spatials.append(region.spatials)
            boxes.append(region.boxes)
            index.append((rows, region.num_boxes, region.image_w, region.image_h))
            rows += region.num_boxes
        arrays = {"features": [CACHE_ALIGN, dtype.str, [rows, FEATURE_DIM]]}
        for name, array in (("spatials", np.concatenate(spatials)), ("boxes", np.concatenate(boxes)),
                            ("index", np.asarray(index, np.int64).reshape(-1, 4))):
            writer.write(bytes(-f.tell() % CACHE_ALIGN))
            arrays[name] = [f.tell(), array.dtype.str, list(array.shape)]
            writer.write(np.ascontiguousarray(array))
        header = json.dumps({"version": CACHE_VERSION, "source": source, "source_path": source_path, "keys": keys,
                             "arrays": arrays, "checksums": writer.checksums()}).encode()
        header_offset = f.tell()
        f.write(header)
        f.seek(0)
        f.write(CACHE_MAGIC + struct.pack("<QQI", header_offset, len(header), zlib.crc32(header)))
        f.flush()
        os.fsync(f.fileno())
    _VERIFIED.add(_file_identity(out))  # its checksums were taken from the bytes written
    return Path(out)


class _ChecksummedWriter:
    """Appends to a cache file from byte 64 on, taking the crc32 of every `CHECKSUM_BLOCK` bytes as they pass."""

    def __init__(self, f):
        self.f, self.done, self.crc, self.filled = f, [], 0, 0
        f.write(bytes(CACHE_ALIGN))

    def write(self, data) -> None:
        view = memoryview(data).cast("B")
        self.f.write(view)
        while len(view):
            take = min(len(view), CHECKSUM_BLOCK - self.filled)
            self.crc, self.filled, view = zlib.crc32(view[:take], self.crc), self.filled + take, view[take:]
            if self.filled == CHECKSUM_BLOCK:
                self.done.append(self.crc)
                self.crc, self.filled = 0, 0

    def checksums(self) -> dict:
        return {"block": CHECKSUM_BLOCK, "crc32": self.done + ([self.crc] if self.filled else [])}


def _ranges(pairs: list) -> str:
    """[(a, b), ...] as "a-b, c-d" (the first three, then "...")."""
    return ", ".join(f"{a:,}-{b:,}" for a, b in pairs[:3]) + (", ..." if len(pairs) > 3 else "")


def _crc32_of(f, start: int, end: int) -> int:
    """The crc32 of bytes [start, end) of the open file `f`, read in 1 MiB pieces (both steps release the GIL)."""
    crc, piece = 0, bytearray(1 << 20)
    with memoryview(piece) as view:
        while start < end:
            count = os.preadv(f.fileno(), [view[:min(len(piece), end - start)]], start)
            if not count:
                raise FeaturesError(f"feature cache {f.name} ends at byte {start:,}, before its header: it was "
                                    f"truncated while being read; rebuild it")
            crc, start = zlib.crc32(view[:count], crc), start + count
    return crc


def _check_disk_space(reader: ImageFeaturesReader, out: Path, dtype: np.dtype) -> None:
    """Refuses to start a cache that will not fit. Its size is estimated from the boxes of up to 64 records
    spread over the LMDB (the record sizes say little: beta's are base64 with class scores), plus 10%."""
    keys = reader.keys()
    sample = keys[::max(1, len(keys) // 64)]
    rows = sum(reader[key.decode()].num_boxes for key in sample) / len(sample) * len(keys)
    needed = int(1.1 * (rows * (FEATURE_DIM * dtype.itemsize + 36) + len(keys) * 48)) + (1 << 20)
    out.parent.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(out.parent).free
    if free < needed:
        raise FeaturesError(f"not enough disk space for the feature cache {out}: it needs about {byte_size(needed)} "
                            f"and {out.parent} has {byte_size(free)} free; free some space, or read the LMDB "
                            f"directly, more slowly, with --no-build_feature_cache")


def byte_size(count: int) -> str:
    """A byte count as people read it: 3.2 GiB, 45.0 MiB, 812 KiB (never "0.0 GiB")."""
    for unit, scale in (("GiB", 2 ** 30), ("MiB", 2 ** 20)):
        if count >= scale:
            return f"{count / scale:.1f} {unit}"
    return f"{count / 1024:.0f} KiB"


class FeatureCache(_KeyedStore):
    """`cache[image_id] -> RegionFeatures` from a cache file; the same interface as `ImageFeaturesReader`.

    With `source` (the LMDB folder it was built from), a cache whose source has changed since is refused. With
    `verify`, every block's checksum is checked first (once per process and file: `_VERIFIED`), so a damaged
    cache is refused by name, never read.
    """

    def __init__(self, path, source=None, verify: bool = True):
        self.path = os.fspath(path)
        self._rebuild = f"delete it or rebuild it: python tools/build_feature_cache.py {source or 'LMDB_DIR'}"
        header = self._read_header()
        if source is not None and header["source"] != lmdb_signature(source):
            raise StaleCache(f"feature cache {self.path} is stale: {source} changed since it was built "
                             f"(data.mdb size/mtime {header['source']} vs now {lmdb_signature(source)}); "
                             f"{self._rebuild}")
        self._keys = [k.encode() for k in header["keys"]]
        self._arrays_spec, self._checksums = header["arrays"], header["checksums"]
        self._positions = {k: i for i, k in enumerate(self._keys)}
        self.dtype = np.dtype(self._arrays_spec["features"][1])
        self._pid, self._mapped = None, None
        if verify:
            self.verify()
        self._index = self._map("index").copy()
        if len(self._index) != len(self._keys):
            raise FeaturesError(f"feature cache {self.path} is corrupt: {len(self._index)} index rows for "
                                f"{len(self._keys)} keys; {self._rebuild}")

    def _read_header(self) -> dict:
        size = os.path.getsize(self.path)
        with open(self.path, "rb") as f:
            preamble = f.read(28)
            if len(preamble) < 28 or preamble[:8] != CACHE_MAGIC:
                raise FeaturesError(f"{self.path} is not a feature cache of this version (bad magic); {self._rebuild}")
            offset, length, crc = struct.unpack("<QQI", preamble[8:])
            if offset + length != size:
                raise FeaturesError(f"feature cache {self.path} is truncated or corrupt "
                                    f"({size} bytes, header says {offset + length}); {self._rebuild}")
            f.seek(offset)
            raw = f.read(length)
        try:
            header = json.loads(raw)
        except ValueError:
            header = None
        if not isinstance(header, dict):
            raise FeaturesError(f"feature cache {self.path} has a corrupt header; {self._rebuild}")
        if header.get("version") != CACHE_VERSION:
            raise StaleCache(f"feature cache {self.path} has version {header.get('version')}, this code reads "
                             f"{CACHE_VERSION}; {self._rebuild}")
        if zlib.crc32(raw) != crc:
            raise FeaturesError(f"feature cache {self.path} has a damaged header (its checksum differs); "
                                f"{self._rebuild}")
        for name, (start, dtype, shape) in header["arrays"].items():
            if start + np.dtype(dtype).itemsize * int(np.prod(shape)) > offset:
                raise FeaturesError(f"feature cache {self.path} is corrupt: array {name} overruns the file; "
                                    f"{self._rebuild}")
        self._data_end = offset
        return header

    def verify(self) -> None:
        """Raises FeaturesError naming what is damaged if any block's checksum differs (reads the whole file, on
        `cpu_threads()` threads: at the speed of the page cache or of the disk)."""
        identity = _file_identity(self.path)
        if identity in _VERIFIED:
            return
        damage = self.damage()
        if damage:
            raise FeaturesError(f"feature cache {self.path} is damaged: {damage}; {self._rebuild}")
        _VERIFIED.add(identity)

    def damage(self) -> "str | None":
        """Which blocks fail their checksum and what they hold (the images whose features are there, the other
        arrays); None when every block matches."""
        block, expected = self._checksums["block"], self._checksums["crc32"]
        if len(expected) != -(-(self._data_end - CACHE_ALIGN) // block):
            return f"its header lists {len(expected)} checksums for {self._data_end - CACHE_ALIGN:,} bytes"
        spans = [(start, min(start + block, self._data_end))
                 for start in range(CACHE_ALIGN, self._data_end, block)]
        with open(self.path, "rb") as f, ThreadPoolExecutor(cpu_threads()) as pool:
            found = list(pool.map(lambda span: _crc32_of(f, *span), spans))
        bad = [span for span, crc, want in zip(spans, found, expected) if crc != want]
        if not bad:
            return None
        held = self._held_in(bad)
        return (f"{len(bad)} of its {len(spans)} blocks of {byte_size(block)} fail their checksum (bytes "
                f"{_ranges(bad)}), holding {held}")

    def _held_in(self, spans: list) -> str:
        """What byte `spans` of the file hold: the image ids whose features are there, and the other arrays."""
        parts, arrays = [], []
        start, dtype, (rows, width) = self._arrays_spec["features"]
        row_bytes = np.dtype(dtype).itemsize * width
        first_rows = [(max(a - start, 0) // row_bytes, -(-(min(b, start + rows * row_bytes) - start) // row_bytes))
                      for a, b in spans if a < start + rows * row_bytes]
        for name, (offset, kind, shape) in self._arrays_spec.items():
            end = offset + np.dtype(kind).itemsize * int(np.prod(shape))
            if name != "features" and any(a < end and b > offset for a, b in spans):
                arrays.append(name)
        if first_rows:
            if "index" in arrays:
                parts.append(f"features rows {_ranges(first_rows)}")
            else:
                index = self._map("index")
                starts, counts = index[:, 0], index[:, 1]
                hit = np.zeros(len(index), bool)
                for low, high in first_rows:
                    hit |= (starts < high) & (starts + counts > low)
                ids = [self._keys[i].decode() for i in np.flatnonzero(hit)]
                parts.append(f"the features of {len(ids):,} image(s) (ids {', '.join(ids[:5])}"
                             f"{', ...' if len(ids) > 5 else ''})")
        if arrays:
            parts.append(f"the {', '.join(arrays)} array(s)")
        return " and ".join(parts)

    def _map(self, name: str) -> np.ndarray:
        start, dtype, shape = self._arrays_spec[name]
        if 0 in shape:
            return np.empty(shape, dtype)
        mapped = np.memmap(self.path, dtype=dtype, mode="r", offset=start, shape=tuple(shape))
        return mapped.view(np.ndarray)  # slices of a plain ndarray skip np.memmap's Python-level __getitem__

    def _arrays(self):
        """This process's memory maps (re-opened after fork or unpickling, never pickled)."""
        if self._pid != os.getpid():
            self._mapped = tuple(self._map(name) for name in ("features", "spatials", "boxes"))
            self._pid = os.getpid()
        return self._mapped

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_pid"], state["_mapped"] = None, None
        return state

    def __getitem__(self, image_id) -> RegionFeatures:
        position = self._positions.get(_key(image_id))
        if position is None:
            raise ImageNotInFeatures(f"image id {image_id} not in {self.path}; the features do not cover this split?")
        start, count, image_w, image_h = self._index[position].tolist()
        features, spatials, boxes = self._arrays()
        rows = slice(start, start + count)
        return RegionFeatures(features[rows], spatials[rows], boxes[rows], count, image_w, image_h)


FeatureReader = Union[ImageFeaturesReader, FeatureCache]


def fallback_cache_path(lmdb_path) -> Path:
    """Where the cache of an LMDB in a read-only folder goes: `$XDG_CACHE_HOME` (default ~/.cache)
    /vilbert-paddle/features/<LMDB folder name>-<hash of its real path>.cache."""
    real = os.path.realpath(os.fspath(lmdb_path))
    digest = hashlib.sha256(real.encode()).hexdigest()[:12]
    return user_cache("features") / f"{os.path.basename(real)}-{digest}{CACHE_SUFFIX}"


def ensure_feature_cache(lmdb_path, progress: bool = True) -> Path:
    """The path of a valid float16 cache of the LMDB, built first if there is none or it is stale.

    Built beside the LMDB when its folder is writable, else at `fallback_cache_path`. Processes that start
    together (several runs, the ranks of a machine, or those of every node when the folder is on a shared
    filesystem with locks) take a file lock (`file_lock`): the first builds, the others wait and then read what
    it built; the file appears only complete (atomic rename).
    """
    lmdb_path = os.fspath(lmdb_path)
    ImageFeaturesReader(lmdb_path)  # data.mdb there and readable: its error comes before any "Building ..." line
    beside = default_cache_path(lmdb_path)
    target = beside if writable(beside.parent) else fallback_cache_path(lmdb_path)
    with file_lock(target.with_name(f".{target.name}.lock"),
                   waiting=f"Waiting for another process to finish building {target} ..."):
        try:
            FeatureCache(target, source=lmdb_path)
            return target  # built by another process while this one waited
        except FileNotFoundError:
            reason = "once; later runs reuse it"
        except FeaturesError as err:
            reason = f"again: {err}"
        print(f"Building the float16 feature cache of {lmdb_path} at {target} ({reason})", flush=True)
        started = time.time()
        build_feature_cache(lmdb_path, target, float16=True, progress=progress)
        print(f"Built {target} ({target.stat().st_size / 2**30:.2f} GiB) in {time.time() - started:.0f} s", flush=True)
    return target


def open_features(path, cache: Union[bool, str, os.PathLike, None] = True, build: bool = False) -> FeatureReader:
    """The features of the LMDB folder `path`: from a valid decoded cache when there is one, else the LMDB.

    cache=True looks for the cache next to the LMDB (`<path>.cache`), then at `fallback_cache_path`; with
    build=True a missing or stale one is built (`ensure_feature_cache`), else the LMDB is read, with a warning
    if a cache is stale or corrupt. A cache path given explicitly must exist and be valid; cache=False or None
    always reads the LMDB.
    """
    path = os.fspath(path)
    if not cache:
        return ImageFeaturesReader(path)
    if cache is not True:
        if not os.path.exists(cache):
            raise FileNotFoundError(f"feature cache {cache} not found; build it with "
                                    f"`python tools/build_feature_cache.py {path} --out {cache}`")
        return FeatureCache(cache, source=path)
    problem = None
    for cache_path in (default_cache_path(path), fallback_cache_path(path)):
        if cache_path.exists():
            try:
                return FeatureCache(cache_path, source=path)
            except FeaturesError as err:
                problem = err
    if build:
        return FeatureCache(ensure_feature_cache(path), source=path)
    if problem:
        log.warning("%s. Reading the LMDB instead.", problem)
    return ImageFeaturesReader(path)
