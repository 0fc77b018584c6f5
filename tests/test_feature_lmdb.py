"""Region-feature LMDBs: the writer (both layouts, replacing, refusing what is not an LMDB), the audit finding
each planted defect (also through download_dataset.sh --check), and the checkpoint-family warnings."""

import os
import pickle
import subprocess
import sys
from pathlib import Path

import lmdb
import numpy as np
import pytest

from vilbert.feature_lmdb import (EXTRACTORS, ImageRegions, audit_feature_lmdb, encode_record, extractor_warnings,
                                  lmdb_layout, write_feature_lmdb)
from vilbert.features import FeaturesError, ImageFeaturesReader

PROJECT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(PROJECT / "tools"))
import audit_features  # noqa: E402

BOX_COUNTS = {11: 3, 12: 1, 13: 5}


def image(image_id, boxes, seed=0) -> ImageRegions:
    rng = np.random.default_rng(seed + image_id)
    corners = rng.uniform(0, 50, (boxes, 2))
    return ImageRegions(image_id, 100, 80, np.hstack([corners, corners + rng.uniform(1, 30, (boxes, 2))])
                        .astype(np.float32), rng.uniform(0, 3, (boxes, 2048)).astype(np.float32))


def make_lmdb(path, layout="beta") -> Path:
    write_feature_lmdb(path, ((i, encode_record(image(i, n), layout)) for i, n in BOX_COUNTS.items()))
    return Path(path)


def raw_edit(path, *, put=None, delete=()):
    env = lmdb.open(str(path), map_size=1 << 30)
    with env.begin(write=True) as txn:
        for key in delete:
            txn.delete(key)
        for key, value in (put or {}).items():
            txn.put(key, value)
    env.close()


@pytest.mark.parametrize("layout", ["beta", "mt"])
def test_writer_and_clean_audit(tmp_path, layout):
    path = make_lmdb(tmp_path / "f.lmdb", layout)
    assert sorted(os.listdir(tmp_path)) == ["f.lmdb"] and lmdb_layout(path) == layout
    assert os.path.getsize(path / "data.mdb") < 1 << 20  # cut to the pages in use, not the 1 TiB map
    reader = ImageFeaturesReader(path)
    assert reader.image_ids == list(BOX_COUNTS)
    np.testing.assert_array_equal(reader[13].features[1:], image(13, 5).features)
    audit = audit_feature_lmdb(path)
    assert audit.problems == [] and audit.layouts == {layout: 3} and (audit.listed, audit.records) == (3, 3)
    assert audit.boxes == (1, 3.0, 5) and audit.feature_width == 2048
    table = audit.table()
    assert f"region-feature LMDB {path}" in table and "min 1, mean 3.0, max 5" in table
    assert "3 listed in b'keys', 3 records" in table and "problems         none" in table
    assert audit_features.main([str(path), "--no_progress"]) == 0


def test_writer_replaces_and_refuses_a_folder_that_is_not_an_lmdb(tmp_path):
    path = make_lmdb(tmp_path / "f.lmdb")
    write_feature_lmdb(path, [(5, encode_record(image(5, 2), "beta"))])
    assert ImageFeaturesReader(path).image_ids == [5]
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    with pytest.raises(FeaturesError, match="exists and is not an LMDB folder"):
        write_feature_lmdb(tmp_path / "other", [(5, encode_record(image(5, 2), "beta"))])
    assert os.listdir(tmp_path / "other") == ["notes.txt"]


def nan_record(path):
    bad = image(12, 1)
    bad.features[0, 7] = np.inf
    raw_edit(path, put={b"12": encode_record(bad, "beta")})


def outside_record(path):
    bad = image(13, 5)
    bad.boxes[4] = [10, 10, 101, 20]  # x2 beyond the 100-pixel width
    raw_edit(path, put={b"13": encode_record(bad, "mt")})


