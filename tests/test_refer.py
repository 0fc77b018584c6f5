import json
import pickle
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from pyutils.refer import REFER, AnnotationError

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def refer(demo_root):
    return REFER(demo_root, dataset="refcoco+", splitBy="unc")


@pytest.fixture(scope="module")
def instances(demo_root):
    return json.loads((demo_root / "refcoco+" / "instances.json").read_text())


def write_dataset(root, dataset, split_by, refs, instances, dump=pickle.dumps):
    folder = Path(root) / dataset
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"refs({split_by}).p").write_bytes(dump(refs))
    (folder / "instances.json").write_text(json.dumps(instances))
    return root


def tiny_instances(segmentations, height=20, width=30):
    """One image (id 1) with one annotation per segmentation (ids 10, 11, ...)."""
    return {"images": [{"id": 1, "height": height, "width": width, "file_name": "x.jpg"}],
            "annotations": [{"id": 10 + i, "image_id": 1, "category_id": 1, "bbox": [0.0, 0.0, 5.0, 5.0],
                             "segmentation": seg, "area": 25.0, "iscrowd": 0}
                            for i, seg in enumerate(segmentations)],
            "categories": [{"id": 1, "name": "person", "supercategory": "person"}]}


def tiny_ref(ref_id, ann_id, split, sent_id=0):
    return {"ref_id": ref_id, "ann_id": ann_id, "image_id": 1, "category_id": 1, "split": split,
            "sent_ids": [sent_id], "file_name": "x_1.jpg",
            "sentences": [{"tokens": ["a", "man"], "raw": "A man", "sent_id": sent_id, "sent": "a man"}]}


def test_splits_follow_the_refs_file(refer):
    refs = refer.data["refs"]
    assert refer.getRefIds() == [r["ref_id"] for r in refs]  # file order
    for split in ("train", "val", "testA", "testB"):
        assert refer.getRefIds(split=split) == [r["ref_id"] for r in refs if r["split"] == split]
    assert sorted(refer.getRefIds(split="test")) == sorted(refer.getRefIds(split="testA") +
                                                           refer.getRefIds(split="testB"))
    with pytest.raises(ValueError, match="No such split 'dev'"):
        refer.getRefIds(split="dev")


def test_testA_is_people_and_testB_other_objects(refer):
    assert {refer.Refs[i]["category_id"] for i in refer.getRefIds(split="testA")} == {1}
    assert 1 not in {refer.Refs[i]["category_id"] for i in refer.getRefIds(split="testB")}
    assert refer.getRefIds(split="testA", cat_ids=[1]) == refer.getRefIds(split="testA")
    assert refer.getRefIds(split="testB", cat_ids=1) == []


def test_split_images_are_disjoint(refer):
    images = {s: set(refer.getImgIds(refer.getRefIds(split=s))) for s in ("train", "val", "testA", "testB")}
    assert sum(map(len, images.values())) == len(set.union(*images.values())) == len(refer.Imgs)


def test_image_filter_is_flattened_and_accepts_numpy_ids(refer):
    first, second = refer.getImgIds()[:2]
    expected = [r["ref_id"] for r in refer.imgToRefs[first] + refer.imgToRefs[second]]
    assert refer.getRefIds(image_ids=[first, second]) == expected
    assert refer.getRefIds(image_ids=np.array([first, second])) == expected
    assert refer.getRefIds(image_ids=np.int64(first)) == expected[:len(refer.imgToRefs[first])]
    assert refer.getRefIds(image_ids=[first, 12345]) == expected[:len(refer.imgToRefs[first])]  # no refs: skipped
    ref_id = expected[0]
    assert refer.getRefIds(image_ids=first, ref_ids=[ref_id], split=refer.Refs[ref_id]["split"]) == [ref_id]


def test_ann_ids_and_the_ref_filter(refer, instances):
    assert refer.getAnnIds() == [ann["id"] for ann in instances["annotations"]]
    image_id = refer.getImgIds()[0]
    on_image = [ann["id"] for ann in instances["annotations"] if ann["image_id"] == image_id]
    assert refer.getAnnIds(image_ids=image_id) == on_image
    ref = refer.imgToRefs[image_id][0]
    assert refer.getAnnIds(ref_ids=ref["ref_id"]) == [ref["ann_id"]]  # the original ignored this filter
    assert refer.getAnnIds(image_ids=[image_id], ref_ids=[np.int64(ref["ref_id"])]) == [ref["ann_id"]]
    people = refer.getAnnIds(cat_ids=[1])
    assert people and all(refer.Anns[i]["category_id"] == 1 for i in people)


