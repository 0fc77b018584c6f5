"""Region-feature LMDBs written and audited, and the feature extractor each checkpoint family was trained on.

`encode_record` makes the LMDB value of one image in either official layout: vilbert_beta's (the `csv.DictReader`
row of a bottom-up-attention TSV: str fields, base64 float32 arrays, `cls_prob` or None) or 12-in-1's (what its
`script/convert_to_lmdb.py` stores: ints and float32 numpy arrays). `write_feature_lmdb` builds a whole LMDB
(the demo data) or appends to one (tools/convert_features.py), always atomically, with b'keys' written last as
the official converters do. `audit_feature_lmdb` reads every record back through `vilbert.features` and lists
what would break or mislead a reader (tools/audit_features.py, `download_dataset.sh --check`).

A checkpoint only works well on the features it was trained with: `EXTRACTORS` says which those are, and
`extractor_warnings` what predict.py warns about when the features at hand do not look like them.
"""

import base64
import os
import pickle
import shutil
import time
from collections import Counter
from pathlib import Path
from typing import Dict, Iterable, List, NamedTuple, Optional, Tuple

import lmdb
import numpy as np

from .features import (FEATURE_DIM, FeatureCache, FeaturesError, StaleCache, byte_size, decode_record,
                       default_cache_path, fallback_cache_path, read_stored, record_layout, stored_keys,
                       unpickle_record)
from .progress import progress as progress_bar

LAYOUT_NAMES = {"beta": "vilbert_beta (str fields, base64 float32)", "mt": "12-in-1 (ints, float32 numpy arrays)"}
MAP_SIZE = 1 << 40  # address space, as the official converters reserve; data.mdb grows only as it is written
COMMIT_BYTES = 64 << 20  # values per write transaction, so memory stays bounded


class BadRecord(FeaturesError):
    """One image's regions that cannot be stored: the message names the file (and line) and the field."""


class ImageRegions(NamedTuple):
    """One image's regions as an extractor gives them (no whole-image row: the readers add it)."""

    image_id: int
    image_w: int
    image_h: int
    boxes: np.ndarray  # [N, 4] float32, pixels x1y1x2y2
    features: np.ndarray  # [N, 2048] float32
    cls_prob: Optional[np.ndarray] = None  # [N, C] float32 class probabilities; only beta records keep them
    # The arrays' base64 text as a TSV row holds it (boxes, features, cls_prob): beta records store it as it is,
    # as the official conversion does, instead of encoding the arrays again. Only set by the TSV reader.
    base64: Optional[Dict[str, str]] = None


def check_regions(regions: ImageRegions, what: str) -> None:
    """Raises BadRecord unless the regions can be read back and mean something: at least one box, 2048-d
    features, one feature row per box, finite values, every box inside the image (x1 <= x2, y1 <= y2)."""
    boxes, features = regions.boxes, regions.features
    if regions.image_w <= 0 or regions.image_h <= 0:
        raise BadRecord(f"{what}: fields 'image_w'/'image_h' give an image of {regions.image_w}x{regions.image_h}")
    if boxes.ndim != 2 or boxes.shape[1] != 4:
        raise BadRecord(f"{what}: field 'boxes' has shape {boxes.shape}, expected [N, 4] (x1, y1, x2, y2 in pixels)")
    if not len(boxes):
        raise BadRecord(f"{what}: field 'boxes' is empty; an image needs at least one box")
    if features.ndim != 2 or features.shape[1] != FEATURE_DIM:
        raise BadRecord(f"{what}: field 'features' has shape {features.shape}, expected [N, {FEATURE_DIM}] "
                        f"(the detector's 2048-d pooled region features)")
    if len(features) != len(boxes):
        raise BadRecord(f"{what}: field 'features' has {len(features)} rows for {len(boxes)} boxes")
    for field, array in (("boxes", boxes), ("features", features)):
        bad = ~np.isfinite(array).all(axis=1)
        if bad.any():
            raise BadRecord(f"{what}: field {field!r} holds NaN or inf in {int(bad.sum())} of {len(array)} rows "
                            f"(first: row {int(np.argmax(bad))})")
    outside = _boxes_outside(boxes, regions.image_w, regions.image_h)
    if outside.any():
        first = int(np.argmax(outside))
        raise BadRecord(f"{what}: field 'boxes' has {int(outside.sum())} box(es) outside the "
                        f"{regions.image_w}x{regions.image_h} image or inverted (first: row {first}, "
                        f"{[round(float(v), 2) for v in boxes[first]]})")


