"""ReferExpressionDataset: entries, beta tokenization, region mixing and targets (hand-checked), the entries
cache, feature checks, and loading through paddle.io.DataLoader."""

import json
import os
import pickle
from pathlib import Path

import numpy as np
import paddle
import pytest

from test_features import feature_record, write_lmdb
from vilbert import dataset as dataset_module
from vilbert.dataset import ReferExpressionDataset, collate, iou_plus_one
from vilbert.features import build_feature_cache, open_features
from vilbert.tokenization import BertTokenizer

DET = "refcoco+_resnet101_faster_rcnn_genome.lmdb"
GT = "refcoco+_gt_resnet101_faster_rcnn_genome.lmdb"
LONG = "a b c d e f g h i j k l m n o p q r s"  # 19 wordpieces: [CLS] + 19 fills T = 20, [SEP] is cut

# Image 1 (100 x 100, train): the referred box is [0, 0, 49, 49] (xywh [0, 0, 49, 49]).
# IoU(+1) of each candidate with it, by hand (areas count pixels: a 0..49 box is 50 x 50 = 2500):
#   whole image [0,0,100,100]: 2500 / (101*101)              = 0.2450740
#   [0,0,49,49]: 1;  [5,0,54,49]: 45*50 / (5000 - 2250)     = 0.8181818
#   [10,10,59,59]: 40*40 / (5000 - 1600)                     = 0.4705882;  [50,50,99,99]: 0
#   gt [20,0,69,49]: 30*50 / (5000 - 1500)                   = 0.4285714
# Image 2 (200 x 100, val): referred box [100, 0, 199, 99]:
#   whole image [0,0,200,100]: 10000 / (201*101)             = 0.4925866;  [0,0,99,99]: 0
#   [100,0,199,99]: 1;  [150,0,199,99]: 50*100 / (5000 + 10000 - 5000) = 0.5 exactly
IMAGES = {
    1: dict(size=(100, 100), split="train", ref_box=[0, 0, 49, 49], sentences=["THE LEFT Box", LONG],
            det=[[0, 0, 49, 49], [5, 0, 54, 49], [10, 10, 59, 59], [50, 50, 99, 99]],
            gt=[[0, 0, 49, 49], [20, 0, 69, 49]]),
    2: dict(size=(200, 100), split="val", ref_box=[100, 0, 99, 99], sentences=["right one"],
            det=[[0, 0, 99, 99], [100, 0, 199, 99], [150, 0, 199, 99]], gt=[[100, 0, 199, 99]]),
}
TRAIN_TARGET = [0, 1, 0.8181818, 0, 0, 1, 0]  # values below 0.5 zeroed; det rows, then gt rows without row 0
VAL_TARGET = [0.4925866, 0, 1, 0.5]  # raw IoU


def make_root(root: Path, layout: str = "beta") -> Path:
    """A two-image RefCOCO+ root in the official layout, with the boxes above and random features."""
    rng = np.random.default_rng(0)
    refs, images, annotations, det, gt = [], [], [], {}, {}
    for image_id, spec in IMAGES.items():
        width, height = spec["size"]
        sent_ids = [10 * image_id + k for k in range(len(spec["sentences"]))]
        refs.append({"sent_ids": sent_ids, "file_name": f"x_{image_id}.jpg", "ann_id": 100 + image_id,
                     "ref_id": image_id - 1, "image_id": image_id, "split": spec["split"], "category_id": 1,
                     "sentences": [{"tokens": s.lower().split(), "raw": s, "sent_id": i, "sent": s.lower()}
                                   for s, i in zip(spec["sentences"], sent_ids)]})
        images.append({"id": image_id, "width": width, "height": height, "file_name": f"x_{image_id}.jpg"})
        annotations.append({"id": 100 + image_id, "image_id": image_id, "category_id": 1, "bbox": spec["ref_box"],
                            "segmentation": [[0, 0, 1, 0, 1, 1]], "area": 1.0, "iscrowd": 0})
        for records, boxes in ((det, spec["det"]), (gt, spec["gt"])):
            features = rng.uniform(0, 3, (len(boxes), 2048)).astype(np.float32)
            records[image_id] = feature_record(image_id, width, height, boxes, features, layout=layout)
    (root / "refcoco+").mkdir(parents=True)
    (root / "refcoco+" / "refs(unc).p").write_bytes(pickle.dumps(refs, protocol=2))
    (root / "refcoco+" / "instances.json").write_text(json.dumps(
        {"images": images, "annotations": annotations, "categories": [{"id": 1, "name": "person"}]}))
    write_lmdb(root / DET, det)
    write_lmdb(root / GT, gt)
    return root


