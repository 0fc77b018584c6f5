"""What the bottom-up feature extractors write, read into `ImageRegions` and converted into a region-feature LMDB.

Three formats (checked against the official scripts):
- `tsv`: rows of bottom-up-attention's `tools/generate_tsv.py` (one file per GPU: `out.tsv.0`, ...), tab-separated
  `image_id, image_w, image_h, num_boxes, boxes, features`, boxes and features base64 float32 (x1y1x2y2 pixels,
  2048-d). The files behind vilbert_beta's RefCOCO+ LMDBs add a 7th field, `cls_prob` (N x 1601), which
  vilbert_beta's `script/convert_lmdb_refcoco+.py` reads with `csv.DictReader`; both widths are read.
- `npy`: one file per image from 12-in-1's `script/extract_features.py`: `np.save` of a dict with `image_id`
  (the image file's name up to its first dot, a str), `image_width`, `image_height`, `num_boxes`, `bbox`
  [N, 4] float32, `features` [N, 2048] float32, `objects` [N] int64 and `cls_prob` [N, C] float32. That is a
  pickle, so it is read with the features' whitelist unpickler: `np.load(allow_pickle=True)`, which its
  `convert_to_lmdb.py` uses, would run any code in the file. As there, every row is kept (`num_boxes` counts
  only the boxes of non-zero confidence, and its reader ignores it too).
- `npz`: one file per image, for any other extractor: `boxes` [N, 4] (x1y1x2y2 pixels), `features` [N, 2048],
  `image_w`, `image_h`, and `image_id` (else taken from the file name). Read with allow_pickle=False.

Image ids must be integers (the readers and the datasets key images by them): a name like
`COCO_val2014_000000000042` gives 42. `write_tsv` / `write_npy` / `write_npz` write the same formats, so
the generated demo data can run the whole path here (`make_demo_dataset(region_files=...)`).
"""

import binascii
import glob
import os
import re
import sys
import time
import zipfile
from functools import partial
from pathlib import Path
from typing import Callable, Iterator, List, NamedTuple, Optional, Sequence, Tuple

import numpy as np
from tqdm import tqdm

from .feature_lmdb import (LAYOUT_NAMES, BadRecord, ImageRegions, check_regions, encode_record, lmdb_layout,
                           write_feature_lmdb)
from .features import FeaturesError, unpickle_record
from .fileio import atomic_path

FORMATS = ("tsv", "npy", "npz")
TSV_FIELDS = ("image_id", "image_w", "image_h", "num_boxes", "boxes", "features", "cls_prob")
READ_BUFFER = 4 << 20  # TSV lines run to megabytes; a small buffer reads them in many pieces
NPY_HINT = "the dict 12-in-1's script/extract_features.py saves"


def file_format(path: Path) -> Optional[str]:
    """'npy', 'npz' or 'tsv' from the file name (generate_tsv.py's per-GPU `x.tsv.0` and `.csv` are TSV)."""
    if path.suffix in (".npy", ".npz"):
        return path.suffix[1:]
    return "tsv" if {".tsv", ".csv"} & set(path.suffixes) else None


def input_files(specs: Sequence[str], fmt: Optional[str] = None) -> List[Tuple[Path, str]]:
    """(file, format) for each file, folder (its files of a known format, by name) or glob, in name order."""
    found = []
    for spec in specs:
        if os.path.isdir(spec):
            files = [p for p in sorted(Path(spec).iterdir()) if p.is_file() and not p.name.startswith(".")]
            files = [p for p in files if fmt or file_format(p)]
            if not files:
                raise FileNotFoundError(f"{spec} holds no .tsv, .npy or .npz files")
        elif os.path.exists(spec):
            files = [Path(spec)]
        elif glob.has_magic(spec):
            files = [Path(p) for p in sorted(glob.glob(spec)) if os.path.isfile(p)]
            if not files:
                raise FileNotFoundError(f"no files match {spec}")
        else:
            raise FileNotFoundError(f"{spec} not found")
        for path in files:
            kind = fmt or file_format(path)
            if kind is None:
                raise FeaturesError(f"cannot tell the format of {path} from its name; give --format "
                                    f"{'|'.join(FORMATS)}")
            found.append((path, kind))
    return found


