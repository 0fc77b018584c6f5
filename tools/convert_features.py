"""Convert a bottom-up feature extractor's output into a region-feature LMDB that training, eval.py and
predict.py read (appending when the LMDB exists).

    python tools/convert_features.py features.tsv.0 features.tsv.1 --out my.lmdb      # bottom-up-attention TSV
    python tools/convert_features.py extracted/ --out my.lmdb                          # 12-in-1 .npy, one per image
    python tools/convert_features.py "regions/*.npz" --out my.lmdb --layout mt         # plain .npz, one per image

Inputs are files, folders or globs of `.tsv` (generate_tsv.py's rows, 6 or 7 fields), `.npy`
(12-in-1's extract_features.py) or `.npz` (boxes, features, image_w, image_h [, image_id]); see
vilbert/extractor_outputs.py. Every record is checked (2048-d features, finite values, at least one box, boxes
inside the image); a bad one is reported on one line and nothing is written, unless --skip_bad. An image id
already in the LMDB is refused unless --overwrite. The LMDB is replaced in one rename at the end, so an
interrupted run leaves it as it was. Check the result with `python tools/audit_features.py LMDB`.
"""

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from vilbert.extractor_outputs import FORMATS, convert  # noqa: E402
from vilbert.feature_lmdb import LAYOUT_NAMES  # noqa: E402
from vilbert.training import exit_on_user_error  # noqa: E402


@exit_on_user_error()
def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("inputs", nargs="+", help="files, folders or globs of extractor outputs")
    parser.add_argument("--out", required=True, help="LMDB folder to write or append to")
    parser.add_argument("--layout", choices=LAYOUT_NAMES,
                        help="record layout: beta (vilbert_beta) or mt (12-in-1); default: the existing LMDB's, "
                             "else mt for .npy inputs and beta otherwise")
    parser.add_argument("--format", choices=FORMATS, help="input format (default: from each file's name)")
    parser.add_argument("--overwrite", action="store_true", help="replace the regions of image ids already there")
    parser.add_argument("--skip_bad", action="store_true", help="leave bad records out instead of stopping")
    args = parser.parse_args(argv)
    result = convert(args.inputs, args.out, layout=args.layout, fmt=args.format, overwrite=args.overwrite,
                     skip_bad=args.skip_bad)
    rate = result.written / max(result.seconds, 1e-9)
    print(f"Wrote {result.written:,} images ({result.boxes / max(result.written, 1):.1f} boxes each on average, "
          f"{LAYOUT_NAMES[result.layout]} records) in {result.seconds:.2f} s: {rate:,.0f} images/s; "
          f"{args.out} now holds {result.listed:,} images")
    if result.skipped:
        print(f"Left out {len(result.skipped)} bad record(s), listed above")


if __name__ == "__main__":
    main()
