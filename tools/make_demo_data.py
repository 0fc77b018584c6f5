"""Generate the demo data: a small RefCOCO+ (or RefCOCO, RefCOCOg, or VQA 2.0) in the official layout that a
small model learns from scratch.

    python tools/make_demo_data.py --out data/demo                          # what `python train.py --demo` uses
    python tools/make_demo_data.py --out data/demo --dataset refcocog       # `train.py --demo --dataset refcocog`
    python tools/make_demo_data.py --out data/demo --task vqa               # data/demo/VQA + data/demo/coco
    python tools/make_demo_data.py --out data/demo_mt --layout mt           # vilbert-multi-task LMDB records
    python tools/make_demo_data.py --out /big/refcoco+_sized --num_train_images 17000 --num_val_images 1500 \\
        --num_test_images 750 --max_detections 100                          # RefCOCO+-sized, for benchmarks (~24 GB)
    python tools/make_demo_data.py --out data/demo --region_files tsv npy npz   # + the detected regions as the
        # feature extractors write them (data/demo/regions/), for tools/convert_features.py
"""

import argparse
import sys
from inspect import signature
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pyutils.refer import REFER  # noqa: E402
from vilbert.demo_data import LAYOUTS, REGION_FILES, REGIONS_DIR, make_demo_dataset  # noqa: E402
from vilbert.extractor_outputs import FORMATS  # noqa: E402
from vilbert.refer_datasets import DATASETS  # noqa: E402
from vilbert.vqa_data import SPLITS, load_split, read_answer_vocab  # noqa: E402
from vilbert.vqa_demo_data import COCO_DIR, majority_baseline, make_vqa_demo  # noqa: E402

MAKERS = {"refer": make_demo_dataset, "vqa": make_vqa_demo}
SIZES = ("num_train_images", "num_val_images", "num_test_images")  # refer: per test split (testA, testB; test)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="data root to write (created if missing)")
    parser.add_argument("--task", choices=MAKERS, default="refer",
                        help="referring expressions (--dataset; default) or VQA 2.0 (OUT/VQA, features in OUT/coco)")
    parser.add_argument("--dataset", choices=DATASETS, help="which referring-expression dataset (default: refcoco+)")
    parser.add_argument("--layout", choices=LAYOUTS, default="beta", help="LMDB record format (default: beta)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the generated images, boxes and "
                        "expressions (default: 0)")
    for name in SIZES:
        defaults = ", ".join(f"{signature(make).parameters[name].default} ({task})" for task, make in MAKERS.items())
        parser.add_argument(f"--{name}", type=int, metavar="N", help=f"default: {defaults}")
    parser.add_argument("--max_detections", type=int, default=0, metavar="N",
                        help="add background boxes, up to this many detections per image (real files: 100)")
    parser.add_argument("--region_files", nargs="+", choices=FORMATS, default=[],
                        help=f"also write the detected regions in these extractor formats into OUT/{REGIONS_DIR}")
    args = parser.parse_args(argv)
    sizes = {name: getattr(args, name) for name in SIZES if getattr(args, name) is not None}
    if args.task == "vqa":
        given = [flag for flag, value in (("--dataset", args.dataset), ("--max_detections", args.max_detections),
                                          ("--region_files", args.region_files)) if value]
        if given:
            parser.error(f"{', '.join(given)}: only for --task refer")
        write_vqa(args, sizes)
    else:
        write_refer(args, sizes)
    size = sum(f.stat().st_size for f in Path(args.out).rglob("*") if f.is_file())
    print(f"{size / 2**20:.0f} MB on disk")


def write_refer(args, sizes) -> None:
    dataset = args.dataset or "refcoco+"
    root = make_demo_dataset(args.out, dataset=dataset, seed=args.seed, layout=args.layout,
                             max_detections=args.max_detections, region_files=args.region_files, **sizes)
    spec = DATASETS[dataset]
    refer = REFER(root, spec.name, spec.splitBy)
    print(f"Wrote {args.layout}-layout {spec.name} ({spec.splitBy}) demo data to {root}")
    print(f"{'split':<6} {'refs':>6} {'sentences':>10} {'images':>7}")
    for split in spec.splits:
        ref_ids = refer.getRefIds(split=split)
        sentences = sum(len(ref["sentences"]) for ref in refer.loadRefs(ref_ids))
        print(f"{split:<6} {len(ref_ids):>6} {sentences:>10} {len(refer.getImgIds(ref_ids)):>7}")
    for fmt in args.region_files:
        print(f"detected regions as {fmt}: {root / REGIONS_DIR / REGION_FILES[fmt]}")


def write_vqa(args, sizes) -> None:
    data_root = make_vqa_demo(args.out, seed=args.seed, layout=args.layout, **sizes)
    ans2label, _ = read_answer_vocab(data_root)
    print(f"Wrote {args.layout}-layout VQA 2.0 demo data to {data_root} (features in {Path(args.out) / COCO_DIR})")
    print(f"{'split':<9} {'questions':>10} {'images':>7}")
    for split in SPLITS:
        entries = load_split(data_root, split, len(ans2label))
        print(f"{split:<9} {len(entries):>10} {len({e['image_id'] for e in entries}):>7}")
    answer, score = majority_baseline(data_root)
    print(f"{len(ans2label)} answers; the best single answer ({answer!r} to every question) scores {score:.3f} "
          "on minval")


if __name__ == "__main__":
    main()
