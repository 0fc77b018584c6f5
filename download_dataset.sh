#!/usr/bin/env bash
# Download RefCOCO+ (annotations + vilbert_beta bottom-up features), the data behind ViLBERT's 72.34 val.
#
#   bash download_dataset.sh                         # into data/referExpression (next to this script)
#   bash download_dataset.sh --dataroot /big/disk    # or: DATA_ROOT=/big/disk bash download_dataset.sh
#   bash download_dataset.sh --check                 # audit a data root, download nothing
#   bash download_dataset.sh --mirror URL            # fetch URL/refcoco+/instances.json, ... (same layout)
#
# Files come from the vilbert_beta Dropbox folder (the links the earlier Paddle port used); the two annotation
# files fall back to the archive.org copy of the refer project's refcoco+.zip. Interrupted downloads resume
# (FILE.part), an HTML page served instead of a file is refused, and every file is opened at the end to
# confirm it reads. The pretrained checkpoints are on Google Drive, which cannot be scripted reliably: their
# links are printed at the end.
set -euo pipefail

SCRIPT_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
DATA_ROOT=${DATA_ROOT:-$SCRIPT_DIR/data/referExpression}
MIRROR=${MIRROR:-}
PYTHON=${PYTHON:-$(command -v python || command -v python3 || echo python)}
CHECK=0

DROPBOX=https://www.dropbox.com/sh/4jqadcfkai68yoe
ARCHIVE_ZIP=https://web.archive.org/web/20220413011656/https://bvisionweb1.cs.unc.edu/licheng/referit/data/refcoco+.zip
# path in the data root | Dropbox link below $DROPBOX (?dl=1 makes Dropbox send the file, not a page)
FILES=(
  "refcoco+/instances.json|AADsJzMR3P5CRqbDN3TPzdG6a/refcoco%2B/instances.json"
  "refcoco+/refs(unc).p|AAB7V1BaagaXAvV_jCEgrQOma/refcoco%2B/refs%28unc%29.p"
  "refcoco+_resnet101_faster_rcnn_genome.lmdb/data.mdb|AABlj40UeJ7qSql-7CkFtxeea/refcoco%2B_resnet101_faster_rcnn_genome.lmdb/data.mdb"
  "refcoco+_resnet101_faster_rcnn_genome.lmdb/lock.mdb|AACoa8Wsoe21EkvWS2_hR48ka/refcoco%2B_resnet101_faster_rcnn_genome.lmdb/lock.mdb"
  "refcoco+_gt_resnet101_faster_rcnn_genome.lmdb/data.mdb|AAAfUyY6CLTDQjrjBzWpqBkua/refcoco%2B_gt_resnet101_faster_rcnn_genome.lmdb/data.mdb"
  "refcoco+_gt_resnet101_faster_rcnn_genome.lmdb/lock.mdb|AAALVeDoHRomCu-AsyUwnM4Fa/refcoco%2B_gt_resnet101_faster_rcnn_genome.lmdb/lock.mdb"
)

usage() { sed -n '2,15p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; }
die() { echo "ERROR: $*" >&2; exit 1; }

while [ $# -gt 0 ]; do
  case "$1" in
    --dataroot) [ $# -ge 2 ] || die "--dataroot needs a directory"; DATA_ROOT=$2; shift 2 ;;
    --dataroot=*) DATA_ROOT=${1#*=}; shift ;;
    --mirror) [ $# -ge 2 ] || die "--mirror needs a URL"; MIRROR=$2; shift 2 ;;
    --mirror=*) MIRROR=${1#*=}; shift ;;
    --check) CHECK=1; shift ;;
    -h|--help) usage; exit 0 ;;
    *) usage >&2; die "unknown argument: $1" ;;
  esac
done

print_checkpoint_hints() {
  cat <<EOF

Pretrained weights (Google Drive folders: download in a browser, then place the file as shown):
  fine-tune from (ViLBERT 6-layer, Conceptual Captions):
    https://drive.google.com/drive/folders/1JVM5WiolJJLnY9_lruxSaSop7IFX8a-v
    -> $SCRIPT_DIR/checkpoints/bert_base_6_layer_6_connect_freeze_0/pytorch_model_8.bin
  evaluate (ViLBERT fine-tuned on RefCOCO+, the paper's model):
    https://drive.google.com/drive/folders/1GWY2fEbZCYHkcnxd0oysU0olfPdzcD3l
    -> $SCRIPT_DIR/checkpoints/refcoco+_bert_base_6layer_6conect-pretrained/pytorch_model_19.bin
EOF
  local ckpt
  for ckpt in bert_base_6_layer_6_connect_freeze_0/pytorch_model_8.bin \
              refcoco+_bert_base_6layer_6conect-pretrained/pytorch_model_19.bin; do
    if [ -f "$SCRIPT_DIR/checkpoints/$ckpt" ]; then echo "  found:   checkpoints/$ckpt"
    else echo "  missing: checkpoints/$ckpt (optional)"; fi
  done
}

# Audit the data root: the expected layout, what is found, and whether each file reads. Exit 1 if anything is
# missing or unreadable. Pickles are loaded with a plain-data unpickler (no code from downloaded files runs).
audit() {
  "$PYTHON" - "$DATA_ROOT" <<'PY'
import base64
import collections
import json
import os
import pickle
import sys

root = sys.argv[1]
OFFICIAL = {"refs": 49856, "sentences": 141564, "images": 19992,
            "splits": {"train": 42278, "val": 3805, "testA": 1975, "testB": 1798}}
PLAIN_GLOBALS = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
                 ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
                 ("numpy", "ndarray"), ("numpy", "dtype"), ("collections", "OrderedDict"), ("_codecs", "encode")}


class PlainData(pickle.Unpickler):
    def find_class(self, module, name):
        if (module, name) in PLAIN_GLOBALS:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to unpickle {module}.{name}: not plain data")


def loads(data):
    import io
    return PlainData(io.BytesIO(data)).load()


def size(path):
    total = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(path) for f in fs) \
        if os.path.isdir(path) else os.path.getsize(path)
    return f"{total / 2**20:,.1f} MB" if total >= 2**20 else f"{total / 2**10:,.1f} KB"