def records(path: Path, fmt: str) -> Iterator[Tuple[str, Callable[[], ImageRegions]]]:
    """(where, load) per image of one file: `load()` reads that image's regions or raises BadRecord, so one
    bad image does not end the file."""
    if fmt == "tsv":
        with open(path, "rb", buffering=READ_BUFFER) as f:
            for number, line in enumerate(f, 1):
                line = line.rstrip(b"\r\n")
                if line and not (number == 1 and line.startswith(b"image_id\t")):  # a header row is skipped
                    yield f"{path} line {number}", partial(_tsv_row, line, f"{path} line {number}")
    elif fmt in ("npy", "npz"):
        yield str(path), partial(_read_npy if fmt == "npy" else _read_npz, path)
    else:
        raise ValueError(f"fmt={fmt!r} must be one of {FORMATS}")


def image_id_from_name(name, what: str) -> int:
    """An integer image id from a number, a decimal string, or a name ending in `_<digits>` (COCO's)."""
    if isinstance(name, (int, np.integer)):
        return int(name)
    text = str(name).strip()
    match = re.fullmatch(r"(?:.*_)?(\d+)", text)
    if not match:
        raise BadRecord(f"{what}: image id {text!r} is not a number; images are keyed by integer ids: name the "
                        f"file <id>.npz/.npy (or <prefix>_<id>, as COCO's) or store an integer image_id")
    return int(match.group(1))


def _integer(value, field: str, what: str) -> int:
    try:
        number = float(value.decode() if isinstance(value, bytes) else value)
    except (TypeError, ValueError):
        number = float("nan")
    if not number.is_integer():
        raise BadRecord(f"{what}: field {field!r} is {value!r}, not an integer")
    return int(number)


def _tsv_row(line: bytes, what: str) -> ImageRegions:
    fields = line.split(b"\t")
    if len(fields) not in (6, 7):
        raise BadRecord(f"{what}: {len(fields)} tab-separated fields, expected 6 ({', '.join(TSV_FIELDS[:6])}: "
                        f"generate_tsv.py) or 7 (+ cls_prob); a truncated line?")
    image_id = image_id_from_name(fields[0].decode(errors="replace"), what)
    what = f"{what} (image {image_id})"
    image_w, image_h, num_boxes = (_integer(fields[i], TSV_FIELDS[i], what) for i in (1, 2, 3))
    if num_boxes < 1:
        raise BadRecord(f"{what}: field 'num_boxes' is {num_boxes}; an image needs at least one box")
    boxes = _base64_rows(fields[4], num_boxes, "boxes", what)
    features = _base64_rows(fields[5], num_boxes, "features", what)
    text = dict(zip(TSV_FIELDS[4:], (field.decode("ascii", errors="replace") for field in fields[4:])))
    if len(fields) == 7:  # nothing reads cls_prob: it is kept as it is, and only its size is checked
        size = len(fields[6]) * 3 // 4 - fields[6][-2:].count(b"=")
        if len(fields[6]) % 4 or size % (num_boxes * 4):
            raise BadRecord(f"{what}: field 'cls_prob' holds {size} bytes of base64, not {num_boxes} rows "
                            f"(num_boxes) of float32; a truncated line?")
    return ImageRegions(image_id, image_w, image_h, boxes, features, base64=text)


def _base64_rows(value: bytes, rows: int, field: str, what: str) -> np.ndarray:
    try:
        data = binascii.a2b_base64(value)
    except binascii.Error as err:
        raise BadRecord(f"{what}: field {field!r} is not base64 ({err}); a truncated line?") from None
    if len(data) % (rows * 4):
        raise BadRecord(f"{what}: field {field!r} holds {len(data)} bytes, not {rows} rows (num_boxes) of float32; "
                        f"a truncated line?")
    return np.frombuffer(data, np.float32).reshape(rows, -1)