@pytest.fixture(scope="module")
def tokenizer():
    return BertTokenizer()


@pytest.fixture
def root(tmp_path):
    return make_root(tmp_path / "beta")


def build(root, split, tokenizer, **kwargs):
    det = open_features(root / DET, cache=False)
    gt = open_features(root / GT, cache=False) if split == "train" else None
    return ReferExpressionDataset(root, split, tokenizer, det, gt, **kwargs)


def test_iou_plus_one_by_hand():
    boxes = np.array([[0, 0, 100, 100], [0, 0, 49, 49], [5, 0, 54, 49], [10, 10, 59, 59], [50, 50, 99, 99]])
    np.testing.assert_allclose(iou_plus_one(boxes, [0, 0, 49, 49]),
                               [2500 / 10201, 1, 2250 / 2750, 1600 / 3400, 0], rtol=1e-6)
    assert iou_plus_one(boxes, [0, 0, 49, 49]).dtype == np.float32


def test_entries_one_per_sentence(root, tokenizer):
    data = build(root, "train", tokenizer)
    assert len(data) == 2
    assert data.entries == [
        {"caption": "THE LEFT Box", "sent_id": 10, "ref_id": 0, "image_id": 1, "ref_box": [0.0, 0.0, 49.0, 49.0]},
        {"caption": LONG, "sent_id": 11, "ref_id": 0, "image_id": 1, "ref_box": [0.0, 0.0, 49.0, 49.0]}]
    assert build(root, "val", tokenizer).entries[0]["ref_box"] == [100.0, 0.0, 199.0, 99.0]  # x+w, y+h, no -1


def test_tokens_padding_and_truncation(root, tokenizer):
    data = build(root, "train", tokenizer)
    short, long = data[0], data[1]
    words = tokenizer.convert_tokens_to_ids(["the", "left", "box"])
    assert short["input_ids"].tolist() == [101] + words + [102] + [0] * 15
    assert short["input_mask"].tolist() == [1] * 5 + [0] * 15
    assert short["segment_ids"].tolist() == [0] * 20
    letters = tokenizer.convert_tokens_to_ids(LONG.split())
    assert long["input_ids"].tolist() == [101] + letters  # beta: the [SEP] is cut off
    assert long["input_mask"].tolist() == [1] * 20
    assert all(short[k].dtype == np.int64 for k in ("input_ids", "input_mask", "segment_ids"))


def test_12in1_tokenization_cuts_the_wordpieces_before_cls_and_sep(root, tokenizer):
    data = build(root, "train", tokenizer, tokenization="12in1")
    short, long = data[0], data[1]
    words = tokenizer.convert_tokens_to_ids(["the", "left", "box"])
    assert short["input_ids"].tolist() == [101] + words + [102] + [0] * 15  # short: as beta
    letters = tokenizer.convert_tokens_to_ids(LONG.split())
    assert long["input_ids"].tolist() == [101] + letters[:18] + [102]  # 12-in-1 keeps its [SEP]
    assert data.cache.path != build(root, "train", tokenizer).cache.path  # a cache per tokenization
    with pytest.raises(ValueError, match="tokenization='bert' must be one of beta, 12in1"):
        build(root, "train", tokenizer, tokenization="bert")


