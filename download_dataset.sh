#!/usr/bin/env bash
# Download RefCOCO+ (annotations + vilbert_beta bottom-up features), the data behind ViLBERT's 72.34 val, or
# RefCOCO / RefCOCOg (annotations + 12-in-1 ResNeXt-152 features).
#
#   bash download_dataset.sh                         # RefCOCO+ into data/referExpression (next to this script)
#   bash download_dataset.sh --dataset refcocog      # RefCOCOg (umd) into datasets/refcoco (12-in-1's layout)
#   bash download_dataset.sh --dataroot /big/disk    # or: DATA_ROOT=/big/disk bash download_dataset.sh
#   bash download_dataset.sh --check [--dataset D]   # audit a data root, download nothing
#   bash download_dataset.sh --check --sample 200    # ... reading back 200 feature records per LMDB, not all
#   bash download_dataset.sh --mirror URL            # fetch URL/refcoco+/instances.json, ... (same layout);
#                                                    # refcoco/refcocog: URL/datasets.tar.gz
#
# RefCOCO+ files come from the vilbert_beta Dropbox folder (the links the earlier Paddle port used); the two
# annotation files fall back to the archive.org copy of the refer project's refcoco+.zip. vilbert_beta has no
# features for RefCOCO or RefCOCOg: their only source is 12-in-1's datasets.tar.gz, one archive of all its
# downstream datasets; it is downloaded once (its size is printed first), kept for the other datasets, and
# only the dataset asked for is extracted. Interrupted downloads resume (FILE.part), an HTML page served
# instead of a file is refused, and every file is opened at the end to confirm it reads. The pretrained
# checkpoints are printed at the end, not fetched: vilbert_beta's are on Google Drive, which cannot be scripted
# reliably; 12-in-1's are direct links.
set -euo pipefail

SCRIPT_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
DATASET=refcoco+
DATA_ROOT=${DATA_ROOT:-}
MIRROR=${MIRROR:-}
PYTHON=${PYTHON:-$(command -v python || command -v python3 || echo python)}
CHECK=0
SAMPLE=0
TARBALL_12IN1=https://dl.fbaipublicfiles.com/vilbert-multi-task/datasets.tar.gz

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

usage() { sed -n '2,20p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; }
die() { echo "ERROR: $*" >&2; exit 1; }

while [ $# -gt 0 ]; do
  case "$1" in
    --dataroot) [ $# -ge 2 ] || die "--dataroot needs a directory"; DATA_ROOT=$2; shift 2 ;;
    --dataroot=*) DATA_ROOT=${1#*=}; shift ;;
    --mirror) [ $# -ge 2 ] || die "--mirror needs a URL"; MIRROR=$2; shift 2 ;;
    --mirror=*) MIRROR=${1#*=}; shift ;;
    --dataset) [ $# -ge 2 ] || die "--dataset needs refcoco, refcoco+ or refcocog"; DATASET=$2; shift 2 ;;
    --dataset=*) DATASET=${1#*=}; shift ;;
    --check) CHECK=1; shift ;;
    --sample) [ $# -ge 2 ] || die "--sample needs a number of records"; SAMPLE=$2; shift 2 ;;
    -h|--help) usage; exit 0 ;;
    *) usage >&2; die "unknown argument: $1" ;;
  esac
done
case "$DATASET" in
  refcoco+) DATA_ROOT=${DATA_ROOT:-$SCRIPT_DIR/data/referExpression} ;;
  refcoco|refcocog) DATA_ROOT=${DATA_ROOT:-$SCRIPT_DIR/datasets/refcoco} ;;
  *) die "--dataset $DATASET: choose refcoco, refcoco+ or refcocog" ;;
esac