def test_img_and_cat_ids(refer, instances):
    assert refer.getImgIds() == [image["id"] for image in instances["images"]]
    ref_ids = refer.getRefIds(split="val")
    assert refer.getImgIds(ref_ids) == list(dict.fromkeys(refer.Refs[i]["image_id"] for i in ref_ids))
    assert refer.getCatIds() == [c["id"] for c in instances["categories"]]


def test_loaders_take_ints_numpy_ints_and_lists(refer, instances):
    ref_id = refer.getRefIds()[0]
    assert refer.loadRefs(ref_id) == refer.loadRefs(np.int64(ref_id)) == refer.loadRefs([ref_id]) == [refer.Refs[ref_id]]
    ann = instances["annotations"][3]
    assert refer.loadAnns(np.int64(ann["id"])) == refer.loadAnns((ann["id"],)) == [ann]
    image = instances["images"][1]
    assert refer.loadImgs(image["id"]) == refer.loadImgs(np.array([image["id"]])) == [image]
    assert refer.loadCats([1]) == refer.loadCats(np.int32(1)) == ["person"]
    assert refer.loadRefs() == []


def test_index(refer):
    for ref_id, ref in refer.Refs.items():
        ann = refer.refToAnn[ref_id]
        assert ann["id"] == ref["ann_id"] and refer.annToRef[ann["id"]] is ref
        assert ref in refer.imgToRefs[ref["image_id"]] and ref in refer.catToRefs[ref["category_id"]]
        assert ann in refer.imgToAnns[ref["image_id"]]
        for sent in ref["sentences"]:
            assert refer.sentToRef[sent["sent_id"]] is ref and refer.Sents[sent["sent_id"]] is sent
            assert refer.sentToTokens[sent["sent_id"]] == sent["tokens"]
    assert len(refer.Sents) == sum(len(r["sentences"]) for r in refer.data["refs"])
    assert refer.Cats[1] == "person"


def test_ref_box_is_the_annotation_box(refer, instances):
    boxes = {ann["id"]: ann["bbox"] for ann in instances["annotations"]}
    for ref_id, ref in refer.Refs.items():
        assert refer.getRefBox(ref_id) == boxes[ref["ann_id"]]


def test_mask_of_a_polygon(refer):
    for ref in refer.loadRefs(refer.getRefIds()[:5]):
        image = refer.Imgs[ref["image_id"]]
        ann = refer.refToAnn[ref["ref_id"]]
        result = refer.getMask(ref)
        mask = result["mask"]
        assert mask.shape == (image["height"], image["width"]) and mask.dtype == np.uint8 and mask.max() == 1
        assert result["area"] == int(mask.sum()) == pytest.approx(ann["area"], rel=0.03)
        rows, cols = np.nonzero(mask)
        x, y, w, h = ann["bbox"]
        assert abs(cols.min() - x) <= 1 and abs(cols.max() + 1 - (x + w)) <= 1
        assert abs(rows.min() - y) <= 1 and abs(rows.max() + 1 - (y + h)) <= 1


def test_mask_sums_overlapping_polygons_and_reads_rle(tmp_path):
    from pycocotools import mask as mask_api

    square = [2.0, 2.0, 12.0, 2.0, 12.0, 12.0, 2.0, 12.0]
    binary = np.zeros((20, 30), np.uint8, order="F")
    binary[5:9, 3:10] = 1
    compressed = mask_api.encode(binary)
    compressed["counts"] = compressed["counts"].decode()  # as stored in JSON
    uncompressed = {"size": [20, 30], "counts": [3 * 20 + 5, 4, 16, 4, 16, 4, 16, 4, 16, 4, 16, 4, 16, 4, 11 + 20 * 20]}  # column-major runs
    instances = tiny_instances([[square, square], compressed, uncompressed])
    refs = [tiny_ref(0, 10, "train", 0), tiny_ref(1, 11, "train", 1), tiny_ref(2, 12, "train", 2)]
    refer = REFER(write_dataset(tmp_path, "refclef", "berkeley", refs, instances), "refclef", "berkeley")
    overlapping = refer.getMask(refer.Refs[0])
    assert overlapping["mask"].max() == 2  # official semantics: a per-pixel count, not a binary mask
    assert overlapping["area"] == 2 * int((overlapping["mask"] > 0).sum())
    for ref_id in (1, 2):
        result = refer.getMask(refer.Refs[ref_id])
        np.testing.assert_array_equal(result["mask"], binary)
        assert result["area"] == 28