def official(value, expected):
    return "" if value == expected else f" (official RefCOCO+: {expected:,}; generated or partial data?)"


def check_refs(path):
    with open(path, "rb") as f:
        refs = PlainData(f).load()
    splits = collections.Counter(ref["split"] for ref in refs)
    sentences = sum(len(ref["sentences"]) for ref in refs)
    for field in ("ref_id", "ann_id", "image_id", "split", "category_id", "sent_ids", "sentences"):
        if field not in refs[0]:
            raise ValueError(f"refs have no {field!r} field")
    note = official(len(refs), OFFICIAL["refs"])
    by_split = " / ".join(f"{s} {splits[s]:,}" for s in ("train", "val", "testA", "testB"))
    return refs, f"{len(refs):,} refs{note}, {sentences:,} sentences; {by_split}"


def check_instances(path):
    with open(path) as f:
        instances = json.load(f)
    missing = {"images", "annotations", "categories"} - set(instances)
    if missing:
        raise ValueError(f"no {sorted(missing)} in the JSON")
    note = official(len(instances["images"]), OFFICIAL["images"])
    return instances, (f"{len(instances['images']):,} images{note}, {len(instances['annotations']):,} annotations, "
                       f"{len(instances['categories'])} categories")


def check_lmdb(path, need_ids, what):
    import lmdb
    if not os.path.isfile(os.path.join(path, "data.mdb")):
        raise FileNotFoundError("no data.mdb")
    env = lmdb.open(path, readonly=True, lock=False, readahead=False, meminit=False, max_readers=1)
    with env.begin() as txn:
        raw_keys = txn.get(b"keys")
        if raw_keys is None:
            raise ValueError("no b'keys' record (an interrupted conversion or download?)")
        keys = loads(raw_keys)
        item = loads(txn.get(keys[0]))
    env.close()
    n = int(item["num_boxes"])
    if isinstance(item["features"], (str, bytes)):
        layout = "vilbert_beta records (base64)"
        features = len(base64.b64decode(item["features"])) // 4
        boxes = len(base64.b64decode(item["boxes"])) // 4
    else:
        layout = "vilbert-multi-task records (numpy)"
        features, boxes = item["features"].size, item["boxes"].size
    if features != n * 2048 or boxes != n * 4:
        raise ValueError(f"record {keys[0]!r}: {n} boxes but {features} feature and {boxes} box values")
    uncovered = need_ids - {int(k) for k in keys}
    if uncovered:
        raise ValueError(f"{len(uncovered):,} {what} images have no record, e.g. {sorted(uncovered)[:3]}")
    lock = "" if os.path.isfile(os.path.join(path, "lock.mdb")) else "; no lock.mdb (not needed to read)"
    return f"{len(keys):,} images, {layout}{lock}"


ENTRIES = [
    ("refcoco+/refs(unc).p", "pickled list of the RefCOCO+ refs: ids, split, category, sentences"),
    ("refcoco+/instances.json", "COCO images, annotations (boxes, polygons) and categories of those images"),
    ("refcoco+_resnet101_faster_rcnn_genome.lmdb", "detected boxes + ResNet-101 features per image (train/eval)"),
    ("refcoco+_gt_resnet101_faster_rcnn_genome.lmdb", "referred objects' gt boxes + features (mixed into train)"),
]
print(f"Data root: {os.path.abspath(root)}")
print("Sizes of these files are not published; the counts below are what the official code reads.")
problems, refs = 0, None
for relative, what in ENTRIES:
    path = os.path.join(root, relative)
    print(f"  {relative + ('/' if relative.endswith('.lmdb') else ''):<50} {what}")
    if not os.path.exists(path):
        print(f"      MISSING  {path}")
        problems += 1
        continue
    try:
        if relative.endswith(".p"):
            refs, detail = check_refs(path)
        elif relative.endswith(".json"):
            _, detail = check_instances(path)
        else:
            gt = "_gt_" in relative
            need = {r["image_id"] for r in refs or () if r["split"] == "train" or not gt}
            detail = check_lmdb(path, need, "train" if gt else "referred")
        print(f"      found    {size(path):>12}  {detail}")
    except Exception as error:  # any failure to read is reported, the audit goes on
        print(f"      UNREADABLE {size(path):>10}  {type(error).__name__}: {error}")
        problems += 1
