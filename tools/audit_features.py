"""Audit region-feature LMDBs: layout, images, boxes per image, feature width, and everything wrong with them.

    python tools/audit_features.py data/referExpression/refcoco+_resnet101_faster_rcnn_genome.lmdb
    python tools/audit_features.py data/referExpression/*.lmdb

Every record is read back (vilbert/feature_lmdb.py `audit_feature_lmdb`). Problems: no b'keys' record, ids
listed without a record, records no key lists, records that do not decode, NaN or inf values, boxes outside
their image, both layouts in one LMDB. Exits with status 1 when any LMDB has a problem or cannot be opened.
`bash download_dataset.sh --check` runs this on every LMDB of the data root.
"""

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from vilbert.feature_lmdb import audit_feature_lmdb  # noqa: E402
from vilbert.features import FeaturesError  # noqa: E402


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("lmdbs", nargs="+", help="LMDB folders (holding data.mdb)")
    parser.add_argument("--no_progress", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    failed = 0
    for path in args.lmdbs:
        try:
            audit = audit_feature_lmdb(path, progress=not args.no_progress)
        except (OSError, FeaturesError) as err:
            print(f"region-feature LMDB {path}\n  PROBLEM: {err}")
            failed += 1
            continue
        print(audit.table())
        failed += bool(audit.problems)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