def _boxes_outside(boxes: np.ndarray, image_w: float, image_h: float) -> np.ndarray:
    x1, y1, x2, y2 = boxes.T
    return (x1 < 0) | (y1 < 0) | (x2 > image_w) | (y2 > image_h) | (x1 > x2) | (y1 > y2)


def encode_record(regions: ImageRegions, layout: str) -> bytes:
    """The LMDB value of one image, as the official conversion of that layout stores it."""
    boxes = np.ascontiguousarray(regions.boxes, np.float32)
    features = np.ascontiguousarray(regions.features, np.float32)
    if layout == "mt":
        record = {"image_id": regions.image_id, "image_h": regions.image_h, "image_w": regions.image_w,
                  "num_boxes": len(boxes), "boxes": boxes, "features": features}
    elif layout == "beta":
        text = regions.base64 or {}
        cls_prob = text.get("cls_prob") or (None if regions.cls_prob is None else _b64(regions.cls_prob))
        record = {"image_id": str(regions.image_id), "image_w": str(regions.image_w),
                  "image_h": str(regions.image_h), "num_boxes": str(len(boxes)),
                  "boxes": text.get("boxes") or _b64(boxes), "features": text.get("features") or _b64(features),
                  "cls_prob": cls_prob}
    else:
        raise ValueError(f"layout={layout!r} must be one of {tuple(LAYOUT_NAMES)}")
    return pickle.dumps(record)


def _b64(array: np.ndarray) -> str:
    return base64.b64encode(np.ascontiguousarray(array, np.float32).tobytes()).decode("ascii")


