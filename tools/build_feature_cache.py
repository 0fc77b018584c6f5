"""Decode a region-feature LMDB once into a memory-mapped cache that training and evaluation read instead.

train.py and eval.py build the float16 cache on first use by themselves; this builds one by hand (float32,
say, or before a run).

    python tools/build_feature_cache.py data/referExpression/refcoco+_resnet101_faster_rcnn_genome.lmdb --float16
    python tools/build_feature_cache.py data/referExpression/refcoco+_gt_resnet101_faster_rcnn_genome.lmdb --float16

The cache (`<LMDB_DIR>.cache` unless --out is given) holds exactly what the LMDB reader returns; with
--float16 the features are stored (and handed to the model) as float16, half the disk and memory traffic.
It records the LMDB's data.mdb size and mtime: if the LMDB changes, the cache is reported stale and ignored.
"""

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from vilbert.features import FeaturesError, build_feature_cache, default_cache_path  # noqa: E402


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("lmdb_dir", help="an official region-feature LMDB folder (holding data.mdb)")
    parser.add_argument("--out", help="cache file to write (default: <lmdb_dir>.cache, where open_features looks)")
    parser.add_argument("--float16", action="store_true", help="store the features as float16")
    args = parser.parse_args(argv)
    if args.out and os.path.abspath(args.out) != str(default_cache_path(args.lmdb_dir).absolute()):
        print(f"Note: training and evaluation look for the cache at {default_cache_path(args.lmdb_dir)}")
    started = time.time()
    try:
        path = build_feature_cache(args.lmdb_dir, args.out, float16=args.float16)
    except (OSError, FeaturesError) as err:
        sys.exit(f"error: {err}")
    print(f"Wrote {path} ({os.path.getsize(path) / 2**20:.1f} MiB, "
          f"{'float16' if args.float16 else 'float32'} features) in {time.time() - started:.1f} s")


if __name__ == "__main__":
    main()
