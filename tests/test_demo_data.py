import base64
import json
import pickle
import subprocess
import sys
from pathlib import Path

import lmdb
import numpy as np
import pytest

from pyutils.refer import REFER
from vilbert.demo_data import (BLOCK, COLOUR_OFFSET, COLOURS, DETECTED_LMDB, GT_LMDB, IMAGE_SIZES, KIND_OFFSET, KINDS,
                               make_demo_dataset)
from vilbert.dataset import iou_plus_one
from vilbert.refer_datasets import feature_files

REPO = Path(__file__).resolve().parents[1]
TINY = dict(num_train_images=10, num_val_images=4, num_test_images=3)
SIZES = dict(seed=0, num_train_images=48, num_val_images=16, num_test_images=8)
REF_FIELDS = {"sent_ids", "file_name", "ann_id", "ref_id", "image_id", "split", "category_id", "sentences"}


def read_lmdb(path):
    """{key: unpickled record} and the b'keys' list of an LMDB folder."""
    env = lmdb.open(str(path), readonly=True, lock=False)
    with env.begin() as txn:
        records = {key: pickle.loads(value) for key, value in txn.cursor() if key != b"keys"}
        keys = pickle.loads(txn.get(b"keys"))
    env.close()
    return records, keys


def decode(record):
    """(boxes [N, 4], features [N, 2048]) of a record in either layout."""
    if isinstance(record["features"], str):
        n = int(record["num_boxes"])
        return (np.frombuffer(base64.b64decode(record["boxes"]), np.float32).reshape(n, 4),
                np.frombuffer(base64.b64decode(record["features"]), np.float32).reshape(n, 2048))
    return record["boxes"], record["features"]


def attributes(feature):
    """(colour, kind) indices a region's feature encodes, or (None, None) for a region on no object."""
    colours = feature[COLOUR_OFFSET:COLOUR_OFFSET + BLOCK * len(COLOURS)].reshape(len(COLOURS), BLOCK).sum(1)
    kinds = feature[KIND_OFFSET:KIND_OFFSET + BLOCK * len(KINDS)].reshape(len(KINDS), BLOCK).sum(1)
    if colours.max() < BLOCK:  # an attribute block holds values >= 1.5 per dim; noise stays far below
        return None, None
    return int(colours.argmax()), int(kinds.argmax())


# This module's own roots: other tests may hold the shared fixtures' LMDBs open, and lmdb refuses to open one
# path twice in a process.
@pytest.fixture(scope="module")
def demo_root(tmp_path_factory):
    return make_demo_dataset(tmp_path_factory.mktemp("beta"), layout="beta", **SIZES)


@pytest.fixture(scope="module")
def demo_root_mt(tmp_path_factory):
    return make_demo_dataset(tmp_path_factory.mktemp("mt"), layout="mt", **SIZES)


@pytest.fixture(scope="module")
def demo(demo_root):
    with open(demo_root / "refcoco+" / "refs(unc).p", "rb") as f:
        refs = pickle.load(f)
    instances = json.loads((demo_root / "refcoco+" / "instances.json").read_text())
    return refs, instances, read_lmdb(demo_root / DETECTED_LMDB)[0], read_lmdb(demo_root / GT_LMDB)[0]


def test_official_layout_and_lmdb_keys(demo_root, demo):
    refs, instances, detected, gt = demo
    assert {p.name for p in (demo_root / DETECTED_LMDB).iterdir()} == {"data.mdb", "lock.mdb"}
    assert sorted(p.name for p in demo_root.iterdir()) == sorted(["refcoco+", DETECTED_LMDB, GT_LMDB])
    image_ids = [image["id"] for image in instances["images"]]
    for path in (DETECTED_LMDB, GT_LMDB):
        records, keys = read_lmdb(demo_root / path)
        assert keys == [str(i).encode() for i in image_ids] and set(records) == set(keys)


def test_refs_have_the_official_fields(demo):
    refs, instances, _, _ = demo
    ann_ids = {ann["id"] for ann in instances["annotations"]}
    sent_ids = [s["sent_id"] for ref in refs for s in ref["sentences"]]
    assert sent_ids == list(range(len(sent_ids)))
    for number, ref in enumerate(refs):
        assert set(ref) == REF_FIELDS and ref["ref_id"] == number and ref["ann_id"] in ann_ids
        assert ref["file_name"].startswith(f"COCO_train2014_{ref['image_id']:012d}_")
        assert ref["sent_ids"] == [s["sent_id"] for s in ref["sentences"]]
        for sent in ref["sentences"]:
            assert set(sent) == {"tokens", "raw", "sent_id", "sent"}
            assert sent["tokens"] == sent["sent"].split() and sent["sent"] == sent["sent"].lower()
            assert sent["raw"].lower().replace(" w ", " with ") == sent["sent"]