class FeatureLMDBWriter:
    """`with FeatureLMDBWriter(path) as out: out.put(image_id, value)`: stores records in the LMDB folder `path`.

    Without `append` the result holds exactly the records put (an existing LMDB is replaced); with it, they
    join the images already there, and an image id already there is refused unless `overwrite` (its record is
    then replaced and keeps its place in b'keys'). The new data.mdb is built beside `path` (appending starts
    from a copy) and renamed into place when the block ends without an error, so a crash or an error leaves
    the old LMDB as it was and a reader sees the old or the new one, never a mix. `written` counts the
    records put, `keys` lists the image ids the LMDB holds.
    """

    def __init__(self, path, *, append: bool = False, overwrite: bool = False):
        self.path, self.append, self.overwrite = Path(path), append, overwrite
        self.tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
        self.keys: List[bytes] = []
        self.written = 0
        self._env = None

    def __enter__(self) -> "FeatureLMDBWriter":
        path = self.path
        if path.exists() and not (path / "data.mdb").is_file() and any(path.iterdir()):
            raise FeaturesError(f"{path} exists and is not an LMDB folder (no data.mdb); not writing into it")
        shutil.rmtree(self.tmp, ignore_errors=True)
        self.tmp.mkdir(parents=True)
        try:
            if self.append and (path / "data.mdb").is_file():
                self.keys = _listed_keys(path)
                shutil.copyfile(path / "data.mdb", self.tmp / "data.mdb")
            # writemap: values go straight into the mapped file, a quarter of the CPU time of copied pages; LMDB
            # then sizes the file to the whole map (sparse), so it is cut to the pages in use at the end.
            self._env = lmdb.open(str(self.tmp), map_size=MAP_SIZE, writemap=True)
        except BaseException:
            self._discard()
            raise
        self._listed, self._given, self._pending = set(self.keys), set(), 0
        self._txn = self._env.begin(write=True)
        return self

    def put(self, image_id, value: bytes) -> None:
        key = str(image_id).encode()
        if key in self._given:
            raise BadRecord(f"image id {image_id} is given twice in the inputs; each image needs its own id")
        if key in self._listed and not self.overwrite:
            raise BadRecord(f"image id {image_id} is already in {self.path}; give --overwrite to replace its "
                            f"regions, or leave it out")
        self._txn.put(key, value)
        self._given.add(key)
        if key not in self._listed:
            self.keys.append(key)
            self._listed.add(key)
        self.written, self._pending = self.written + 1, self._pending + len(value)
        if self._pending > COMMIT_BYTES:
            self._txn.commit()
            self._pending, self._txn = 0, self._env.begin(write=True)

    def __exit__(self, error_type, error, traceback) -> bool:
        if error_type is not None:
            self._txn.abort()
            self._discard()
            return False
        try:
            self._txn.put(b"keys", pickle.dumps(self.keys))
            self._txn.commit()
            used = (self._env.info()["last_pgno"] + 1) * self._env.stat()["psize"]
            self._env.close()
            self._env = None
            with open(self.tmp / "data.mdb", "r+b") as f:
                f.truncate(used)
                os.fsync(f.fileno())
            if not self.path.exists():
                os.replace(self.tmp, self.path)
                return False
            os.replace(self.tmp / "data.mdb", self.path / "data.mdb")  # one rename: the commit point
            if not (self.path / "lock.mdb").exists():
                os.replace(self.tmp / "lock.mdb", self.path / "lock.mdb")
            shutil.rmtree(self.tmp)
        except BaseException:
            self._discard()
            raise
        return False

    def _discard(self) -> None:
        if self._env is not None:
            self._env.close()
            self._env = None
        shutil.rmtree(self.tmp, ignore_errors=True)


def write_feature_lmdb(path, records: Iterable[Tuple[int, bytes]], *, append: bool = False,
                       overwrite: bool = False) -> Tuple[int, int]:
    """`FeatureLMDBWriter` over (image_id, value) records (an error raised by `records` also leaves the old
    LMDB as it was); returns (records written, images the LMDB lists)."""
    with FeatureLMDBWriter(path, append=append, overwrite=overwrite) as out:
        for image_id, value in records:
            out.put(image_id, value)
    return out.written, len(out.keys)


def _listed_keys(path: Path) -> List[bytes]:
    raw = read_stored(path, b"keys")
    if raw is None:
        raise FeaturesError(f"{path} has no b'keys' record (an interrupted conversion?), so its images are not "
                            f"known; convert into a new LMDB instead")
    return [k.encode() if isinstance(k, str) else bytes(k) for k in unpickle_record(raw, f"the b'keys' of {path}")]


def lmdb_layout(path) -> Optional[str]:
    """The layout of the first image listed in the LMDB folder `path`, None when it lists none."""
    keys = _listed_keys(Path(path))
    raw = read_stored(path, keys[0]) if keys else None
    return None if raw is None else record_layout(unpickle_record(raw, f"the record of {keys[0]!r} in {path}"))


