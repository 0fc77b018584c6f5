"""Generate the demo data: a small RefCOCO+ (or RefCOCO, RefCOCOg) in the official layout that a small model
learns from scratch.

    python tools/make_demo_data.py --out data/demo                          # what `python train.py --demo` uses
    python tools/make_demo_data.py --out data/demo --dataset refcocog       # `train.py --demo --dataset refcocog`
    python tools/make_demo_data.py --out data/demo_mt --layout mt           # vilbert-multi-task LMDB records
    python tools/make_demo_data.py --out /big/refcoco+_sized --num_train_images 17000 --num_val_images 1500 \
        --num_test_images 750 --max_detections 100                          # RefCOCO+-sized, for benchmarks (~24 GB)
    python tools/make_demo_data.py --out data/demo --region_files tsv npy npz   # + the detected regions as the
        # feature extractors write them (data/demo/regions/), for tools/convert_features.py
"""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pyutils.refer import REFER  # noqa: E402
from vilbert.demo_data import LAYOUTS, REGION_FILES, REGIONS_DIR, make_demo_dataset  # noqa: E402
from vilbert.extractor_outputs import FORMATS  # noqa: E402
from vilbert.refer_datasets import DATASETS  # noqa: E402


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="data root to write (created if missing)")
    parser.add_argument("--dataset", choices=DATASETS, default="refcoco+", help="which dataset's files to write")
    parser.add_argument("--layout", choices=LAYOUTS, default="beta", help="LMDB record format (default: beta)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--num_train_images", type=int, default=600)
    parser.add_argument("--num_val_images", type=int, default=150)
    parser.add_argument("--num_test_images", type=int, default=60, help="per test split (testA, testB; test)")
    parser.add_argument("--max_detections", type=int, default=0,
                        help="add background boxes, up to this many detections per image (real files: 100)")
    parser.add_argument("--region_files", nargs="+", choices=FORMATS, default=[],
                        help=f"also write the detected regions in these extractor formats into OUT/{REGIONS_DIR}")
    args = parser.parse_args(argv)
    root = make_demo_dataset(args.out, dataset=args.dataset, seed=args.seed, layout=args.layout,
                             num_train_images=args.num_train_images, num_val_images=args.num_val_images,
                             num_test_images=args.num_test_images, max_detections=args.max_detections,
                             region_files=args.region_files)
    spec = DATASETS[args.dataset]
    refer = REFER(root, spec.name, spec.splitBy)
    print(f"Wrote {args.layout}-layout {spec.name} ({spec.splitBy}) demo data to {root}")
    print(f"{'split':<6} {'refs':>6} {'sentences':>10} {'images':>7}")
    for split in spec.splits:
        ref_ids = refer.getRefIds(split=split)
        sentences = sum(len(ref["sentences"]) for ref in refer.loadRefs(ref_ids))
        print(f"{split:<6} {len(ref_ids):>6} {sentences:>10} {len(refer.getImgIds(ref_ids)):>7}")
    for fmt in args.region_files:
        print(f"detected regions as {fmt}: {root / REGIONS_DIR / REGION_FILES[fmt]}")
    size = sum(f.stat().st_size for f in Path(root).rglob("*") if f.is_file())
    print(f"{size / 2**20:.0f} MB on disk")


if __name__ == "__main__":
    main()
