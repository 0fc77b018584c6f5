"""Extractor outputs (bottom-up TSV, 12-in-1 .npy, plain .npz) converted into region-feature LMDBs: the same
regions as the demo's own LMDBs, appending and overwriting, atomicity, and one clear line per bad record."""

import hashlib
import os
import pickle
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest

from vilbert.demo_data import DETECTED_LMDB, REGION_FILES, REGIONS_DIR, make_demo_dataset
from vilbert.extractor_outputs import FORMATS, convert, image_id_from_name, input_files, write_npz, write_tsv
from vilbert.feature_lmdb import BadRecord, ImageRegions
from vilbert.features import FeaturesError, ImageFeaturesReader, read_stored

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
import convert_features  # noqa: E402


@pytest.fixture(scope="module")
def roots(tmp_path_factory):
    """Small demo roots of both layouts (same seed: same regions) with the detected regions in every format."""
    return {layout: make_demo_dataset(tmp_path_factory.mktemp(layout), layout=layout, seed=3, num_train_images=6,
                                      num_val_images=3, num_test_images=1, region_files=FORMATS)
            for layout in ("beta", "mt")}


NUM_IMAGES = 6 + 3 + 1 + 1  # train, val, testA, testB


def regions_path(root, fmt) -> str:
    return str(root / REGIONS_DIR / REGION_FILES[fmt])


def digest(lmdb_dir) -> str:
    return hashlib.sha256((Path(lmdb_dir) / "data.mdb").read_bytes()).hexdigest()


def assert_same_regions(converted, reference, image_ids=None):
    converted, reference = ImageFeaturesReader(converted), ImageFeaturesReader(reference)
    assert converted.image_ids == (image_ids or reference.image_ids)
    for image_id in converted.image_ids:
        ours, theirs = converted[image_id], reference[image_id]
        for field in ("features", "spatials", "boxes"):
            assert getattr(ours, field).tobytes() == getattr(theirs, field).tobytes(), (image_id, field)
        assert (ours.num_boxes, ours.image_w, ours.image_h) == (theirs.num_boxes, theirs.image_w, theirs.image_h)


@pytest.mark.parametrize("layout", ["beta", "mt"])
@pytest.mark.parametrize("fmt", FORMATS)
def test_each_format_gives_the_regions_of_the_demo_lmdb(roots, tmp_path, fmt, layout):
    out = tmp_path / "converted.lmdb"
    result = convert([regions_path(roots[layout], fmt)], out, layout=layout, progress=False)
    assert result.layout == layout and result.written == result.listed == NUM_IMAGES and not result.skipped
    assert_same_regions(out, roots[layout] / DETECTED_LMDB)


@pytest.mark.parametrize("layout", ["beta", "mt"])
def test_converted_records_are_the_official_records(roots, tmp_path, layout):
    """A 7-field TSV into beta records, and 12-in-1 .npy into mt records, give the demo's LMDB values byte for byte."""
    out = tmp_path / "converted.lmdb"
    convert([regions_path(roots[layout], "tsv" if layout == "beta" else "npy")], out, progress=False)
    reference = roots[layout] / DETECTED_LMDB
    for key in pickle.loads(read_stored(reference, b"keys")):
        assert read_stored(out, key) == read_stored(reference, key)


def test_six_field_tsv_stores_no_class_probabilities(roots, tmp_path):
    reader = ImageFeaturesReader(roots["beta"] / DETECTED_LMDB)
    images = [ImageRegions(i, reader[i].image_w, reader[i].image_h, reader[i].boxes[1:], reader[i].features[1:])
              for i in reader.image_ids]
    write_tsv(tmp_path / "six.tsv", images)
    assert all(len(line.split(b"\t")) == 6 for line in (tmp_path / "six.tsv").read_bytes().splitlines())
    convert([str(tmp_path / "six.tsv")], tmp_path / "out.lmdb", progress=False)
    assert_same_regions(tmp_path / "out.lmdb", roots["beta"] / DETECTED_LMDB)
    assert pickle.loads(read_stored(tmp_path / "out.lmdb", str(images[0].image_id).encode()))["cls_prob"] is None