# ---------------------------------------------------------------------------------------------------------
# Audit
# ---------------------------------------------------------------------------------------------------------
class Audit(NamedTuple):
    path: str
    layouts: Dict[str, int]  # layout -> records in it
    listed: int  # image ids in b'keys' (0 without it)
    records: int  # image records stored
    boxes: Optional[Tuple[int, float, int]]  # min, mean, max boxes per image (the whole-image row not counted)
    feature_width: Optional[int]
    problems: List[str]
    audited: int  # records read back (all of them, or the sample)
    caches: List[str]  # what each feature cache of the LMDB that exists is: verified, or stale (damage: a problem)

    def table(self) -> str:
        layouts = ", ".join(f"{LAYOUT_NAMES[name]}: {count:,}" for name, count in self.layouts.items()) or "-"
        boxes = "-" if self.boxes is None else "min {}, mean {:.1f}, max {}".format(*self.boxes)
        read = "" if self.audited == self.records else f", {self.audited:,} of them read back (a sample)"
        rows = [("layout", layouts), ("images", f"{self.listed:,} listed in b'keys', {self.records:,} records{read}"),
                ("boxes per image", f"{boxes} (the whole-image row not counted)"),
                ("feature width", str(self.feature_width or "-"))]
        rows += [("feature cache", cache) for cache in self.caches or ["none built yet"]]
        rows += [("problems", str(len(self.problems)) if self.problems else "none")]
        lines = [f"region-feature LMDB {self.path}"] + [f"  {name:<16} {value}" for name, value in rows]
        return "\n".join(lines + [f"  PROBLEM: {problem}" for problem in self.problems])


def audit_feature_lmdb(path, progress: bool = False, sample: int = 0) -> Audit:
    """Reads every record of the LMDB folder `path` and collects what is wrong (see `Audit.table`). With
    `sample` > 0 only that many records, spread evenly over the file, are read back (selfcheck.py: a minute for
    the real files); the keys are always all checked.

    An unopenable folder raises FeaturesError; everything else is a problem in the result: no b'keys',
    listed ids without a record, records no key lists, records that do not decode, NaN or inf values, boxes
    outside their image, and layouts mixed in one file (each official reader reads only its own).
    """
    path = os.fspath(path)
    stored = [key for key in stored_keys(path) if key != b"keys"]
    raw_keys = read_stored(path, b"keys")
    problems = []
    if raw_keys is None:
        problems.append("no b'keys' record, so no reader can open it (the official converters write it last: "
                        "an interrupted conversion?); convert again")
        listed = []
    else:
        listed = [k.encode() if isinstance(k, str) else bytes(k)
                  for k in unpickle_record(raw_keys, f"the b'keys' record of {path}")]
    stored_set, listed_set = set(stored), set(listed)
    _problem(problems, [k for k in listed if k not in stored_set], "image id(s) listed in b'keys' have no record")
    if raw_keys is not None:
        _problem(problems, [k for k in stored if k not in listed_set], "record(s) not listed in b'keys' (no "
                 "reader sees them)")
    _problem(problems, sorted(k for k, n in Counter(listed).items() if n > 1),
             "image id(s) listed more than once in b'keys'")
    layouts: Dict[str, int] = {}
    counts, corrupt, non_finite, outside = [], [], [], []
    audited = [stored[i] for i in np.linspace(0, len(stored) - 1, sample).astype(int)] if 0 < sample < len(stored) \
        else stored
    for key in progress_bar(audited, f"Auditing {os.path.basename(os.path.normpath(path))}", enabled=progress,
                            unit="records"):
        what = f"record {key.decode(errors='replace')}"
        try:
            item = unpickle_record(read_stored(path, key), what)
            regions = decode_record(item, what)
        except FeaturesError as err:
            corrupt.append(str(err))
            continue
        layouts[record_layout(item)] = layouts.get(record_layout(item), 0) + 1
        counts.append(regions.num_boxes - 1)
        if not (np.isfinite(regions.features).all() and np.isfinite(regions.boxes).all()):
            non_finite.append(key)
        if _boxes_outside(regions.boxes[1:], regions.image_w, regions.image_h).any():
            outside.append(key)
    if corrupt:
        problems.append(f"{len(corrupt)} record(s) do not decode, e.g. {corrupt[0]}")
    _problem(problems, non_finite, "record(s) hold NaN or inf values")
    _problem(problems, outside, "record(s) have boxes outside their image or inverted")
    if len(layouts) > 1:
        problems.append("records of both layouts in one LMDB: each official reader reads only its own")
    boxes = (min(counts), float(np.mean(counts)), max(counts)) if counts else None
    return Audit(path, layouts, len(listed), len(stored), boxes, FEATURE_DIM if counts else None, problems,
                 len(audited), _audit_caches(path, problems))