if problems:
    print(f"{problems} of {len(ENTRIES)} missing or unreadable: run `bash download_dataset.sh"
          f"{' --dataroot ' + root if os.path.abspath(root) != os.path.abspath('data/referExpression') else ''}`")
    sys.exit(1)
print("All files present and readable.")
PY
}

# Every region-feature LMDB of the data root read record by record (tools/audit_features.py, the same audit as
# by hand): layout, images, boxes per image, feature width, and what is wrong. Exit 1 on any problem.
audit_features() {
  local lmdbs=() dir
  while IFS= read -r -d '' dir; do
    if [ -f "$dir/data.mdb" ]; then lmdbs+=("$dir"); fi
  done < <(find "$DATA_ROOT" -maxdepth 2 -name '*.lmdb' -type d -print0 2>/dev/null | sort -z)
  [ ${#lmdbs[@]} -gt 0 ] || return 0
  echo
  "$PYTHON" "$SCRIPT_DIR/tools/audit_features.py" "${lmdbs[@]}"
}

# Does the file start like an HTML page (a login, error or preview page instead of the file)?
is_html() { head -c 1024 "$1" | tr 'A-Z' 'a-z' | grep -qE '<!doctype html|<html'; }

# fetch URL DEST: download to DEST.part (resuming a previous attempt), refuse HTML, then move into place.
fetch() {
  local url=$1 dest=$2 part="$2.part" status=0
  if command -v curl >/dev/null 2>&1; then
    curl --fail --location --retry 3 --continue-at - --output "$part" "$url" || status=$?
    if [ "$status" -eq 33 ]; then  # the server cannot resume: start over
      rm -f "$part"; status=0
      curl --fail --location --retry 3 --output "$part" "$url" || status=$?
    fi
  elif command -v wget >/dev/null 2>&1; then
    wget --continue --tries 3 --output-document "$part" "$url" || status=$?
  else
    die "neither curl nor wget is installed"
  fi
  if [ "$status" -ne 0 ]; then
    echo "  download failed (exit $status): $url" >&2
    return 1
  fi
  if is_html "$part"; then
    mv -f "$part" "$dest.html"
    echo "  refused: $url sent an HTML page, not the file (link expired or needs a browser?); kept as $dest.html" >&2
    return 1
  fi
  mv -f "$part" "$dest"
}

# The two annotation files from the refer project's refcoco+.zip (archive.org copy of the dead UNC server).
fetch_annotations_zip() {
  local zip="$DATA_ROOT/refcoco+.zip"
  echo "Trying the archive.org copy of refcoco+.zip for the annotations ..."
  fetch "$ARCHIVE_ZIP" "$zip" || return 1
  "$PYTHON" - "$zip" "$DATA_ROOT" <<'PY' || return 1
import os, sys, zipfile
archive, root = sys.argv[1], sys.argv[2]
with zipfile.ZipFile(archive) as z:
    for name in ("refcoco+/instances.json", "refcoco+/refs(unc).p"):
        target = os.path.join(root, name)
        if not os.path.exists(target):
            with z.open(name) as src, open(target + ".part", "wb") as dst:
                dst.write(src.read())
            os.replace(target + ".part", target)
            print(f"  extracted {name}")
PY
  rm -f "$zip"
}

if [ "$CHECK" -eq 1 ]; then
  audit && status=0 || status=$?
  audit_features || status=1
  print_checkpoint_hints
  exit "$status"
fi

command -v "$PYTHON" >/dev/null 2>&1 || die "python not found (set PYTHON=/path/to/python)"
echo "Downloading RefCOCO+ into $DATA_ROOT${MIRROR:+ from $MIRROR}"
failed_annotations=0 failed=0
for entry in "${FILES[@]}"; do
  relative=${entry%%|*}
  link=${entry#*|}
  dest="$DATA_ROOT/$relative"
  mkdir -p "$(dirname "$dest")"
  if [ -s "$dest" ] && ! is_html "$dest"; then
    echo "= $relative: already present ($(du -h "$dest" | cut -f1)), skipped"
    continue
  fi
  if [ -n "$MIRROR" ]; then url="${MIRROR%/}/${link#*/}"; else url="$DROPBOX/$link?dl=1"; fi
  echo "+ $relative <- $url"
  if fetch "$url" "$dest"; then
    echo "  done ($(du -h "$dest" | cut -f1))"
  elif [ -z "$MIRROR" ] && [ "${relative#refcoco+/}" != "$relative" ]; then
    failed_annotations=1
  else
    failed=1
  fi
done
if [ "$failed_annotations" -eq 1 ] && ! fetch_annotations_zip; then
  failed=1
fi

echo
audit && status=0 || status=$?
print_checkpoint_hints
if [ "$failed" -ne 0 ] || [ "$status" -ne 0 ]; then
  die "some files could not be downloaded or read (see above); run the same command again to resume"
fi