def test_inputs_as_files_folders_and_globs(roots):
    npz = Path(regions_path(roots["beta"], "npz"))
    files = sorted(npz.iterdir())
    assert input_files([str(npz)]) == [(f, "npz") for f in files]
    assert input_files([str(npz / "*.npz")]) == [(f, "npz") for f in files]
    assert input_files([str(files[0]), regions_path(roots["beta"], "tsv")]) == [
        (files[0], "npz"), (Path(regions_path(roots["beta"], "tsv")), "tsv")]
    with pytest.raises(FileNotFoundError, match="no files match"):
        input_files([str(npz / "*.npy")])
    with pytest.raises(FileNotFoundError, match="not found"):
        input_files([str(npz / "missing.npz")])


def test_format_from_the_name_or_given(tmp_path):
    for name in ("a.tsv", "b.tsv.0", "c.csv"):
        (tmp_path / name).write_text("")
        assert input_files([str(tmp_path / name)]) == [(tmp_path / name, "tsv")]
    (tmp_path / "d.bin").write_text("")
    with pytest.raises(FeaturesError, match="cannot tell the format of .*d.bin.*--format"):
        input_files([str(tmp_path / "d.bin")])
    assert input_files([str(tmp_path / "d.bin")], "npz") == [(tmp_path / "d.bin", "npz")]


def test_image_ids_from_names():
    assert image_id_from_name("COCO_val2014_000000000042", "f") == 42
    assert image_id_from_name("600123", "f") == 600123 and image_id_from_name(np.int64(7), "f") == 7
    with pytest.raises(BadRecord, match="f: image id 'my photo' is not a number"):
        image_id_from_name("my photo", "f")


# ---- appending, overwriting, atomicity -------------------------------------------------------------------
def test_append_then_refuse_a_duplicate_then_overwrite(roots, tmp_path):
    files = sorted(Path(regions_path(roots["beta"], "npz")).iterdir())
    out = tmp_path / "out.lmdb"
    convert([str(f) for f in files[:6]], out, progress=False)
    result = convert([str(f) for f in files[6:]], out, progress=False)
    assert (result.written, result.listed) == (NUM_IMAGES - 6, NUM_IMAGES)
    assert_same_regions(out, roots["beta"] / DETECTED_LMDB)

    before = digest(out)
    with pytest.raises(BadRecord, match=f"image id {files[3].stem} is already in .*give --overwrite"):
        convert([str(files[3])], out, progress=False)
    assert digest(out) == before and sorted(os.listdir(tmp_path)) == ["out.lmdb"]

    with np.load(files[3]) as data:
        changed = dict(data)
    changed["features"] = changed["features"] + 1
    np.savez(tmp_path / files[3].name, **changed)
    result = convert([str(tmp_path / files[3].name)], out, overwrite=True, progress=False)
    assert (result.written, result.listed) == (1, NUM_IMAGES)
    reader = ImageFeaturesReader(out)
    assert reader.image_ids == ImageFeaturesReader(roots["beta"] / DETECTED_LMDB).image_ids  # same keys, same order
    np.testing.assert_array_equal(reader[int(files[3].stem)].features[1:], changed["features"])


def test_an_id_twice_in_the_inputs_is_refused(roots, tmp_path):
    file = regions_path(roots["beta"], "tsv")
    with pytest.raises(BadRecord, match="is given twice in the inputs"):
        convert([file, file], tmp_path / "out.lmdb", progress=False)
    assert not os.listdir(tmp_path)