def test_train_mixes_gt_boxes_and_zeroes_low_iou(root, tokenizer):
    sample = build(root, "train", tokenizer)[0]
    det, gt = open_features(root / DET, cache=False)[1], open_features(root / GT, cache=False)[1]
    assert sample["image_mask"].tolist() == [1] * 7  # padding is collate's
    np.testing.assert_array_equal(sample["features"][:5], det.features)
    np.testing.assert_array_equal(sample["features"][5:7], gt.features[1:])  # gt whole-image row dropped
    np.testing.assert_array_equal(sample["spatials"][5:7], gt.spatials[1:])
    np.testing.assert_array_equal(sample["boxes"][:7], np.concatenate([det.boxes, gt.boxes[1:]]))
    np.testing.assert_allclose(sample["target"][:7, 0], TRAIN_TARGET, rtol=1e-6)
    assert sample["features"].shape == (7, 2048) and sample["target"].shape == (7, 1)
    assert (sample["sent_id"], sample["ref_id"], sample["image_id"]) == (10, 0, 1)


def test_val_uses_detections_and_raw_iou(root, tokenizer):
    sample = build(root, "val", tokenizer)[0]
    assert sample["image_mask"].tolist() == [1] * 4
    np.testing.assert_allclose(sample["target"][:4, 0], VAL_TARGET, rtol=1e-6)
    assert sample["target"][3, 0] == np.float32(0.5)  # an IoU of exactly 0.5 is kept as is
    np.testing.assert_array_equal(sample["spatials"][0], [0, 0, 1, 1, 1])
    np.testing.assert_array_equal(sample["boxes"][:2], [[0, 0, 200, 100], [0, 0, 99, 99]])


def test_regions_beyond_max_region_num_are_cut(root, tokenizer):
    train = build(root, "train", tokenizer, max_region_num=6)[0]  # 5 detected rows + the first gt row
    assert train["image_mask"].tolist() == [1] * 6
    np.testing.assert_allclose(train["target"][:, 0], TRAIN_TARGET[:6], rtol=1e-6)
    val = build(root, "val", tokenizer, max_region_num=3)[0]
    np.testing.assert_allclose(val["target"][:, 0], VAL_TARGET[:3], rtol=1e-6)
    assert val["features"].shape == (3, 2048)


def test_layouts_give_identical_samples(root, tmp_path, tokenizer):
    mt_root = make_root(tmp_path / "mt", layout="mt")
    for split in ("train", "val"):
        a, b = build(root, split, tokenizer), build(mt_root, split, tokenizer)
        for i in range(len(a)):
            for key, value in a[i].items():
                np.testing.assert_array_equal(value, b[i][key], err_msg=f"{split} {key}")