def test_raw_text_varies_like_refcoco(demo):
    raws = [s["raw"] for ref in demo[0] for s in ref["sentences"]]
    assert any(raw.isupper() for raw in raws) and any(" w " in raw for raw in raws)


def test_every_word_is_in_the_bert_vocab(demo):
    vocab = set((REPO / "vilbert" / "bert-base-uncased-vocab.txt").read_text().split("\n"))
    words = {w for ref in demo[0] for s in ref["sentences"] for w in s["raw"].lower().split() + s["tokens"]}
    assert words and words <= vocab


def test_splits_sizes_people_and_disjoint_images(demo_root, demo):
    refs, instances, _, _ = demo
    images_of = {split: {r["image_id"] for r in refs if r["split"] == split} for split in ("train", "val", "testA", "testB")}
    assert {split: len(ids) for split, ids in images_of.items()} == {"train": 48, "val": 16, "testA": 8, "testB": 8}
    assert sum(map(len, images_of.values())) == len(instances["images"])  # every image in exactly one split
    assert all(r["category_id"] == 1 for r in refs if r["split"] == "testA")
    assert all(r["category_id"] != 1 for r in refs if r["split"] == "testB")
    assert len({r["split"] for r in refs[:20]}) > 1  # interleaved, as in the real file


def test_instances_are_coco_format(demo):
    _, instances, _, _ = demo
    assert list(instances) == ["info", "images", "licenses", "annotations", "categories"]
    assert {c["name"]: c["id"] for c in instances["categories"]}["person"] == 1
    images = {image["id"]: image for image in instances["images"]}
    for image in images.values():
        assert image["file_name"] == f"COCO_train2014_{image['id']:012d}.jpg" and image["id"] >= 600_000
        assert (image["width"], image["height"]) in IMAGE_SIZES
    for ann in instances["annotations"]:
        x, y, w, h = ann["bbox"]
        polygon = np.array(ann["segmentation"][0]).reshape(-1, 2)
        np.testing.assert_allclose(polygon.min(0), [x, y], atol=0.011)
        np.testing.assert_allclose(polygon.max(0), [x + w, y + h], atol=0.011)
        assert 0.7 * w * h < ann["area"] < w * h and ann["iscrowd"] == 0
        image = images[ann["image_id"]]
        assert x >= 0 and y >= 0 and x + w <= image["width"] and y + h <= image["height"]


def test_expression_and_features_single_out_the_referent(demo):
    """The task is solvable: the named attributes match exactly one detection, and it overlaps the referent."""
    refs, instances, detected, gt = demo
    anns = {ann["id"]: ann for ann in instances["annotations"]}
    images = {image["id"]: image for image in instances["images"]}
    kind_words = {kind.word: i for i, kind in enumerate(KINDS)}
    for ref in refs:
        x, y, w, h = anns[ref["ann_id"]]["bbox"]
        ref_box = [x, y, x + w, y + h]
        boxes, features = decode(detected[str(ref["image_id"]).encode()])
        regions = [(attributes(f), iou_plus_one([b], ref_box)[0]) for b, f in zip(boxes, features)]
        assert sum(iou > 0.5 for _, iou in regions) == 1  # the 0.5-oracle is 100%, with one right answer
        image = images[ref["image_id"]]
        assert iou_plus_one([[0, 0, image["width"], image["height"]]], ref_box)[0] < 0.5  # not the global row
        gt_boxes, gt_features = decode(gt[str(ref["image_id"]).encode()])
        assert any(np.allclose(b, ref_box, atol=1e-3) for b in gt_boxes)
        for sent in ref["sentences"]:
            colour = next((COLOURS.index(w) for w in sent["tokens"] if w in COLOURS), None)
            kind = next((kind_words[w] for w in sent["tokens"] if w in kind_words), None)
            assert colour is not None or kind is not None
            matches = [iou for (c, k), iou in regions
                       if c is not None and colour in (None, c) and kind in (None, k)]
            assert len(matches) == 1 and matches[0] > 0.5, sent["sent"]