def test_a_crash_midway_leaves_the_old_lmdb_as_it_was(roots, tmp_path, monkeypatch):
    out = tmp_path / "out.lmdb"
    convert([regions_path(roots["beta"], "tsv")], out, progress=False)
    old = ImageFeaturesReader(out)
    before = digest(out)
    calls = []

    def crash_on_the_fifth(regions, layout):
        calls.append(regions.image_id)
        if len(calls) == 5:
            raise KeyboardInterrupt
        return pickle.dumps({})

    monkeypatch.setattr("vilbert.extractor_outputs.encode_record", crash_on_the_fifth)
    with pytest.raises(KeyboardInterrupt):
        convert([regions_path(roots["beta"], "npz")], out, overwrite=True, progress=False)
    assert digest(out) == before and sorted(os.listdir(tmp_path)) == ["out.lmdb"]
    assert_same_regions(out, roots["beta"] / DETECTED_LMDB)
    assert old[old.image_ids[0]].num_boxes > 1  # a reader opened before still reads


def test_layouts_are_not_mixed(roots, tmp_path):
    out = tmp_path / "out.lmdb"
    convert([regions_path(roots["beta"], "npy")], out, progress=False)  # .npy: 12-in-1 records by default
    with pytest.raises(FeaturesError, match="holds 12-in-1 .* records; --layout beta would mix layouts"):
        convert([regions_path(roots["beta"], "tsv")], out, layout="beta", progress=False)
    result = convert([regions_path(roots["beta"], "tsv")], out, overwrite=True, progress=False)
    assert result.layout == "mt"  # the existing LMDB's


# ---- bad records and damaged inputs ----------------------------------------------------------------------
def demo_image(roots) -> ImageRegions:
    reader = ImageFeaturesReader(roots["beta"] / DETECTED_LMDB)
    image_id = reader.image_ids[0]
    region = reader[image_id]
    return ImageRegions(image_id, region.image_w, region.image_h, region.boxes[1:].copy(), region.features[1:].copy())


def with_nan(image):
    image.features[2, 5] = np.nan
    return image


def outside(image):
    image.boxes[1, 2] = image.image_w + 5
    return image


BAD_IMAGES = {  # how the regions are broken -> what the one line says
    "narrow features": (lambda im: im._replace(features=im.features[:, :1024]),
                        "field 'features' has shape (n, 1024), expected [N, 2048]"),
    "NaN": (with_nan, "field 'features' holds NaN or inf in 1 of n rows (first: row 2)"),
    "box outside": (outside, "field 'boxes' has 1 box(es) outside the WxH image or inverted (first: row 1"),
    "inverted box": (lambda im: im._replace(boxes=im.boxes[:, [2, 1, 0, 3]]), "outside the WxH image or inverted"),
    "no boxes": (lambda im: im._replace(boxes=im.boxes[:0], features=im.features[:0]),
                 "an image needs at least one box"),
    "fewer features": (lambda im: im._replace(features=im.features[:-1]), "field 'features' h"),
    "zero width": (lambda im: im._replace(image_w=0), "fields 'image_w'/'image_h' give an image of 0xH"),
}