PLANTED = {  # defect -> the problem line the audit must print
    "no keys": (lambda p: raw_edit(p, delete=[b"keys"]), "no b'keys' record, so no reader can open it"),
    "key without record": (lambda p: raw_edit(p, delete=[b"12"]), "1 image id(s) listed in b'keys' have no record: 12"),
    "record without key": (lambda p: raw_edit(p, put={b"99": encode_record(image(99, 2), "beta")}),
                           "1 record(s) not listed in b'keys' (no reader sees them): 99"),
    "key twice": (lambda p: raw_edit(p, put={b"keys": pickle.dumps([b"11", b"12", b"13", b"12"])}),
                  "1 image id(s) listed more than once in b'keys': 12"),
    "non-finite": (nan_record, "1 record(s) hold NaN or inf values: 12"),
    "box outside": (outside_record, "1 record(s) have boxes outside their image or inverted: 13"),
    "mixed layouts": (outside_record, "records of both layouts in one LMDB"),
    "corrupt": (lambda p: raw_edit(p, put={b"11": b"\x80\x04garbage"}),
                "1 record(s) do not decode, e.g. record 11 is corrupt: cannot unpickle it"),
    "short features": (lambda p: raw_edit(p, put={b"11": pickle.dumps({**pickle.loads(
        encode_record(image(11, 3), "beta")), "num_boxes": "4"})}),
        "record 11 is corrupt or truncated: field 'features' holds 24576 bytes, expected 4 x 2048 float32"),
}


@pytest.mark.parametrize("defect", PLANTED)
def test_audit_finds_each_planted_defect(tmp_path, defect, capsys):
    path = make_lmdb(tmp_path / "f.lmdb")
    plant, expected = PLANTED[defect]
    plant(path)
    audit = audit_feature_lmdb(path)
    assert any(expected in problem for problem in audit.problems), audit.problems
    assert audit_features.main([str(path), "--no_progress"]) == 1
    printed = capsys.readouterr().out
    assert f"  PROBLEM: " in printed and expected in printed


def test_audit_of_what_is_not_an_lmdb(tmp_path, capsys):
    (tmp_path / "empty.lmdb").mkdir()
    assert audit_features.main([str(tmp_path / "empty.lmdb"), str(tmp_path / "missing.lmdb")]) == 1
    printed = capsys.readouterr().out
    assert "is not an LMDB folder (no data.mdb in it)" in printed and "missing.lmdb not found" in printed


def test_download_check_runs_the_audit_on_every_lmdb(demo_root, tmp_path):
    def check(root):
        return subprocess.run(["bash", str(PROJECT / "download_dataset.sh"), "--check", "--dataroot", str(root)],
                              capture_output=True, text=True, timeout=300,
                              env={**os.environ, "PYTHON": sys.executable})

    result = check(demo_root)
    assert result.returncode == 0, result.stdout + result.stderr
    for name in ("refcoco+_resnet101_faster_rcnn_genome.lmdb", "refcoco+_gt_resnet101_faster_rcnn_genome.lmdb"):
        assert f"region-feature LMDB {demo_root / name}\n" in result.stdout
    assert result.stdout.count("problems         none") == 2
    make_lmdb(tmp_path / "refcoco+_resnet101_faster_rcnn_genome.lmdb")
    nan_record(tmp_path / "refcoco+_resnet101_faster_rcnn_genome.lmdb")
    result = check(tmp_path)
    assert result.returncode == 1 and "PROBLEM: 1 record(s) hold NaN or inf values: 12" in result.stdout


def test_warnings_for_features_unlike_the_checkpoint_family():
    assert extractor_warnings("butd_resnet101", "beta", {1: 10, 2: 100}) == []
    layout, boxes = extractor_warnings("butd_resnet101", "mt", {1: 9, 2: 36, 3: 101})
    assert "the features are in the 12-in-1 (ints, float32 numpy arrays) layout; vilbert_beta checkpoints" in layout
    assert "features of another extractor cost accuracy" in layout
    assert boxes.startswith("2 image(s) have a number of boxes outside 10-100") and "1 (9), 3 (101)" in boxes
    assert extractor_warnings("resnext152", "mt", {1: 1, 2: 100}) == []
    (warning,) = extractor_warnings("resnext152", "beta", {1: 100})
    assert "12-in-1 checkpoints were trained on features of vqa-maskrcnn-benchmark" in warning
    assert extractor_warnings("generated", "mt", {1: 1000}) == []
    assert set(EXTRACTORS) == {"butd_resnet101", "resnext152", "generated"}