def _audit_caches(path: str, problems: List[str]) -> List[str]:
    """A line for each feature cache of the LMDB that exists (beside it, or under the user's cache folder), every
    block read back against its checksum; a damaged one goes to `problems`, by name."""
    lines = []
    for cache_path in dict.fromkeys((default_cache_path(path), fallback_cache_path(path))):
        if not cache_path.exists():
            continue
        started = time.perf_counter()
        try:
            FeatureCache(cache_path, source=path)  # reads every block
        except StaleCache as stale:
            lines.append(f"{stale} (the next train.py or eval.py run builds it again)")
            continue
        except FeaturesError as damaged:
            problems.append(str(damaged))
            lines.append(f"{cache_path}: DAMAGED (below)")
            continue
        seconds, size = time.perf_counter() - started, cache_path.stat().st_size
        lines.append(f"{cache_path}: every checksum matches ({byte_size(size)} read in {seconds:.2f} s, "
                     f"{size / 2 ** 30 / max(seconds, 1e-9):.1f} GiB/s)")
    return lines


def _problem(problems: List[str], keys: list, what: str) -> None:
    if keys:
        shown = ", ".join(k.decode(errors="replace") for k in keys[:3]) + (", ..." if len(keys) > 3 else "")
        problems.append(f"{len(keys):,} {what}: {shown}")


# ---------------------------------------------------------------------------------------------------------
# Which extractor a checkpoint family was trained on
# ---------------------------------------------------------------------------------------------------------
class Extractor(NamedTuple):
    checkpoints: str  # the family trained on these features
    description: str
    layout: Optional[str]  # the layout its official LMDBs use; None: no expectation
    boxes: Optional[Tuple[int, int]]  # boxes per image it gives (the whole-image row not counted)


EXTRACTORS = {
    "butd_resnet101": Extractor("vilbert_beta", "bottom-up-attention (Caffe Faster R-CNN, ResNet-101 trained on "
                                "Visual Genome, confidence 0.2; generate_tsv.py)", "beta", (10, 100)),
    "resnext152": Extractor("12-in-1", "vqa-maskrcnn-benchmark (Faster R-CNN, ResNeXt-152; 12-in-1's "
                            "script/extract_features.py)", "mt", (1, 100)),
    "generated": Extractor("demo", "the generated demo regions (vilbert/demo_data.py)", None, None),
}


def extractor_warnings(extractor: str, layout: str, box_counts: Dict[int, int]) -> List[str]:
    """What does not look like the features the checkpoint was trained on: the LMDB's layout, and the images
    (image_id -> boxes, whole-image row not counted) whose box count that extractor never gives."""
    expected = EXTRACTORS[extractor]
    warnings = []
    if expected.layout and layout != expected.layout:
        warnings.append(f"the features are in the {LAYOUT_NAMES[layout]} layout; {expected.checkpoints} checkpoints "
                        f"were trained on features of {expected.description}, stored in the "
                        f"{LAYOUT_NAMES[expected.layout]} layout: features of another extractor cost accuracy "
                        f"(README, 'Your own images')")
    if expected.boxes:
        low, high = expected.boxes
        odd = {image_id: n for image_id, n in box_counts.items() if not low <= n <= high}
        if odd:
            shown = ", ".join(f"{image_id} ({n})" for image_id, n in list(odd.items())[:5])
            warnings.append(f"{len(odd)} image(s) have a number of boxes outside {low}-{high}, the range of the "
                            f"features {expected.checkpoints} checkpoints were trained on ({expected.description}): "
                            f"{shown}{', ...' if len(odd) > 5 else ''}")
    return warnings