@pytest.mark.parametrize("fmt", ["tsv", "npz"])
@pytest.mark.parametrize("case", BAD_IMAGES)
def test_each_bad_record_gets_one_line_naming_file_and_field(roots, tmp_path, fmt, case):
    image = demo_image(roots)
    good = demo_image(roots)._replace(image_id=image.image_id + 1)
    breaks, expected = BAD_IMAGES[case]
    bad = breaks(image)
    n = len(image.boxes)
    expected = expected.replace("n-1", str(n - 1)).replace("of n", f"of {n}").replace("(n,", f"({n},")
    expected = expected.replace("WxH", f"{image.image_w}x{image.image_h}").replace("0xH", f"0x{image.image_h}")
    if fmt == "tsv":
        write_tsv(tmp_path / "in.tsv", [good, bad])
        where = f"{tmp_path / 'in.tsv'} line 2 (image {image.image_id})"
    else:
        write_npz(tmp_path / "in", [good, bad])
        where = str(tmp_path / "in" / f"{image.image_id}.npz")
    lines = []
    with pytest.raises(BadRecord, match=r"1 bad record\(s\), listed above; nothing was written"):
        convert([str(tmp_path / ("in.tsv" if fmt == "tsv" else "in"))], tmp_path / "out.lmdb", report=lines.append,
                progress=False)
    assert not (tmp_path / "out.lmdb").exists()
    assert len(lines) == 1 and "\n" not in lines[0]
    assert lines[0].startswith(f"bad record: {where}: ") and expected in lines[0], lines[0]

    result = convert([str(tmp_path / ("in.tsv" if fmt == "tsv" else "in"))], tmp_path / "out.lmdb", skip_bad=True,
                     report=lines.append, progress=False)
    assert (result.written, len(result.skipped)) == (1, 1)
    assert ImageFeaturesReader(tmp_path / "out.lmdb").image_ids == [good.image_id]


def tsv_line(roots, tmp_path, edit) -> str:
    write_tsv(tmp_path / "in.tsv", [demo_image(roots)])
    fields = (tmp_path / "in.tsv").read_bytes().rstrip(b"\r\n").split(b"\t")
    (tmp_path / "in.tsv").write_bytes(b"\t".join(edit(fields)) + b"\r\n")
    return str(tmp_path / "in.tsv")


DAMAGED_TSV = {
    "five fields": (lambda f: f[:5], "5 tab-separated fields, expected 6 (image_id, image_w, image_h, num_boxes, "
                                     "boxes, features: generate_tsv.py) or 7 (+ cls_prob)"),
    "cut features": (lambda f: f[:5] + [f[5][:1000]], "field 'features' holds 750 bytes, not N rows (num_boxes) of "
                                                      "float32; a truncated line?"),
    "not base64": (lambda f: f[:5] + [b"QUJDA"], "field 'features' is not base64"),
    "width": (lambda f: f[:1] + [b"wide"] + f[2:], "field 'image_w' is b'wide', not an integer"),
    "id": (lambda f: [b"photo"] + f[1:], "image id 'photo' is not a number"),
    "no boxes": (lambda f: f[:3] + [b"0"] + f[4:], "field 'num_boxes' is 0; an image needs at least one box"),
    "cut cls_prob": (lambda f: f + [b"QUJD"], "field 'cls_prob' holds 3 bytes of base64, not N rows (num_boxes) "
                                              "of float32; a truncated line?"),
}


@pytest.mark.parametrize("case", DAMAGED_TSV)
def test_damaged_tsv_lines(roots, tmp_path, case):
    edit, expected = DAMAGED_TSV[case]
    path = tsv_line(roots, tmp_path, edit)
    expected = expected.replace("N rows", f"{len(demo_image(roots).boxes)} rows")
    lines = []
    with pytest.raises(BadRecord):
        convert([path], tmp_path / "out.lmdb", report=lines.append, progress=False)
    assert len(lines) == 1 and lines[0].startswith(f"bad record: {path} line 1") and expected in lines[0], lines[0]


class RunsCode:
    def __reduce__(self):
        return (os.system, ("touch ran_code",))


def damaged_npy(tmp_path, case) -> Path:
    path = tmp_path / "600001.npy"
    good = {"image_id": "600001", "image_width": 64, "image_height": 48, "num_boxes": 1,
            "bbox": np.array([[1, 2, 30, 40]], np.float32), "features": np.ones((1, 2048), np.float32),
            "objects": np.zeros(1, np.int64), "cls_prob": np.ones((1, 3), np.float32)}
    if case == "code":
        np.save(path, {**good, "bbox": RunsCode()})
    elif case == "no bbox":
        np.save(path, {k: v for k, v in good.items() if k != "bbox"})
    elif case == "plain array":
        np.save(path, np.zeros((2, 3), np.float32))
    elif case == "not npy":
        path.write_bytes(b"<html>not found</html>")
    elif case == "truncated":
        np.save(path, good)
        path.write_bytes(path.read_bytes()[:300])
    else:
        np.save(path, good)
    return path


