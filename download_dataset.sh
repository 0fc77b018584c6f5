#!/usr/bin/env bash
# Download RefCOCO+ (annotations + vilbert_beta bottom-up features), the data behind ViLBERT's 72.34 val, or
# RefCOCO / RefCOCOg (annotations + 12-in-1 ResNeXt-152 features), or VQA 2.0 (--task vqa).
#
#   bash download_dataset.sh                         # RefCOCO+ into data/referExpression (next to this script)
#   bash download_dataset.sh --dataset refcocog      # RefCOCOg (umd) into datasets/refcoco (12-in-1's layout)
#   bash download_dataset.sh --task vqa              # VQA 2.0 into data/VQA, its COCO features into data/coco
#   bash download_dataset.sh --dataroot /big/disk    # or: DATA_ROOT=/big/disk bash download_dataset.sh
#   bash download_dataset.sh --check [--dataset D]   # audit a data root, download nothing (--task vqa: VQA's)
#   bash download_dataset.sh --check --sample 200    # ... reading back 200 feature records per LMDB, not all
#   bash download_dataset.sh --mirror URL            # fetch URL/refcoco+/instances.json, ... (same layout);
#                                                    # refcoco/refcocog: URL/datasets.tar.gz; vqa: URL/<zip>,
#                                                    # URL/datasets.tar.gz, URL/coco_*_genome.lmdb/data.mdb
#
# RefCOCO+ files come from the vilbert_beta Dropbox folder (the links the earlier Paddle port used); the two
# annotation files fall back to the archive.org copy of the refer project's refcoco+.zip. vilbert_beta has no
# features for RefCOCO or RefCOCOg: their only source is 12-in-1's datasets.tar.gz, one archive of all its
# downstream datasets; it is downloaded once (its size is printed first), kept for the other datasets, and
# only the dataset asked for is extracted. Interrupted downloads resume (FILE.part), an HTML page served
# instead of a file is refused, and every file is opened at the end to confirm it reads. A host that cannot be
# reached at all (no DNS answer, connection refused) stops the run at once, in one line: without a network, serve
# the files with --mirror or copy them in by hand. The pretrained checkpoints are printed at the end, not
# fetched: vilbert_beta's are on Google Drive, which cannot be scripted reliably; 12-in-1's are direct links.
#
# VQA 2.0: the questions and annotations are visualqa.org's zips, from its S3 bucket (bottom-up-attention-vqa's
# tools/download.sh fetches the same names from visualqa.org/data/mscoco/vqa/). The answer caches
# (cache/{train,val}_target.pkl, cache/trainval_{ans2label,label2ans}.pkl: compute_softscore.py's output, which no
# ViLBERT repo has a script for) come only in 12-in-1's datasets.tar.gz, of which just those four files are
# extracted. vilbert_beta's COCO features are in a Dropbox folder with no link per file: the script says where to
# put them (or fetches them from --mirror).
set -euo pipefail

SCRIPT_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
TASK=
DATASET=
DATA_ROOT=${DATA_ROOT:-}
MIRROR=${MIRROR:-}
PYTHON=${PYTHON:-$(command -v python || command -v python3 || echo python)}
CHECK=0
SAMPLE=0
TARBALL_12IN1=https://dl.fbaipublicfiles.com/vilbert-multi-task/datasets.tar.gz
BETA_PRETRAINED=https://drive.google.com/drive/folders/1JVM5WiolJJLnY9_lruxSaSop7IFX8a-v

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