def _read_npy(path: Path) -> ImageRegions:
    what = str(path)
    with open(path, "rb") as f:
        try:
            version = np.lib.format.read_magic(f)
            read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else \
                np.lib.format.read_array_header_2_0
            shape, _, dtype = read_header(f)
        except (ValueError, EOFError) as err:
            raise BadRecord(f"{what}: not a .npy file ({err})") from None
        if dtype != object or shape != ():
            raise BadRecord(f"{what}: holds a {dtype} array of shape {shape}, not {NPY_HINT} (np.save of a dict)")
        try:
            item = unpickle_record(f.read(), what)
        except FeaturesError as err:
            raise BadRecord(str(err)) from None
    item = item.item() if isinstance(item, np.ndarray) and item.shape == () else item
    if not isinstance(item, dict):
        raise BadRecord(f"{what}: holds a {type(item).__name__}, not {NPY_HINT}")
    fields = _fields(item, ("image_width", "image_height", "bbox", "features"), what)
    image_id = image_id_from_name(item.get("image_id", path.name.split(".")[0]), what)
    return ImageRegions(image_id, _integer(fields[0], "image_width", what), _integer(fields[1], "image_height", what),
                        _float_array(fields[2], "bbox", what), _float_array(fields[3], "features", what),
                        _float_array(item["cls_prob"], "cls_prob", what) if item.get("cls_prob") is not None else None)


def _read_npz(path: Path) -> ImageRegions:
    what = str(path)
    try:
        with np.load(path, allow_pickle=False) as data:
            item = {name: data[name] for name in data.files}
    except (ValueError, OSError, EOFError, zipfile.BadZipFile) as err:
        raise BadRecord(f"{what}: not a readable .npz of plain arrays ({err})") from None
    boxes, features, image_w, image_h = _fields(item, ("boxes", "features", "image_w", "image_h"), what)
    image_id = image_id_from_name(item["image_id"].item() if "image_id" in item else path.stem, what)
    return ImageRegions(image_id, _integer(image_w, "image_w", what), _integer(image_h, "image_h", what),
                        _float_array(boxes, "boxes", what), _float_array(features, "features", what))


def _fields(item: dict, names, what: str) -> list:
    missing = [name for name in names if name not in item]
    if missing:
        raise BadRecord(f"{what}: no field {missing[0]!r} (it has: {', '.join(sorted(map(str, item)))})")
    return [item[name] for name in names]


def _float_array(value, field: str, what: str) -> np.ndarray:
    if not isinstance(value, np.ndarray) or value.dtype.kind not in "fiu":
        raise BadRecord(f"{what}: field {field!r} is a {getattr(value, 'dtype', type(value).__name__)}, "
                        f"not a numeric array")
    return np.asarray(value, np.float32)


# ---------------------------------------------------------------------------------------------------------
# Conversion
# ---------------------------------------------------------------------------------------------------------
class Conversion(NamedTuple):
    written: int  # images written (new or replaced)
    skipped: List[str]  # one line per bad record left out (with skip_bad)
    listed: int  # images the LMDB holds now
    layout: str
    boxes: int  # boxes written, over all images
    seconds: float