DAMAGED_NPY = {
    "code": "refusing to unpickle global posix.system: not part of a feature record",
    "no bbox": "no field 'bbox' (it has: cls_prob, features, image_height, image_id, image_width, num_boxes, objects)",
    "plain array": "holds a float32 array of shape (2, 3), not the dict 12-in-1's script/extract_features.py saves",
    "not npy": "not a .npy file",
    "truncated": "is corrupt: cannot unpickle it",
}


@pytest.mark.parametrize("case", DAMAGED_NPY)
def test_damaged_npy_files_and_no_code_runs(tmp_path, case, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = damaged_npy(tmp_path, case)
    lines = []
    with pytest.raises(BadRecord):
        convert([str(path)], tmp_path / "out.lmdb", report=lines.append, progress=False)
    assert len(lines) == 1 and lines[0].startswith(f"bad record: {path}") and DAMAGED_NPY[case] in lines[0], lines[0]
    assert not (tmp_path / "ran_code").exists()


def test_a_good_npy_written_by_np_save_converts(tmp_path):
    path = damaged_npy(tmp_path, "good")
    convert([str(path)], tmp_path / "out.lmdb", progress=False)
    region = ImageFeaturesReader(tmp_path / "out.lmdb")[600001]
    np.testing.assert_array_equal(region.boxes, [[0, 0, 64, 48], [1, 2, 30, 40]])


@pytest.mark.parametrize("case, expected", [
    ("missing", "no field 'features' (it has: boxes, image_h, image_w)"),
    ("objects", "not a readable .npz of plain arrays"),
    ("garbage", "not a readable .npz of plain arrays"),
])
def test_damaged_npz_files(tmp_path, case, expected):
    path = tmp_path / "7.npz"
    arrays = {"boxes": np.array([[1, 2, 3, 4]], np.float32), "image_w": 10, "image_h": 10}
    if case == "missing":
        np.savez(path, **arrays)
    elif case == "objects":
        np.savez(path, features=np.array([None, {}], dtype=object), **arrays)
    else:
        path.write_bytes(b"PK\x03\x04 broken")
    lines = []
    with pytest.raises(BadRecord):
        convert([str(path)], tmp_path / "out.lmdb", report=lines.append, progress=False)
    assert len(lines) == 1 and lines[0].startswith(f"bad record: {path}: ") and expected in lines[0], lines[0]


# ---- the tool ---------------------------------------------------------------------------------------------
def test_tool_prints_speed_and_exits_with_one_line(roots, tmp_path, capsys):
    convert_features.main([regions_path(roots["mt"], "npy"), "--out", str(tmp_path / "out.lmdb")])
    printed = capsys.readouterr().out
    assert f"Wrote {NUM_IMAGES} images (" in printed and "12-in-1 (ints, float32 numpy arrays) records) in " in printed
    assert " images/s; " in printed and f"now holds {NUM_IMAGES} images" in printed
    with pytest.raises(SystemExit) as exit_info:
        convert_features.main([regions_path(roots["mt"], "npy"), "--out", str(tmp_path / "out.lmdb")])
    assert exit_info.value.code.startswith("error: image id ") and "give --overwrite" in exit_info.value.code
    shutil.rmtree(tmp_path / "out.lmdb")


def test_skipping_every_record_writes_nothing(tmp_path):
    path = damaged_npy(tmp_path, "not npy")
    lines = []
    with pytest.raises(BadRecord, match=f"no good record in {path}; nothing was written"):
        convert([str(path)], tmp_path / "out.lmdb", skip_bad=True, report=lines.append, progress=False)
    assert len(lines) == 1 and not (tmp_path / "out.lmdb").exists()