print_checkpoint_hints() {
  if [ "$DATASET" != "refcoco+" ]; then
    cat <<EOF

12-in-1 checkpoints (direct links; vilbert_beta released none for $DATASET):
  evaluate (multi-task model, task token of $DATASET):
    https://dl.fbaipublicfiles.com/vilbert-multi-task/multi_task_model.bin
    python eval.py --task_config config/$DATASET.yml --from_pretrained multi_task_model.bin --split all
  fine-tune from (Conceptual Captions):
    https://dl.fbaipublicfiles.com/vilbert-multi-task/pretrained_model.bin
EOF
    return
  fi
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

# Audit the data root for $DATASET: the expected layout, what is found, and whether each file reads. Exit 1 if
# anything is missing or unreadable. The annotations are read by the project's own readers (pyutils/refer: no
# code from a downloaded pickle runs, one line per damaged file); LMDB records with the feature-record unpickler.
audit() {
  "$PYTHON" - "$DATA_ROOT" "$DATASET" "$SCRIPT_DIR" <<'PY'
import base64
import collections
import os
import runpy
import sys

root, dataset, project = sys.argv[1:4]
sys.path.insert(0, project)
from pyutils.refer.refer import AnnotationError, load_instances, load_refs  # noqa: E402
from pyutils.restricted_pickle import RestrictedUnpickler, feature_record_globals  # noqa: E402

table = runpy.run_path(os.path.join(project, "vilbert", "refer_datasets.py"))  # stdlib only: no Paddle needed
spec = table["DATASETS"][dataset]
RECORD_GLOBALS = feature_record_globals()


def loads(data):
    import io
    return RestrictedUnpickler(io.BytesIO(data), "an LMDB record", RECORD_GLOBALS, "not part of a feature record").load()


def size(path):
    total = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(path) for f in fs) \
        if os.path.isdir(path) else os.path.getsize(path)
    return f"{total / 2**20:,.1f} MB" if total >= 2**20 else f"{total / 2**10:,.1f} KB"


def official(value, expected):
    return "" if value == expected else f" (official {dataset}: {expected:,}; generated or partial data?)"


def check_refs(path):
    refs = load_refs(path, dataset)
    splits = collections.Counter(ref["split"] for ref in refs)
    sentences = sum(len(ref["sentences"]) for ref in refs)
    note = official(len(refs), sum(spec.refs_per_split))
    by_split = " / ".join(f"{s} {splits[s]:,}" for s in spec.splits)
    others = sorted(set(splits) - set(spec.splits))
    if others:
        by_split += f"; splits {dataset} does not have: {', '.join(others)}"
    return refs, f"{len(refs):,} refs{note}, {sentences:,} sentences; {by_split}"


def check_instances(path):
    instances = load_instances(path, dataset)
    note = official(len(instances["images"]), spec.images)
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


# The features of the family this script downloads for the dataset, or the other family's when only those are
# there (the demo data uses vilbert_beta's names for all three datasets).
families = ["beta", "12in1"] if dataset == "refcoco+" else ["12in1", "beta"]
candidates = [table["feature_files"](dataset, family) for family in families]
detected, gt = next((files for files in candidates if os.path.isdir(os.path.join(root, files[0]))), candidates[0])
ENTRIES = [
    (f"{dataset}/refs({spec.splitBy}).p", f"pickled list of the {dataset} refs: ids, split, category, sentences"),
    (f"{dataset}/instances.json", "COCO images, annotations (boxes, polygons) and categories of those images"),
    (detected, "detected boxes + region features per image (train/eval)"),
    (gt, "referred objects' gt boxes + features (mixed into train)"),
]
print(f"Data root: {os.path.abspath(root)} ({dataset}, {spec.splitBy} splits: {', '.join(spec.splits)})")
print("Sizes of these files are not published; the counts below are what the official code reads.")
problems, refs = 0, None
for relative, what in ENTRIES:
    path = os.path.join(root, relative)
    print(f"  {relative + ('/' if relative.endswith('.lmdb') else ''):<61} {what}")
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
            is_gt = relative == gt
            need = {r["image_id"] for r in refs or () if r["split"] == "train" or not is_gt}
            detail = check_lmdb(path, need, "train" if is_gt else "referred")
        print(f"      found    {size(path):>12}  {detail}")
    except AnnotationError as error:  # names the file, what is wrong and the fix
        print(f"      UNREADABLE {size(path):>10}  {error}")
        problems += 1
    except Exception as error:  # any failure to read is reported, the audit goes on
        print(f"      UNREADABLE {size(path):>10}  {type(error).__name__}: {error}")
        problems += 1
if problems:
    default_root = "data/referExpression" if dataset == "refcoco+" else "datasets/refcoco"
    where = "" if os.path.abspath(root) == os.path.abspath(default_root) else f" --dataroot {root}"
    print(f"{problems} of {len(ENTRIES)} missing or unreadable: run "
          f"`bash download_dataset.sh --dataset {dataset}{where}`")
    sys.exit(1)
print("All files present and readable.")
PY
}