# VQA 2.0 (the file names of vilbert/vqa_data.py). visualqa.org's zips | the file of each the data root keeps
VQA_S3=https://s3.amazonaws.com/cvmlp/vqa/mscoco/vqa
VQA_ZIPS=(
  "v2_Questions_Train_mscoco.zip|v2_OpenEnded_mscoco_train2014_questions.json"
  "v2_Questions_Val_mscoco.zip|v2_OpenEnded_mscoco_val2014_questions.json"
  "v2_Questions_Test_mscoco.zip|v2_OpenEnded_mscoco_test2015_questions.json"
  "v2_Annotations_Train_mscoco.zip|v2_mscoco_train2014_annotations.json"
  "v2_Annotations_Val_mscoco.zip|v2_mscoco_val2014_annotations.json"
)
VQA_CACHE=(cache/train_target.pkl cache/val_target.pkl cache/trainval_ans2label.pkl cache/trainval_label2ans.pkl)
# vilbert_beta data/README.md, "Download the Feature": COCO (train2014 + val2014, and test2015)
COCO_DROPBOX=https://www.dropbox.com/sh/09182lupkagw1ov/AACShSEVClAh6CzbhyIKxmtga?dl=0
COCO_LMDBS=(coco_trainval_resnet101_faster_rcnn_genome.lmdb coco_test_resnet101_faster_rcnn_genome.lmdb)
# 12-in-1 data/README.md, "COCO features": direct links (ResNeXt-152, 100 boxes; config/vqa_12in1.yml reads them)
COCO_12IN1=https://dl.fbaipublicfiles.com/vilbert-multi-task/datasets/coco/features_100

usage() { sed -n '2,/^set -euo/p' "${BASH_SOURCE[0]}" | sed -e '$d' -e 's/^# \{0,1\}//'; }
die() { echo "ERROR: $*" >&2; exit 1; }

while [ $# -gt 0 ]; do
  case "$1" in
    --dataroot) [ $# -ge 2 ] || die "--dataroot needs a directory"; DATA_ROOT=$2; shift 2 ;;
    --dataroot=*) DATA_ROOT=${1#*=}; shift ;;
    --mirror) [ $# -ge 2 ] || die "--mirror needs a URL"; MIRROR=$2; shift 2 ;;
    --mirror=*) MIRROR=${1#*=}; shift ;;
    --dataset) [ $# -ge 2 ] || die "--dataset needs refcoco, refcoco+ or refcocog"; DATASET=$2; shift 2 ;;
    --dataset=*) DATASET=${1#*=}; shift ;;
    --task) [ $# -ge 2 ] || die "--task needs refer or vqa"; TASK=$2; shift 2 ;;
    --task=*) TASK=${1#*=}; shift ;;
    --check) CHECK=1; shift ;;
    --sample) [ $# -ge 2 ] || die "--sample needs a number of records"; SAMPLE=$2; shift 2 ;;
    -h|--help) usage; exit 0 ;;
    *) usage >&2; die "unknown argument: $1" ;;
  esac
done
# VQA's one dataset is called vqa (the configs' `dataset: vqa`), so --dataset vqa picks the task too.
if [ -z "$TASK" ]; then
  if [ "$DATASET" = vqa ]; then TASK=vqa; else TASK=refer; fi
fi
case "$TASK" in
  refer)
    DATASET=${DATASET:-refcoco+}
    case "$DATASET" in
      refcoco+) DATA_ROOT=${DATA_ROOT:-$SCRIPT_DIR/data/referExpression} ;;
      refcoco|refcocog) DATA_ROOT=${DATA_ROOT:-$SCRIPT_DIR/datasets/refcoco} ;;
      *) die "--dataset $DATASET: choose refcoco, refcoco+ or refcocog" ;;
    esac ;;
  vqa)
    case "${DATASET:-vqa}" in
      vqa) ;;
      *) die "--dataset $DATASET is a referring-expression dataset: it goes with --task refer, not vqa" ;;
    esac
    DATASET=vqa
    DATA_ROOT=${DATA_ROOT:-$SCRIPT_DIR/data/VQA}
    COCO_ROOT=$(dirname "$DATA_ROOT")/coco ;;  # vilbert_beta: data/VQA beside data/coco
  *) die "--task $TASK: choose refer or vqa" ;;
esac

print_checkpoint_hints() {
  case "$DATASET" in
    refcoco+) print_beta_checkpoints "ViLBERT fine-tuned on RefCOCO+, the paper's model" \
                "https://drive.google.com/drive/folders/1GWY2fEbZCYHkcnxd0oysU0olfPdzcD3l" \
                refcoco+_bert_base_6layer_6conect-pretrained/pytorch_model_19.bin ;;
    vqa) print_beta_checkpoints "ViLBERT fine-tuned on VQA, the paper's model" \
           "https://drive.google.com/drive/folders/1nrcVww0u_vozcFRQVr58-YH5LOU1ZiWT" \
           VQA_bert_base_6layer_6conect-pretrained/pytorch_model_19.bin
         print_12in1_checkpoints vqa_12in1 minval "" ;;
    *) print_12in1_checkpoints "$DATASET" all "; vilbert_beta released none for $DATASET" ;;
  esac
}

