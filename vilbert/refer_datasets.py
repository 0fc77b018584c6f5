"""RefCOCO, RefCOCO+ and RefCOCOg: everything that follows from the dataset's name, as one table.

`--dataset` picks the annotation file (`refs(<splitBy>).p`), the split names, the feature files and, for
12-in-1 models built with task tokens, the task id; `follow_dataset` moves each of those options to the new
dataset where the task config had the old dataset's value (a value the config chose itself, and any flag
given explicitly, stay). Facts: lichengunc/refer README (splitBy), vilbert-multi-task vilbert_tasks.yml
(TASK9-11, feature paths), vilbert_beta data/README.md (RefCOCO+ features only).

It imports nothing but the standard library, so `download_dataset.sh` reads it with `runpy` (no Paddle needed).
"""

from dataclasses import dataclass
from typing import Dict, Tuple


@dataclass(frozen=True)
class ReferDataset:
    name: str
    splitBy: str  # the split scheme the released features and the papers use
    splits: Tuple[str, ...]  # the `split` values of its refs file
    eval_splits: Tuple[str, ...]  # what `eval.py --split all` reports
    task_id_12in1: int  # its TASK<n> in vilbert-multi-task's vilbert_tasks.yml (the task token's id)
    refs_per_split: Tuple[int, ...]  # refs (objects) of each split in the released refs file
    images: int  # images with refs, all splits


# Counts: the TFDS ref_coco description (tensorflow/datasets vision_language/refcoco), as data_spec.md §1.4 lists them.
DATASETS: Dict[str, ReferDataset] = {d.name: d for d in (
    ReferDataset("refcoco", "unc", ("train", "val", "testA", "testB"), ("val", "testA", "testB"), 9,
                 (42404, 3811, 1975, 1810), 19994),
    ReferDataset("refcoco+", "unc", ("train", "val", "testA", "testB"), ("val", "testA", "testB"), 10,
                 (42278, 3805, 1975, 1798), 19992),
    ReferDataset("refcocog", "umd", ("train", "val", "test"), ("val", "test"), 11, (42226, 2573, 5023), 25799),
)}

# Detected-box and ground-truth-box feature LMDBs under the data root, per feature family: vilbert_beta's
# BUTD ResNet-101 (released for RefCOCO+ only; the demo data uses these names for all three) and 12-in-1's
# ResNeXt-152 (datasets.tar.gz, all three).
FEATURE_FILES = {
    "beta": ("{name}_resnet101_faster_rcnn_genome.lmdb", "{name}_gt_resnet101_faster_rcnn_genome.lmdb"),
    "12in1": ("{name}_{splitBy}/{name}_resnext152_faster_rcnn_genome.lmdb",
              "{name}_{splitBy}/{name}_gt_resnext152_faster_rcnn_genome.lmdb"),
}


class UnknownSplitError(ValueError):
    """A split name the dataset does not have."""


def feature_files(dataset: str, family: str) -> Tuple[str, str]:
    """(detected, ground truth) LMDB paths of `dataset` in `family`, relative to the data root."""
    spec = DATASETS[dataset]
    return tuple(pattern.format(name=spec.name, splitBy=spec.splitBy) for pattern in FEATURE_FILES[family])


def check_split(dataset: str, split: str, splitBy: str = "") -> None:
    """Raises UnknownSplitError naming the splits `dataset` has, unless `split` is one of them.

    Only the split scheme of the table is checked: another one (RefCOCO's google) has other split names, which
    the dataset checks against its refs file when it reads them.
    """
    spec = DATASETS[dataset]
    if splitBy and splitBy != spec.splitBy:
        return
    if split not in spec.splits:
        raise UnknownSplitError(f"{dataset} ({spec.splitBy}) has no split {split!r}; its splits are "
                                f"{', '.join(spec.splits)}")


def follow_dataset(values: dict, new: str) -> dict:
    """The options of `values` (a task config, every option present) that follow its dataset, set for `new`.

    An option moves only where it holds the old dataset's value: its splitBy, its 12-in-1 task id, its
    feature files in either family; a save_name starting with the old name gets the new one (any other gets
    `_<new>` appended, so runs of two datasets never share a folder).
    """
    old = values["dataset"]
    if old == new or old not in DATASETS or new not in DATASETS:
        return {}
    before, after = DATASETS[old], DATASETS[new]
    pairs = [("splitBy", before.splitBy, after.splitBy), ("task_id", before.task_id_12in1, after.task_id_12in1)]
    for family in FEATURE_FILES:
        for key, was, becomes in zip(("features_h5path1", "features_h5path2"), feature_files(old, family),
                                     feature_files(new, family)):
            pairs.append((key, was, becomes))
    moved = {key: becomes for key, was, becomes in pairs if values.get(key) == was}
    save_name = values.get("save_name", "")
    if save_name:
        moved["save_name"] = (new + save_name[len(old):] if save_name.startswith(old + "_")
                              else f"{save_name}_{new}")
    return moved