def test_refcocog_umd_test_split_and_other_datasets(tmp_path):
    refs = [tiny_ref(0, 10, "train", 0), tiny_ref(1, 11, "test", 1), tiny_ref(2, 12, "val", 2)]
    instances = tiny_instances([[[0.0, 0.0, 4.0, 0.0, 4.0, 4.0]]] * 3)
    for dataset, split_by in (("refcocog", "umd"), ("refcocog", "google"), ("refcoco", "unc"), ("refcoco", "google")):
        refer = REFER(write_dataset(tmp_path, dataset, split_by, refs, instances), dataset, split_by)
        assert refer.getRefIds(split="test") == [1] and refer.getRefIds(split="testA") == []
        assert refer.IMAGE_DIR.endswith("train2014")


def test_split_letters_match_combined_splits(tmp_path):
    refs = [tiny_ref(i, 10 + i, split, i) for i, split in enumerate(["testA", "testB", "testAB", "val"])]
    refer = REFER(write_dataset(tmp_path, "refcoco", "unc", refs, tiny_instances([[[0.0, 0.0, 4.0, 0.0, 4.0, 4.0]]] * 4)),
                  "refcoco", "unc")
    assert refer.getRefIds(split="testA") == [0, 2] and refer.getRefIds(split="testB") == [1, 2]
    assert refer.getRefIds(split="testAB") == [2] and refer.getRefIds(split="test") == [0, 1, 2]


def py2_pickle(obj):
    """A pickle as Python 2 writes it: str as byte strings (SHORT_BINSTRING), which Python 3 decodes as ASCII."""
    class Py2Pickler(pickle._Pickler):
        dispatch = pickle._Pickler.dispatch.copy()

        def save_str(self, text):
            data = text.encode("ascii")
            self.write(pickle.SHORT_BINSTRING + bytes([len(data)]) + data if len(data) < 256
                       else pickle.BINSTRING + struct.pack("<i", len(data)) + data)
            self.memoize(text)
        dispatch[str] = save_str

    import io
    buffer = io.BytesIO()
    Py2Pickler(buffer, protocol=2).dump(obj)
    return buffer.getvalue()


def test_reads_python2_pickles(tmp_path):
    refs = [tiny_ref(0, 10, "val")]
    assert b"\x80\x02" in py2_pickle(refs)[:2] and pickle.SHORT_BINSTRING + b"\x03val" in py2_pickle(refs)
    refer = REFER(write_dataset(tmp_path, "refcoco+", "unc", refs, tiny_instances([[[0.0, 0.0, 4.0, 0.0, 4.0, 4.0]]]),
                                dump=py2_pickle))
    assert refer.getRefIds(split="val") == [0] and refer.Sents[0]["raw"] == "A man"


def test_errors(tmp_path, demo_root):
    with pytest.raises(ValueError, match=r"No refer dataset is called 'refcoco\+\+'"):
        REFER(demo_root, dataset="refcoco++")
    with pytest.raises(ValueError, match="refcoco\\+ has no splitBy='google'; it has unc"):
        REFER(demo_root, dataset="refcoco+", splitBy="google")
    with pytest.raises(FileNotFoundError, match=r"refcoco\+/refs\(unc\)\.p not found.*bash download_dataset\.sh"):
        REFER(tmp_path, dataset="refcoco+")
    write_dataset(tmp_path, "refcoco+", "unc", [tiny_ref(0, 99, "val")], tiny_instances([]))
    with pytest.raises(AnnotationError, match="annotation 99"):
        REFER(tmp_path, dataset="refcoco+")
    (tmp_path / "refcoco+" / "instances.json").unlink()
    with pytest.raises(FileNotFoundError, match="instances.json not found"):
        REFER(tmp_path, dataset="refcoco+")


def test_drawing(refer, capsys):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ref = refer.loadRefs(refer.getRefIds(split="val")[0])[0]
    fig, axes = plt.subplots(1, 3)
    refer.showRef(ref, seg_box="seg", ax=axes[0])
    refer.showRef(ref, seg_box="box", ax=axes[1])
    refer.showMask(ref, ax=axes[2])
    assert len(axes[0].collections) == 2 and len(axes[1].patches) == 1 and axes[2].images
    assert "no image at" in axes[0].get_title()  # generated data has no pictures: a blank canvas instead
    assert capsys.readouterr().out.startswith(f"1. {ref['sentences'][0]['sent']}")
    with pytest.raises(ValueError, match="seg_box"):
        refer.showRef(ref, seg_box="mask")
    plt.close(fig)


