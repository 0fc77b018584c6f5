"""Images/s of tools/convert_features.py at 100 boxes per image, per input format, against the official converters.

    python bench/bench_convert.py [--images 200] [--boxes 100] [--rounds 3]

Inputs are random regions of `--boxes` boxes (2048-d float32 features, 1601-class cls_prob as in the files
behind vilbert_beta's RefCOCO+ LMDBs) written in a temporary folder as a 7-field TSV, 12-in-1 .npy files and
.npz files (`vilbert/extractor_outputs.py` writers). Timed: `extractor_outputs.convert` into a new LMDB
(reading, checking every record, encoding, writing, the atomic rename), and, for TSV and .npy, a re-creation
of the official conversion (vilbert_beta `script/convert_lmdb_refcoco+.py`: csv.DictReader rows pickled as
they are; 12-in-1 `script/convert_to_lmdb.py`: np.load(allow_pickle=True) per file), which checks nothing.
Variants take turns in rounds and each keeps its best, which steadies the ratios on a shared machine. The target
is >= 100 images/s for ours.
"""

import argparse
import csv
import pickle
import shutil
import sys
import tempfile
import time
from pathlib import Path

import lmdb
import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from vilbert.extractor_outputs import TSV_FIELDS, WRITERS, convert  # noqa: E402
from vilbert.feature_lmdb import MAP_SIZE, ImageRegions  # noqa: E402


def random_regions(count: int, boxes: int):
    rng = np.random.default_rng(0)
    for image_id in range(1, count + 1):
        corners = rng.uniform(0, 300, (boxes, 2))
        yield ImageRegions(image_id, 640, 480, np.hstack([corners, corners + rng.uniform(1, 100, (boxes, 2))])
                           .astype(np.float32), rng.uniform(0, 5, (boxes, 2048)).astype(np.float32),
                           rng.dirichlet(np.ones(1601), boxes).astype(np.float32))


def official_tsv(path: Path, out: Path) -> None:
    csv.field_size_limit(sys.maxsize)
    env = lmdb.open(str(out), map_size=MAP_SIZE)
    ids = []
    with env.begin(write=True) as txn, open(path) as f:
        for item in csv.DictReader(f, delimiter="\t", fieldnames=list(TSV_FIELDS)):
            ids.append(str(item["image_id"]).encode())
            txn.put(ids[-1], pickle.dumps(item))
        txn.put(b"keys", pickle.dumps(ids))
    env.close()


def official_npy(folder: Path, out: Path) -> None:
    env = lmdb.open(str(out), map_size=MAP_SIZE)
    ids = []
    with env.begin(write=True) as txn:
        for path in sorted(folder.glob("*.npy")):
            reader = np.load(path, allow_pickle=True)  # what the official script does; never on untrusted files
            item = {"image_id": reader.item().get("image_id"), "image_h": reader.item().get("image_height"),
                    "image_w": reader.item().get("image_width"), "num_boxes": reader.item().get("num_boxes"),
                    "boxes": reader.item().get("bbox"), "features": reader.item().get("features")}
            ids.append(str(item["image_id"]).encode())
            txn.put(ids[-1], pickle.dumps(item))
        txn.put(b"keys", pickle.dumps(ids))
    env.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=200)
    parser.add_argument("--boxes", type=int, default=100)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    folder = Path(tempfile.mkdtemp(prefix="bench_convert_"))
    try:
        inputs = {"tsv": folder / "regions.tsv", "npy": folder / "npy", "npz": folder / "npz"}
        images = list(random_regions(args.images, args.boxes))
        for fmt, path in inputs.items():
            WRITERS[fmt](path, images)
        del images
        print(f"{args.images} images x {args.boxes} boxes; best of {args.rounds} interleaved rounds")
        variants = (("tsv", "beta", official_tsv), ("npy", "mt", official_npy), ("npz", "beta", None),
                    ("npz", "mt", None))
        best = {}
        for _ in range(args.rounds):
            for fmt, layout, official in variants:
                out = folder / "out.lmdb"
                result = convert([str(inputs[fmt])], out, layout=layout, progress=False)
                shutil.rmtree(out)
                best[fmt, layout] = max(best.get((fmt, layout), 0), result.written / result.seconds)
                if official:
                    started = time.perf_counter()
                    official(inputs[fmt], out)
                    shutil.rmtree(out)
                    best[fmt] = max(best.get(fmt, 0), args.images / (time.perf_counter() - started))
        print(f"{'input':<6}{'layout':>8}{'ours img/s':>12}{'official img/s':>16}{'ours/official':>15}")
        for fmt, layout, official in variants:
            ours = best[fmt, layout]
            row = f"{fmt:<6}{layout:>8}{ours:>12.0f}"
            print(row + (f"{best[fmt]:>16.0f}{ours / best[fmt]:>14.2f}x" if official else ""))
    finally:
        shutil.rmtree(folder)


if __name__ == "__main__":
    main()