def test_layouts_hold_the_same_data(demo_root, demo_root_mt, demo):
    beta = demo[2]
    mt = read_lmdb(demo_root_mt / DETECTED_LMDB)[0]
    assert beta.keys() == mt.keys()
    for key, record in beta.items():
        assert set(record) == {"image_id", "image_w", "image_h", "num_boxes", "boxes", "features", "cls_prob"}
        assert all(isinstance(v, str) for v in record.values())
        n = int(record["num_boxes"])
        cls_prob = np.frombuffer(base64.b64decode(record["cls_prob"]), np.float32).reshape(n, 1601)
        np.testing.assert_allclose(cls_prob.sum(1), 1.0, rtol=1e-4)
        other = mt[key]
        assert set(other) == {"image_id", "image_w", "image_h", "num_boxes", "boxes", "features"}
        assert [other[k] for k in ("image_id", "image_w", "image_h", "num_boxes")] == \
               [int(record[k]) for k in ("image_id", "image_w", "image_h", "num_boxes")]
        assert other["boxes"].dtype == other["features"].dtype == np.float32
        for a, b in zip(decode(record), decode(other)):
            np.testing.assert_array_equal(a, b)
    assert (demo_root / "refcoco+" / "refs(unc).p").read_bytes() == \
           (demo_root_mt / "refcoco+" / "refs(unc).p").read_bytes()


def test_deterministic_in_the_seed(tmp_path):
    a = make_demo_dataset(tmp_path / "a", seed=3, **TINY)
    b = make_demo_dataset(tmp_path / "b", seed=3, **TINY)
    c = make_demo_dataset(tmp_path / "c", seed=4, **TINY)
    for name in ("refs(unc).p", "instances.json"):
        assert (a / "refcoco+" / name).read_bytes() == (b / "refcoco+" / name).read_bytes()
        assert (a / "refcoco+" / name).read_bytes() != (c / "refcoco+" / name).read_bytes()
    for path in (DETECTED_LMDB, GT_LMDB):
        (records_a, keys_a), (records_b, keys_b) = read_lmdb(a / path), read_lmdb(b / path)
        assert keys_a == keys_b and all(pickle.dumps(records_a[k]) == pickle.dumps(records_b[k]) for k in keys_a)


def test_regenerating_replaces_in_place(tmp_path):
    make_demo_dataset(tmp_path, seed=1, **TINY)
    make_demo_dataset(tmp_path, seed=2, layout="mt", **TINY)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["refcoco+", DETECTED_LMDB, GT_LMDB])
    assert sorted(p.name for p in (tmp_path / "refcoco+").iterdir()) == ["instances.json", "refs(unc).p"]
    records, _ = read_lmdb(tmp_path / DETECTED_LMDB)
    assert all(isinstance(r["boxes"], np.ndarray) for r in records.values())  # the mt run's records


def test_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="layout"):
        make_demo_dataset(tmp_path, layout="lxmert")
    with pytest.raises(ValueError, match="num_train_images"):
        make_demo_dataset(tmp_path, num_train_images=0)


def test_cli(tmp_path):
    out = subprocess.run([sys.executable, str(REPO / "tools" / "make_demo_data.py"), "--out", str(tmp_path / "d"),
                          "--layout", "mt", "--num_train_images", "5", "--num_val_images", "2",
                          "--num_test_images", "1"], capture_output=True, text=True, check=True).stdout
    assert "mt-layout refcoco+ (unc) demo data" in out and (tmp_path / "d" / "refcoco+" / "refs(unc).p").is_file()
    assert [line.split()[0] for line in out.splitlines()[2:6]] == ["train", "val", "testA", "testB"]
    assert out.splitlines()[2].split()[3] == "5"  # train images


def test_refcoco_and_refcocog_share_a_root_with_refcoco_plus(tmp_path):
    for dataset in ("refcoco+", "refcoco", "refcocog"):
        make_demo_dataset(tmp_path, dataset=dataset, seed=1, **TINY)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        ["refcoco", "refcoco+", "refcocog"] + [name for dataset in ("refcoco", "refcoco+", "refcocog")
                                               for name in feature_files(dataset, "beta")])
    refcocog = REFER(tmp_path, "refcocog", "umd")  # refs(umd).p
    assert {ref["split"] for ref in refcocog.data["refs"]} == {"train", "val", "test"}
    assert {ref["split"] for ref in REFER(tmp_path, "refcoco", "unc").data["refs"]} == {"train", "val", "testA",
                                                                                        "testB"}
    with pytest.raises(ValueError, match="dataset='refclef' must be one of refcoco, refcoco\\+, refcocog"):
        make_demo_dataset(tmp_path, dataset="refclef")


def test_cli_writes_refcocog(tmp_path):
    out = subprocess.run([sys.executable, str(REPO / "tools" / "make_demo_data.py"), "--out", str(tmp_path),
                          "--dataset", "refcocog", "--num_train_images", "5", "--num_val_images", "2",
                          "--num_test_images", "1"], capture_output=True, text=True, check=True).stdout
    assert "refcocog (umd) demo data" in out and (tmp_path / "refcocog" / "refs(umd).p").is_file()
    assert [line.split()[0] for line in out.splitlines()[2:5]] == ["train", "val", "test"]