def convert(specs: Sequence[str], out, *, layout: Optional[str] = None, fmt: Optional[str] = None,
            overwrite: bool = False, skip_bad: bool = False, report=print, progress: bool = True) -> Conversion:
    """Every image of the inputs (files, folders, globs) into the LMDB folder `out`, appended when it exists.

    Each record is checked (`check_regions`); a bad one is reported as one line through `report`, and then
    nothing is written (BadRecord) unless `skip_bad`. The layout defaults to the existing LMDB's, else to
    12-in-1's for .npy inputs and vilbert_beta's otherwise; mixing layouts in one LMDB is refused.
    """
    files = input_files(specs, fmt)
    existing = lmdb_layout(out) if (Path(out) / "data.mdb").is_file() else None
    if existing and layout and layout != existing:
        raise FeaturesError(f"{out} holds {LAYOUT_NAMES[existing]} records; --layout {layout} would mix layouts, "
                            f"which the official readers cannot read")
    layout = layout or existing or ("mt" if all(kind == "npy" for _, kind in files) else "beta")
    bad, boxes = [], 0
    started = time.perf_counter()

    def encoded():
        nonlocal boxes
        # the image count is unknown until the inputs are read, so a live bar on a terminal and none in a log file
        bar = tqdm(unit=" images", desc=f"Converting into {out}", disable=not (progress and sys.stderr.isatty()),
                   dynamic_ncols=True)
        for path, kind in files:
            for what, load in records(path, kind):
                try:
                    regions = load()
                    check_regions(regions, f"{what} (image {regions.image_id})" if kind == "tsv" else what)
                except BadRecord as err:
                    bad.append(str(err))
                    (bar.write if progress else report)(f"bad record: {err}")
                    continue
                boxes += len(regions.boxes)
                bar.update()
                yield regions.image_id, encode_record(regions, layout)
        bar.close()
        if bad and not skip_bad:
            raise BadRecord(f"{len(bad)} bad record(s), listed above; nothing was written: fix them, or give "
                            f"--skip_bad to convert the rest")
        if not boxes:  # every good record has boxes
            raise BadRecord(f"no good record in {', '.join(specs)}; nothing was written")

    written, listed = write_feature_lmdb(out, encoded(), append=True, overwrite=overwrite)
    return Conversion(written, bad, listed, layout, boxes, time.perf_counter() - started)


# ---------------------------------------------------------------------------------------------------------
# Writers of the three formats (the generated demo data; tests)
# ---------------------------------------------------------------------------------------------------------
def write_tsv(path, images: Sequence[ImageRegions]) -> None:
    """generate_tsv.py's rows; 7 fields (with cls_prob) for images that have class probabilities."""
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        for regions in images:
            fields = [str(v).encode() for v in (regions.image_id, regions.image_w, regions.image_h,
                                                len(regions.boxes))]
            arrays = [regions.boxes, regions.features] + ([] if regions.cls_prob is None else [regions.cls_prob])
            fields += [binascii.b2a_base64(np.ascontiguousarray(a, np.float32).tobytes(), newline=False)
                       for a in arrays]
            f.write(b"\t".join(fields) + b"\r\n")  # csv.DictWriter's line ending


def write_npy(folder, images: Sequence[ImageRegions]) -> None:
    """One `<image_id>.npy` per image, as 12-in-1's extract_features.py saves it."""
    for regions in images:
        cls_prob = regions.cls_prob if regions.cls_prob is not None else np.zeros((len(regions.boxes), 1), np.float32)
        with atomic_path(Path(folder) / f"{regions.image_id}.npy") as tmp:
            np.save(tmp, {
                "bbox": regions.boxes, "num_boxes": len(regions.boxes), "objects": cls_prob.argmax(1),
                "image_width": regions.image_w, "image_height": regions.image_h, "cls_prob": cls_prob,
                "image_id": str(regions.image_id), "features": regions.features})


def write_npz(folder, images: Sequence[ImageRegions]) -> None:
    """One `<image_id>.npz` per image: boxes, features, image_w, image_h (the id is in the name)."""
    for regions in images:
        with atomic_path(Path(folder) / f"{regions.image_id}.npz") as tmp:
            np.savez(tmp, boxes=regions.boxes, features=regions.features, image_w=regions.image_w,
                     image_h=regions.image_h)


WRITERS = {"tsv": write_tsv, "npy": write_npy, "npz": write_npz}