# Every region-feature LMDB of the dataset (<dataset>_*.lmdb) read record by record (tools/audit_features.py, the same audit as
# by hand): layout, images, boxes per image, feature width, and what is wrong. Exit 1 on any problem.
audit_features() {
  local lmdbs=() dir
  while IFS= read -r -d '' dir; do
    if [ -f "$dir/data.mdb" ]; then lmdbs+=("$dir"); fi
  done < <(find "$DATA_ROOT" -maxdepth 2 -name "${DATASET}_*.lmdb" -type d -print0 2>/dev/null | sort -z)
  [ ${#lmdbs[@]} -gt 0 ] || return 0
  echo
  "$PYTHON" "$SCRIPT_DIR/tools/audit_features.py" --sample "$SAMPLE" "${lmdbs[@]}"
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

# Size in bytes the server announces for URL (Content-Length of the last response); empty if it says none.
remote_size() {
  { if command -v curl >/dev/null 2>&1; then curl -sIL --max-time 60 "$1"
    else wget --spider --server-response --timeout 60 "$1" 2>&1; fi || true; } |
    tr -d '\r' | awk 'tolower($1) == "content-length:" { n = $2 } END { print n }'
}

# RefCOCO / RefCOCOg: 12-in-1's datasets.tar.gz is the only source of their features. It is downloaded once
# into the data root (resumable, kept for the other datasets), then only this dataset's folders are extracted:
# refcoco/<dataset>/ (annotations) and refcoco/<dataset>_<splitBy>/ (ResNeXt-152 LMDBs).
download_12in1() {
  local url=${MIRROR:+${MIRROR%/}/datasets.tar.gz} tarball="$DATA_ROOT/datasets.tar.gz" bytes
  url=${url:-$TARBALL_12IN1}
  bytes=$(remote_size "$url")
  echo "The $DATASET features exist only in 12-in-1's datasets.tar.gz, one archive of all its downstream datasets:"
  echo "  $url"
  if [ -n "$bytes" ]; then
    echo "  size: $(awk -v n="$bytes" 'BEGIN { printf "%.1f GB", n / 2^30 }') ($bytes bytes, as the server reports it)"
  else
    echo "  size: unknown (no Content-Length from the server, or no answer)"
  fi
  echo "  It is kept as $tarball for the other datasets; only $DATASET is extracted from it."
  mkdir -p "$DATA_ROOT"
  if [ -s "$tarball" ] && { [ -z "$bytes" ] || [ "$(wc -c < "$tarball")" -eq "$bytes" ]; }; then
    echo "= datasets.tar.gz: already downloaded, skipped"
  else
    echo "+ datasets.tar.gz <- $url"
    fetch "$url" "$tarball" || return 1
  fi
  echo "Extracting $DATASET ..."
  "$PYTHON" - "$tarball" "$DATA_ROOT" "$DATASET" "$SCRIPT_DIR" <<'PY'
import os
import runpy
import shutil
import sys
import tarfile

archive, root, dataset, project = sys.argv[1:5]
spec = runpy.run_path(os.path.join(project, "vilbert", "refer_datasets.py"))["DATASETS"][dataset]
folders = [f"/refcoco/{dataset}/", f"/refcoco/{dataset}_{spec.splitBy}/"]  # annotations, features
extracted = 0
with tarfile.open(archive, "r|*") as tar:  # streamed: one pass, nothing else written
    for member in tar:
        name = "/" + member.name
        starts = [name.index(folder) for folder in folders if folder in name]
        if not member.isfile() or not starts:
            continue
        relative = name[starts[0] + len("/refcoco/"):]
        if ".." in relative.split("/"):
            continue
        target = os.path.join(root, relative)
        os.makedirs(os.path.dirname(target), exist_ok=True)
        with tar.extractfile(member) as src, open(target + ".part", "wb") as dst:
            shutil.copyfileobj(src, dst, 1 << 20)
        os.replace(target + ".part", target)
        extracted += 1
        print(f"  extracted {relative} ({member.size / 2**20:,.1f} MB)")
if not extracted:
    sys.exit(f"  {archive} holds no refcoco/{dataset}/ folder: is it 12-in-1's datasets.tar.gz?")
PY
}

if [ "$CHECK" -eq 1 ]; then
  audit && status=0 || status=$?
  audit_features || status=1
  print_checkpoint_hints
  exit "$status"
fi

command -v "$PYTHON" >/dev/null 2>&1 || die "python not found (set PYTHON=/path/to/python)"
if [ "$DATASET" != "refcoco+" ]; then
  echo "Downloading $DATASET into $DATA_ROOT${MIRROR:+ from $MIRROR}"
  download_12in1 && failed=0 || failed=1
  echo
  audit && status=0 || status=$?
  print_checkpoint_hints
  if [ "$failed" -ne 0 ] || [ "$status" -ne 0 ]; then
    die "some files could not be downloaded or read (see above); run the same command again to resume"
  fi
  exit 0
fi
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