def test_import_is_light():
    code = "import sys, pyutils.refer; print(sorted({'matplotlib', 'pycocotools'} & set(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def copy_annotations(demo_root, tmp_path):
    """A data root with a copy of the demo's RefCOCO+ annotations, to damage."""
    folder = tmp_path / "refcoco+"
    folder.mkdir()
    for name in ("refs(unc).p", "instances.json"):
        (folder / name).write_bytes((demo_root / "refcoco+" / name).read_bytes())
    return folder


@pytest.mark.parametrize("damage, problem", [
    (lambda data: data[:len(data) // 2], "is truncated"),
    (lambda data: b"", "is truncated"),
    (lambda data: b"<!DOCTYPE html><html>Sign in</html>", "is an HTML page, not a pickle"),
    (lambda data: b"PK\x03\x04 a zip file", "is not a pickle"),
])
def test_damaged_refs_file_is_one_clear_error(demo_root, tmp_path, damage, problem):
    refs = copy_annotations(demo_root, tmp_path) / "refs(unc).p"
    refs.write_bytes(damage(refs.read_bytes()))
    with pytest.raises(AnnotationError) as error:
        REFER(tmp_path, dataset="refcoco+")
    message = str(error.value)
    assert message.startswith(f"{refs} {problem}") and "\n" not in message
    assert f"download_dataset.sh --dataset refcoco+ --dataroot {tmp_path}`" in message and "--check" in message


@pytest.mark.parametrize("damage, problem", [
    (lambda text: text[:len(text) // 2], "is truncated"),
    (lambda text: "<!DOCTYPE html><html>Dropbox</html>", "is an HTML page, not JSON"),
    (lambda text: "images: []", "is not JSON (Expecting value"),
    (lambda text: json.dumps({"images": [], "annotations": []}), "has no categories list"),
])
def test_damaged_instances_file_is_one_clear_error(demo_root, tmp_path, damage, problem):
    instances = copy_annotations(demo_root, tmp_path) / "instances.json"
    instances.write_text(damage(instances.read_text()))
    with pytest.raises(AnnotationError) as error:
        REFER(tmp_path, dataset="refcoco+")
    assert str(error.value).startswith(f"{instances} {problem}") and "download_dataset.sh" in str(error.value)


def test_records_missing_fields_are_named(tmp_path):
    ref = tiny_ref(0, 10, "val")
    del ref["split"], ref["sentences"][0]["raw"]
    write_dataset(tmp_path, "refcoco+", "unc", [ref], tiny_instances([[[0.0, 0.0, 4.0, 0.0, 4.0, 4.0]]]))
    with pytest.raises(AnnotationError, match=r"refs are missing fields 'split' \(1 of 1\)"):
        REFER(tmp_path, dataset="refcoco+")
    ref["split"] = "val"
    write_dataset(tmp_path, "refcoco+", "unc", [ref], tiny_instances([[[0.0, 0.0, 4.0, 0.0, 4.0, 4.0]]]))
    with pytest.raises(AnnotationError, match=r"sentences are missing fields 'raw' \(1 of 1\)"):
        REFER(tmp_path, dataset="refcoco+")
    instances = tiny_instances([[[0.0, 0.0, 4.0, 0.0, 4.0, 4.0]]])
    del instances["annotations"][0]["bbox"]
    write_dataset(tmp_path, "refcoco+", "unc", [tiny_ref(0, 10, "val")], instances)
    with pytest.raises(AnnotationError, match=r"instances.json: annotations are missing fields 'bbox'"):
        REFER(tmp_path, dataset="refcoco+")


class Payload:
    """Pickles as a call of os.system that would create `marker`: what a malicious refs file could hold."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        import os
        return os.system, (f"touch {self.marker}",)


def test_refs_file_with_code_is_refused_and_the_code_never_runs(tmp_path):
    marker = tmp_path / "payload_ran"
    refs = [tiny_ref(0, 10, "val")]
    refs[0]["sentences"][0]["raw"] = Payload(marker)  # hidden deep inside otherwise plain data
    write_dataset(tmp_path, "refcoco+", "unc", refs, tiny_instances([[[0.0, 0.0, 4.0, 0.0, 4.0, 4.0]]]),
                  dump=lambda obj: pickle.dumps(obj, protocol=2))
    assert pickle.loads(pickle.dumps(Payload(tmp_path / "control"))) == 0 and (tmp_path / "control").exists()
    with pytest.raises(AnnotationError) as error:
        REFER(tmp_path, dataset="refcoco+")
    refs_file = tmp_path / "refcoco+" / "refs(unc).p"
    assert str(error.value).startswith(f"{refs_file}: refusing to unpickle global posix.system")
    assert not marker.exists()