# print_12in1_checkpoints CONFIG SPLIT NOTE: 12-in-1's checkpoints, and how to evaluate the multi-task one.
print_12in1_checkpoints() {
  cat <<EOF

12-in-1 checkpoints (direct links$3):
  evaluate (multi-task model, task token of $DATASET):
    https://dl.fbaipublicfiles.com/vilbert-multi-task/multi_task_model.bin
    python eval.py --task_config config/$1.yml --from_pretrained multi_task_model.bin --split $2
  fine-tune from (Conceptual Captions):
    https://dl.fbaipublicfiles.com/vilbert-multi-task/pretrained_model.bin
EOF
}

# print_beta_checkpoints WHAT FOLDER PATH: vilbert_beta's pretrained checkpoint and its fine-tuned one for the task.
print_beta_checkpoints() {
  cat <<EOF

Pretrained weights (Google Drive folders: download in a browser, then place the file as shown):
  fine-tune from (ViLBERT 6-layer, Conceptual Captions):
    $BETA_PRETRAINED
    -> $SCRIPT_DIR/checkpoints/bert_base_6_layer_6_connect_freeze_0/pytorch_model_8.bin
  evaluate ($1):
    $2
    -> $SCRIPT_DIR/checkpoints/$3
EOF
  local ckpt
  for ckpt in bert_base_6_layer_6_connect_freeze_0/pytorch_model_8.bin "$3"; do
    if [ -f "$SCRIPT_DIR/checkpoints/$ckpt" ]; then echo "  found:   checkpoints/$ckpt"
    else echo "  missing: checkpoints/$ckpt (optional)"; fi
  done
}

# Python both audits start with: sizes, and an LMDB folder read with the feature-record unpickler (no code from
# a downloaded pickle runs). run_audit puts it before the audit's own code; sys.argv[1] is this project.
AUDIT_HELPERS=$(cat <<'PY'
import base64
import io
import os
import sys

sys.path.insert(0, sys.argv[1])
from pyutils.restricted_pickle import RestrictedUnpickler, feature_record_globals  # noqa: E402

RECORD_GLOBALS = feature_record_globals()
NO_DATA_MDB = "the folder is there, its data.mdb is not: a download that failed or has not finished"


def loads(data):
    return RestrictedUnpickler(io.BytesIO(data), "an LMDB record", RECORD_GLOBALS, "not part of a feature record").load()


def size(path):
    total = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(path) for f in fs) \
        if os.path.isdir(path) else os.path.getsize(path)
    return f"{total / 2**20:,.1f} MB" if total >= 2**20 else f"{total / 2**10:,.1f} KB"


def entry(relative, path, what, optional=""):
    """Prints the audit line of an expected file or LMDB folder and, when it is not there (an LMDB folder counts
    only with its data.mdb), why; returns (there, problems): whether to read it, and 1 when its absence is a
    problem (an `optional` entry, whose reason this is, is only reported as absent)."""
    print(f"  {relative + ('/' if relative.endswith('.lmdb') else ''):<61} {what}")
    if not os.path.exists(path):
        print(f"      absent   (optional: {optional})" if optional else f"      MISSING  {path}")
        return False, 0 if optional else 1
    if relative.endswith(".lmdb") and not os.path.isfile(os.path.join(path, "data.mdb")):
        print(f"      MISSING  {os.path.join(path, 'data.mdb')} ({NO_DATA_MDB})")
        return False, 1
    return True, 0


def lmdb_images(path):
    """The image ids an LMDB folder lists, and a description: how many, the record layout (of the first)."""
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
    lock = "" if os.path.isfile(os.path.join(path, "lock.mdb")) else "; no lock.mdb (not needed to read)"
    return {int(k) for k in keys}, f"{len(keys):,} images, {layout}{lock}"
PY
)

# run_audit ARG... <<'PY' CODE PY: runs AUDIT_HELPERS + CODE with sys.argv[1:] = this project, ARG...
run_audit() { { printf '%s\n' "$AUDIT_HELPERS"; cat; } | "$PYTHON" - "$SCRIPT_DIR" "$@"; }