def test_demo_layouts_give_identical_samples(demo_root, demo_root_mt, tokenizer, tmp_path):
    for split in ("train", "val"):
        a = build(Path(demo_root), split, tokenizer, cache_dir=tmp_path / "a")
        b = build(Path(demo_root_mt), split, tokenizer, cache_dir=tmp_path / "b")
        assert len(a) == len(b)
        for i in range(0, len(a), max(1, len(a) // 20)):
            assert all(np.array_equal(value, b[i][key]) for key, value in a[i].items())


def test_entries_cache_is_reused_and_keyed(root, tokenizer, monkeypatch, tmp_path, caplog):
    first = build(root, "train", tokenizer)
    path = first.cache.path
    assert path.parent == root / "cache" and path.name.startswith("refcoco+_train_20_100_") and path.exists()

    def no_parsing(*args, **kwargs):
        raise AssertionError("the annotations were parsed although the cache is valid")

    monkeypatch.setattr(dataset_module, "REFER", no_parsing)
    cached = build(root, "train", tokenizer)
    assert cached.entries == first.entries
    assert all(np.array_equal(cached[1][k], first[1][k]) for k in first[1])
    monkeypatch.undo()

    vocab = tmp_path / "vocab.txt"
    vocab.write_text(Path(tokenizer.vocab_file).read_text() + "extraword\n")  # ids unchanged, content not
    names = {path.name,
             build(root, "train", tokenizer, max_seq_length=12).cache.path.name,
             build(root, "train", tokenizer, max_region_num=50).cache.path.name,
             build(root, "train", BertTokenizer(str(vocab))).cache.path.name}
    refs = root / "refcoco+" / "refs(unc).p"
    os.utime(refs, ns=(refs.stat().st_atime_ns, refs.stat().st_mtime_ns + 10**9))
    names.add(build(root, "train", tokenizer).cache.path.name)
    assert len(names) == 5  # every change gives a new cache; a stale one is never read

    shorter = build(root, "train", tokenizer, max_seq_length=12)
    assert shorter[1]["input_ids"].tolist() == [101] + tokenizer.convert_tokens_to_ids(LONG.split())[:11]

    current = build(root, "train", tokenizer).cache.path
    current.write_bytes(b"garbage")
    rebuilt = build(root, "train", tokenizer)
    assert "Rebuilding the entries cache" in caplog.text and rebuilt.entries == first.entries
    assert np.load(current)["sent_id"].tolist() == [10, 11]
    assert not list(current.parent.glob("*.tmp*"))


def test_cache_dir_option(root, tokenizer, tmp_path):
    data = build(root, "val", tokenizer, cache_dir=tmp_path / "elsewhere")
    assert data.cache.path.parent == tmp_path / "elsewhere" and data.cache.path.exists()


def test_bad_inputs(root, tokenizer, tmp_path):
    det = open_features(root / DET, cache=False)
    with pytest.raises(ValueError, match="pass gt_features"):
        ReferExpressionDataset(root, "train", tokenizer, det)
    with pytest.raises(FileNotFoundError, match="bash download_dataset.sh"):
        ReferExpressionDataset(tmp_path / "nothing", "val", tokenizer, det)
    with pytest.raises(ValueError, match="holds no referring expressions"):
        ReferExpressionDataset(root, "testA", tokenizer, det)

    only_image_1 = write_lmdb(tmp_path / "partial.lmdb",
                              {1: feature_record(1, 100, 100, [[0, 0, 5, 5]], np.ones((1, 2048)))})
    with pytest.raises(ValueError, match=r"1 of the 1 images of split 'val' are missing from the detected-box "
                                         r"features .*partial.lmdb \(image ids 2\)"):
        ReferExpressionDataset(root, "val", tokenizer, open_features(only_image_1, cache=False))
    no_gt = write_lmdb(tmp_path / "no_gt.lmdb", {2: feature_record(2, 100, 100, [[0, 0, 5, 5]], np.ones((1, 2048)))})
    with pytest.raises(ValueError, match=r"missing from the ground-truth-box features .*\(image ids 1\)"):
        ReferExpressionDataset(root, "train", tokenizer, det, open_features(no_gt, cache=False))


def test_float16_cache_hands_on_float16(root, tokenizer):
    reference = build(root, "train", tokenizer)[0]
    for name in (DET, GT):
        build_feature_cache(root / name, float16=True, progress=False)
    det, gt = open_features(root / DET), open_features(root / GT)
    sample = ReferExpressionDataset(root, "train", tokenizer, det, gt)[0]
    assert sample["features"].dtype == np.float16
    np.testing.assert_allclose(sample["features"], reference["features"], rtol=1e-3, atol=1e-3)
    for key in ("spatials", "boxes", "target", "image_mask", "input_ids"):
        np.testing.assert_array_equal(sample[key], reference[key])


def test_collate_stacks_numpy(root, tokenizer):
    data = build(root, "train", tokenizer)
    short = build(root, "val", tokenizer)[0]  # 4 regions against the train sample's 7
    batch = collate([data[0], short])
    assert batch["features"].shape == (2, 7, 2048) and batch["target"].shape == (2, 7, 1)
    assert batch["image_mask"].tolist() == [[1] * 7, [1] * 4 + [0] * 3]
    for key in ("features", "spatials", "boxes", "target"):  # padded rows are zero
        assert not batch[key][1, 4:].any(), key
    np.testing.assert_array_equal(batch["features"][1, :4], short["features"])
    tokens = max(int(data[0]["input_mask"].sum()), int(short["input_mask"].sum()))  # the longest expression
    assert tokens < 20 and batch["input_ids"].shape == (2, tokens)
    assert batch["input_mask"].sum() == data[0]["input_mask"].sum() + short["input_mask"].sum()  # only padding cut
    np.testing.assert_array_equal(batch["input_ids"][1], short["input_ids"][:tokens])
    assert batch["co_attention_mask"].shape == (2, 7, tokens) and not batch["co_attention_mask"].any()
    assert batch["sent_id"].tolist() == [10, short["sent_id"]] and batch["sent_id"].dtype == np.int64
    assert all(isinstance(value, np.ndarray) for value in batch.values())


def test_dataloader_with_workers(demo_root, tokenizer, tmp_path):
    data = build(Path(demo_root), "train", tokenizer, cache_dir=tmp_path)
    data[0]  # the parent has the LMDBs open when the workers fork
    loader = paddle.io.DataLoader(data, batch_size=16, shuffle=False, collate_fn=collate, num_workers=2)
    seen = 0
    for step, batch in enumerate(loader):
        expected = collate([data[i] for i in range(16 * step, min(16 * (step + 1), len(data)))])
        for key, value in expected.items():
            got = batch[key].numpy() if isinstance(batch[key], paddle.Tensor) else batch[key]
            np.testing.assert_array_equal(got, value, err_msg=key)
        seen += len(expected["sent_id"])
    assert seen == len(data)


@pytest.mark.parametrize("max_region_num", [100, 12])  # 12: rows are cut
@pytest.mark.parametrize("features", ["LMDB", "cache fp16", "det cache fp16, gt LMDB"])
@pytest.mark.parametrize("split", ["train", "val"])
def test_batch_is_collate_of_the_samples(demo_root, tokenizer, tmp_path, split, features, max_region_num):
    """`batch` (what the loader calls) against `collate` of `self[i]` (the plain path): the same keys in the
    same order, dtypes, shapes and values, padding included."""
    root = Path(demo_root)
    caches = {name: build_feature_cache(root / name, tmp_path / f"{name}.cache", float16=True, progress=False)
              for name in ((DET, GT) if features == "cache fp16" else (DET,) if features != "LMDB" else ())}
    det, gt = (open_features(root / name, cache=caches.get(name, False)) for name in (DET, GT))
    data = ReferExpressionDataset(root, split, tokenizer, det, gt if split == "train" else None,
                                  max_region_num=max_region_num, cache_dir=tmp_path)
    order = np.random.default_rng(0).permutation(len(data))
    for indices in [order[:1], order[:7], order[7:20], order]:
        got, expected = data.batch(indices), collate([data[i] for i in indices])
        assert list(got) == list(expected)
        for key, value in expected.items():
            assert got[key].dtype == value.dtype and got[key].shape == value.shape, key
            np.testing.assert_array_equal(got[key], value, err_msg=key)
    float32 = features == "LMDB" or split == "train" and features != "cache fp16"  # float16 only if all are
    assert (got["image_mask"] == 0).any() and got["features"].dtype == (np.float32 if float32 else np.float16)
    allocated = []
    data.batch(order[:7], lambda shape, dtype: allocated.append(shape) or np.empty(shape, dtype))
    assert len(allocated) == len(got)  # every array in memory `empty` gave