# Audit the data root for $DATASET: the expected layout, what is found, and whether each file reads. Exit 1 if
# anything is missing or unreadable. The annotations are read by the project's own readers (pyutils/refer: no
# code from a downloaded pickle runs, one line per damaged file); LMDB records with the feature-record unpickler.
audit_refer() {
  run_audit "$DATA_ROOT" "$DATASET" <<'PY'
import collections
import runpy

project, root, dataset = sys.argv[1:4]
from pyutils.refer.refer import AnnotationError, load_instances, load_refs  # noqa: E402

table = runpy.run_path(os.path.join(project, "vilbert", "refer_datasets.py"))  # stdlib only: no Paddle needed
spec = table["DATASETS"][dataset]


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
    ids, detail = lmdb_images(path)
    uncovered = need_ids - ids
    if uncovered:
        raise ValueError(f"{len(uncovered):,} {what} images have no record, e.g. {sorted(uncovered)[:3]}")
    return detail


# The features of the family this script downloads for the dataset, or the other family's when only those are
# there (the demo data uses vilbert_beta's names for all three datasets).
families = ["beta", "12in1"] if dataset == "refcoco+" else ["12in1", "beta"]
candidates = [table["feature_files"](dataset, family) for family in families]
detected, gt = next((files for files in candidates if os.path.isfile(os.path.join(root, files[0], "data.mdb"))),
                    candidates[0])
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
    there, absent = entry(relative, path, what)
    problems += absent
    if not there:
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

# Audit a VQA data root and its features: each file present and read by the training code's own readers
# (vilbert/vqa_data.py, vilbert/vqa_answers.py: plain data only, no Paddle), then checked against the others:
# the annotations answer the questions of their file, ans2label and label2ans are one vocabulary, the targets are
# of the questions of their file with labels inside that vocabulary (vqa_data.load_split, as training reads
# them), and the features hold every image the questions ask about. One line per problem; exit 1 if any.
audit_vqa() {
  run_audit "$DATA_ROOT" "$COCO_ROOT" <<'PY'
import runpy

project, root, coco = sys.argv[1:4]
vqa = runpy.run_path(os.path.join(project, "vilbert", "vqa_data.py"))
answers = runpy.run_path(os.path.join(project, "vilbert", "vqa_answers.py"))
DataErrors = (vqa["VQADataError"], answers["VQAAnswersError"])  # their messages name the file and the fix
QUESTION_FILES, TARGET_FILES, ANNOTATION_FILES = vqa["QUESTION_FILES"], vqa["TARGET_FILES"], vqa["ANNOTATION_FILES"]
SUBTYPES = {"train": "train2014", "val": "val2014", "test": "test2015"}

# vilbert_beta's features (what this script fetches), or 12-in-1's (config/vqa_12in1.yml) when only those are there
FAMILIES = [("coco_trainval_resnet101_faster_rcnn_genome.lmdb", "coco_test_resnet101_faster_rcnn_genome.lmdb"),
            ("features_100/COCO_trainval_resnext152_faster_rcnn_genome.lmdb",
             "features_100/COCO_test_resnext152_faster_rcnn_genome.lmdb")]
trainval_lmdb, test_lmdb = next((f for f in FAMILIES if os.path.isfile(os.path.join(coco, f[0], "data.mdb"))),
                                FAMILIES[0])
questions, vocabulary = {}, {}  # what the entries before have read


def check_questions(path, part):
    questions[part] = vqa["read_questions"](path)
    images = {q["image_id"] for q in questions[part]}
    return f"{len(questions[part]):,} questions on {len(images):,} images", []


def check_annotations(path, part):
    records = answers["read_annotation_list"](path)
    detail = f"{len(records):,} questions, {sum(len(r['answers']) for r in records):,} human answers"
    if part in questions and {r["question_id"] for r in records} != {q["question_id"] for q in questions[part]}:
        return detail, [f"{path} answers other questions than {os.path.join(root, QUESTION_FILES[part])}: take "
                        f"both from visualqa.org's zips of one release"]
    return detail, []


def check_ans2label(path, _):
    ans2label = vqa["read_pickle"](path)
    if not isinstance(ans2label, dict):
        raise vqa["VQADataError"](f"{path} holds a {type(ans2label).__name__}, not a dict of answer -> label")
    return f"{len(ans2label):,} answers (the width of the VQA head)", []


def check_label2ans(path, _):
    label2ans = vqa["read_pickle"](path)
    if not isinstance(label2ans, list):
        raise vqa["VQADataError"](f"{path} holds a {type(label2ans).__name__}, not a list of answers by label")
    detail = f"{len(label2ans):,} answers"
    if not os.path.isfile(os.path.join(root, vqa["ANS2LABEL"])):
        return detail, []
    try:
        vocabulary["ans2label"] = vqa["read_answer_vocab"](root)[0]
    except DataErrors as error:
        return detail, [str(error)]
    return detail + ", the inverse of trainval_ans2label.pkl", []


def check_targets(path, part):
    targets = vqa["read_targets"](path)
    detail = (f"{len(targets):,} targets, {sum(not t['labels'] for t in targets):,} without an answer of the "
              "vocabulary")
    if part not in questions:
        return detail, []
    ans2label = vocabulary.get("ans2label")
    try:  # the question file's questions, one target each, labels inside the vocabulary (when there is one)
        vqa["load_split"](root, part, len(ans2label) if ans2label else sys.maxsize)
    except DataErrors as error:
        return detail, [str(error)]
    return detail, []


def check_features(path, parts):
    ids, detail = lmdb_images(path)
    need = {q["image_id"] for part in parts for q in questions.get(part, ())}
    missing = sorted(need - ids)
    if not missing:
        return detail, []
    files = " and ".join(QUESTION_FILES[part] for part in parts)
    return detail, [f"{path}: {len(missing):,} of the {len(need):,} images of {files} have no record, e.g. "
                    f"{missing[:3]}: these features are not of these questions; take them from one download (or "
                    "extract these images' features too)"]


ENTRIES = (
    [(QUESTION_FILES[p], f"{SUBTYPES[p]} questions", check_questions, p, True) for p in ("train", "val", "test")]
    + [(ANNOTATION_FILES[p], f"10 human answers each ({SUBTYPES[p]}; the official accuracy)", check_annotations, p,
        False) for p in ("train", "val")]
    + [(vqa["ANS2LABEL"], "answer -> label", check_ans2label, None, True),
       (vqa["LABEL2ANS"], "label -> answer", check_label2ans, None, True)]
    + [(TARGET_FILES[p], f"soft-score targets of the {SUBTYPES[p]} questions", check_targets, p, True)
       for p in ("train", "val")]
    + [(os.path.join(os.path.relpath(coco, root), trainval_lmdb), "train2014 + val2014 region features",
        check_features, ("train", "val"), True),
       (os.path.join(os.path.relpath(coco, root), test_lmdb), "test2015 region features", check_features, ("test",),
        True)])
print(f"Data root: {os.path.abspath(root)} (VQA 2.0; features in {os.path.abspath(coco)})")
bad = 0
for relative, what, check, part, required in ENTRIES:
    path = os.path.normpath(os.path.join(root, relative))
    there, absent = entry(relative, path, what, "" if required else "the official accuracy reads it")
    bad += absent
    if not there:
        continue
    try:
        detail, problems = check(path, part)
    except DataErrors as error:
        print(f"      UNREADABLE {size(path):>10}  {error}")
        bad += 1
        continue
    except Exception as error:  # any failure to read is reported, the audit goes on
        print(f"      UNREADABLE {size(path):>10}  {type(error).__name__}: {error}")
        bad += 1
        continue
    print(f"      found    {size(path):>12}  {detail}")
    for problem in problems:
        print(f"      PROBLEM  {problem}")
    bad += bool(problems)
if all(part in questions for part in ("train", "val", "test")):
    print(f"Splits (vilbert/vqa_data.py, as vilbert_beta builds them: minval = the last {vqa['MINVAL_SIZE']:,} val "
          "questions by id):")
    for split in vqa["SPLITS"]:
        count = sum(len(questions[part][cut]) for part, cut in vqa["SPLIT_PARTS"][split])
        print(f"  {split:<9} {count:>10,} questions")
    if len(questions["val"]) <= vqa["MINVAL_SIZE"]:
        print(f"  (val has only {len(questions['val']):,} questions: minval is all of val, trainval is train only)")
if bad:
    where = "" if os.path.abspath(root) == os.path.join(project, "data", "VQA") else f" --dataroot {root}"
    print(f"{bad} of {len(ENTRIES)} missing, unreadable or inconsistent: run `bash download_dataset.sh --task vqa"
          f"{where}` for what is missing; files inconsistent with each other must come from one download")
    sys.exit(1)
print("All files present and readable.")
PY
}

audit() { if [ "$TASK" = vqa ]; then audit_vqa; else audit_refer; fi; }

# Every region-feature LMDB of the dataset (<dataset>_*.lmdb; VQA: the COCO ones beside its root) read record by
# record (tools/audit_features.py, the same audit as by hand): layout, images, boxes per image, feature width,
# and what is wrong. Exit 1 on any problem.
audit_features() {
  local lmdbs=() dir search=("$DATA_ROOT" -maxdepth 2 -name "${DATASET}_*.lmdb")
  [ "$TASK" != vqa ] || search=("$COCO_ROOT" -maxdepth 2 -iname "coco_*.lmdb")
  while IFS= read -r -d '' dir; do
    if [ -f "$dir/data.mdb" ]; then lmdbs+=("$dir"); fi
  done < <(find "${search[@]}" -type d -print0 2>/dev/null | sort -z)
  [ ${#lmdbs[@]} -gt 0 ] || return 0
  echo
  "$PYTHON" "$SCRIPT_DIR/tools/audit_features.py" --sample "$SAMPLE" "${lmdbs[@]}"
}

# Does the file start like an HTML page (a login, error or preview page instead of the file)?
is_html() { head -c 1024 "$1" | tr 'A-Z' 'a-z' | grep -qE '<!doctype html|<html'; }

# check_reachable URL: ends the run, in one line, when URL's host cannot be reached at all (no DNS answer,
# connection refused: curl exit 6 / 7, wget exit 4): every other URL would fail the same way, after retries
# (curl retries a failed DNS lookup 3 times, 1 + 2 + 4 s, per URL). Asked once per host, without retries.
REACHABLE_HOSTS=" "
check_reachable() {
  local url=$1 host status=0
  host=${url#*://}; host=${host%%/*}
  case "$REACHABLE_HOSTS" in *" $host "*) return 0 ;; esac
  if command -v curl >/dev/null 2>&1; then
    curl --silent --head --max-time 30 --output /dev/null "$url" || status=$?
    case "$status" in 6|7) status=unreachable ;; esac
  else
    wget --quiet --spider --tries 1 --timeout 30 "$url" || status=$?
    case "$status" in 4) status=unreachable ;; esac
  fi
  if [ "$status" = unreachable ]; then
    die "the network is unreachable: cannot connect to $host (no DNS answer or connection refused)." \
      "Fetch the files on a machine with network access, then serve them here with --mirror URL (the layout is in" \
      "--help) or copy them by hand to the paths --check lists, and run --check"
  fi
  REACHABLE_HOSTS="$REACHABLE_HOSTS$host "
}

# fetch URL DEST: download to DEST.part (resuming a previous attempt), refuse HTML, then move into place. DEST's
# folder is made for the download and removed again if the download fails and leaves it empty: a failed run
# leaves no empty LMDB folder behind for --check or train.py to take for a damaged one.
fetch() {
  local url=$1 dest=$2 part="$2.part" status=0 made=
  check_reachable "$url"
  if [ ! -d "$(dirname "$dest")" ]; then
    made=$(dirname "$dest")
    mkdir -p "$made"
  fi
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
    if [ -n "$made" ]; then rmdir "$made" 2>/dev/null || true; fi  # kept when it holds DEST.part, to resume
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
            os.makedirs(os.path.dirname(target), exist_ok=True)
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

# size_text BYTES: a size as the server reports it (remote_size), for the line announcing a download.
size_text() {
  if [ -z "$1" ]; then echo "unknown (no Content-Length from the server, or no answer)"; return; fi
  awk -v n="$1" 'BEGIN { if (n >= 2^30) printf "%.1f GB", n / 2^30; else printf "%.1f MB", n / 2^20 }'
  echo " ($1 bytes, as the server reports it)"
}

# download_12in1 WHAT PART: 12-in-1's datasets.tar.gz is the only source of WHAT (RefCOCO / RefCOCOg features,
# the VQA answer caches). It is downloaded once into the data root (resumable, kept for the other datasets), then
# only PART is extracted: refcoco/<dataset>/ (annotations) and refcoco/<dataset>_<splitBy>/ (ResNeXt-152 LMDBs),
# or for VQA the files of $VQA_CACHE from VQA/ (its other caches are 12-in-1's tokenized ones, torch tensors).
download_12in1() {
  local what=$1 part=$2 url=${MIRROR:+${MIRROR%/}/datasets.tar.gz} tarball="$DATA_ROOT/datasets.tar.gz" bytes
  url=${url:-$TARBALL_12IN1}
  bytes=$(remote_size "$url")
  echo "$what exist only in 12-in-1's datasets.tar.gz, one archive of all its downstream datasets:"
  echo "  $url"
  echo "  size: $(size_text "$bytes")"
  echo "  It is kept as $tarball for the other datasets; only $part is extracted from it."
  mkdir -p "$DATA_ROOT"
  if [ -s "$tarball" ] && { [ -z "$bytes" ] || [ "$(wc -c < "$tarball")" -eq "$bytes" ]; }; then
    echo "= datasets.tar.gz: already downloaded, skipped"
  else
    echo "+ datasets.tar.gz <- $url"
    fetch "$url" "$tarball" || return 1
  fi
  echo "Extracting $part ..."
  "$PYTHON" - "$tarball" "$DATA_ROOT" "$DATASET" "$SCRIPT_DIR" "${VQA_CACHE[@]}" <<'PY'
import os
import runpy
import shutil
import sys
import tarfile

archive, root, dataset, project, *vqa_files = sys.argv[1:]
if dataset == "vqa":  # datasets/VQA/cache/...: these files only
    strip, wanted, missing = "/VQA/", [f"/VQA/{name}" for name in vqa_files], "VQA/cache/ answer files"
else:  # datasets/refcoco/<dataset>/ and datasets/refcoco/<dataset>_<splitBy>/: all they hold
    spec = runpy.run_path(os.path.join(project, "vilbert", "refer_datasets.py"))["DATASETS"][dataset]
    strip, missing = "/refcoco/", f"refcoco/{dataset}/ folder"
    wanted = [f"/refcoco/{dataset}/", f"/refcoco/{dataset}_{spec.splitBy}/"]  # annotations, features
extracted = 0
with tarfile.open(archive, "r|*") as tar:  # streamed: one pass, nothing else written
    for member in tar:
        name = "/" + member.name
        starts = [name.index(w) for w in wanted if (w in name if w.endswith("/") else name.endswith(w))]
        if not member.isfile() or not starts:
            continue
        relative = name[starts[0] + len(strip):]
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
    sys.exit(f"  {archive} holds no {missing}: is it 12-in-1's datasets.tar.gz?")
PY
}

# extract_from_zip ZIP NAME: the file NAME of a visualqa.org zip into the data root; the zip is removed after, and
# also when it is damaged (so the next run downloads it again).
extract_from_zip() {
  "$PYTHON" - "$1" "$DATA_ROOT/$2" <<'PY' && rm -f "$1" || { rm -f "$1"; return 1; }
import os
import shutil
import sys
import zipfile

archive, target = sys.argv[1:3]
try:
    with zipfile.ZipFile(archive) as z:
        members = [m for m in z.namelist() if os.path.basename(m) == os.path.basename(target)]
        if not members:
            sys.exit(f"  {archive} holds no {os.path.basename(target)}: is it the visualqa.org zip?")
        with z.open(members[0]) as src, open(target + ".part", "wb") as dst:
            shutil.copyfileobj(src, dst, 1 << 20)
except zipfile.BadZipFile as error:
    sys.exit(f"  {archive} is damaged ({error}); removed, run again to download it again")
os.replace(target + ".part", target)
print(f"  extracted {os.path.basename(target)} ({os.path.getsize(target) / 2**20:,.1f} MB)")
PY
}

# vilbert_beta's COCO features into $COCO_ROOT: from --mirror (URL/<lmdb>/data.mdb); else printed, since the
# Dropbox folder vilbert_beta's data/README.md links has no link per file, and Dropbox does not zip a folder
# this large for download (vilbert_beta's maintainers: "download the file inside the folder"). 1 if any is missing.
fetch_coco_features() {
  local name dest url missing=()
  for name in "${COCO_LMDBS[@]}"; do
    dest="$COCO_ROOT/$name/data.mdb"
    if [ -s "$dest" ] && ! is_html "$dest"; then
      echo "= $dest: already present ($(du -h "$dest" | cut -f1)), skipped"
    elif [ -n "$MIRROR" ]; then
      url="${MIRROR%/}/$name/data.mdb"
      echo "+ $dest <- $url (size: $(size_text "$(remote_size "$url")"))"
      fetch "$url" "$dest" || missing+=("$name")
    else
      missing+=("$name")
    fi
  done
  [ ${#missing[@]} -gt 0 ] || return 0
  [ -n "$MIRROR" ] && return 1
  echo
  echo "The COCO region features (vilbert_beta: BUTD ResNet-101, 10-100 boxes) are in a Dropbox folder with no"
  echo "direct link per file, too large for Dropbox to zip; open it in a browser:"
  echo "  $COCO_DROPBOX"
  echo "and save the data.mdb of each LMDB (about 26.3 GB and 40 GB, as users report) as:"
  for name in "${missing[@]}"; do echo "  $COCO_ROOT/$name/data.mdb"; done
  echo "then run this command again. 12-in-1's COCO features (ResNeXt-152, 100 boxes; config/vqa_12in1.yml) have"
  echo "direct links:"
  for name in COCO_trainval_resnext152_faster_rcnn_genome.lmdb COCO_test_resnext152_faster_rcnn_genome.lmdb; do
    echo "  $COCO_12IN1/$name/data.mdb -> $COCO_ROOT/features_100/$name/data.mdb"
  done
  return 1
}

# VQA 2.0: each question and annotation file from its visualqa.org zip (a zip downloaded but not extracted, by a
# run that was stopped, is not downloaded again), the four answer caches from 12-in-1's archive when any is
# missing, then the COCO features. 1 if anything could not be fetched.
download_vqa() {
  local entry zip json url name failed=0 cache_missing=0
  mkdir -p "$DATA_ROOT"
  for entry in "${VQA_ZIPS[@]}"; do
    zip=${entry%%|*} json=${entry#*|}
    if [ -s "$DATA_ROOT/$json" ] && ! is_html "$DATA_ROOT/$json"; then
      echo "= $json: already present ($(du -h "$DATA_ROOT/$json" | cut -f1)), skipped"
      continue
    fi
    url=${MIRROR:+${MIRROR%/}/$zip}
    url=${url:-$VQA_S3/$zip}
    if [ ! -s "$DATA_ROOT/$zip" ]; then
      echo "+ $zip <- $url (size: $(size_text "$(remote_size "$url")"))"
      fetch "$url" "$DATA_ROOT/$zip" || { failed=1; continue; }
    fi
    extract_from_zip "$DATA_ROOT/$zip" "$json" || failed=1
  done
  for name in "${VQA_CACHE[@]}"; do [ -s "$DATA_ROOT/$name" ] || cache_missing=1; done
  if [ "$cache_missing" -eq 1 ]; then
    download_12in1 "The VQA answer caches (cache/*_target.pkl, cache/trainval_*.pkl)" \
      "VQA/cache/ (its four answer files)" || failed=1
  else
    echo "= cache/: the four answer files already present, skipped"
  fi
  fetch_coco_features || failed=1
  return "$failed"
}

if [ "$CHECK" -eq 1 ]; then
  audit && status=0 || status=$?
  audit_features || status=1
  print_checkpoint_hints
  exit "$status"
fi

command -v "$PYTHON" >/dev/null 2>&1 || die "python not found (set PYTHON=/path/to/python)"
if [ "$DATASET" != "refcoco+" ]; then
  if [ "$TASK" = vqa ]; then
    echo "Downloading VQA 2.0 into $DATA_ROOT (features: $COCO_ROOT)${MIRROR:+ from $MIRROR}"
    download_vqa && failed=0 || failed=1
  else
    echo "Downloading $DATASET into $DATA_ROOT${MIRROR:+ from $MIRROR}"
    download_12in1 "The $DATASET features" "$DATASET" && failed=0 || failed=1
  fi
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
