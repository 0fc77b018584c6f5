"""The REFER API (lichengunc/refer) for Python 3: RefCOCO, RefCOCO+, RefCOCOg and RefCLEF annotations.

Same class, method and attribute names as the original, so code written against it keeps working. The
filters keep the original semantics (`split='test'` is testA + testB for unc, `'testA'` matches any split holding
"A"), with the original's Python 3 bugs fixed:

- `getRefIds(image_ids=...)` flattens the per-image lists (the original fails with a TypeError) and skips
  images without refs (KeyError in the original);
- `getAnnIds(ref_ids=...)` applies the ref filter (the original computed it and returned the unfiltered ids);
- ids may be any integer type (numpy ints included), a list, tuple, set, range or numpy array;
- `getImgIds` / `getCatIds` return lists, not dict views;
- bad arguments and missing files raise a clear exception instead of `sys.exit()`;
- the refs pickle is read without running code (`load_refs`), and a damaged refs or instances file is one
  `AnnotationError` naming the file, what is wrong and the fix.

Masks go through `pycocotools.mask` (the original's compiled `external/_mask` is the same code), imported only
by the mask functions; matplotlib is imported only by the drawing functions, and images are read only there.
"""

import itertools
import json
import numbers
import os.path as osp

import numpy as np

from ..restricted_pickle import RestrictedUnpickler

# Valid (dataset, splitBy) pairs of the original README; only RefCLEF images live elsewhere.
SPLITS_BY = {
    "refcoco": ("unc", "google"),
    "refcoco+": ("unc",),
    "refcocog": ("umd", "google"),
    "refclef": ("unc", "berkeley"),
}
SPLITS = ("train", "val", "test", "testA", "testB", "testC", "testAB", "testBC", "testAC")
# What the REC code reads of each record (the rest, e.g. segmentation or file_name, only the drawing functions).
REF_FIELDS = ("ref_id", "ann_id", "image_id", "category_id", "split", "sent_ids", "sentences")
SENTENCE_FIELDS = ("sent_id", "raw", "sent", "tokens")
INSTANCES_FIELDS = {"images": ("id", "height", "width"), "annotations": ("id", "image_id", "bbox", "category_id"),
                    "categories": ("id", "name")}


class AnnotationError(ValueError):
    """A refs(*).p or instances.json that cannot be read: the message names the file, what is wrong and the fix."""


def _fix(path, dataset):
    """The fix of a damaged annotation file: its download and its data root's audit."""
    where = f"--dataset {dataset} --dataroot {osp.dirname(osp.dirname(osp.abspath(path)))}"
    return (f"re-download it (`bash download_dataset.sh {where}`), or audit the data root "
            f"(`bash download_dataset.sh --check {where}`)")


def _looks_like_html(data: bytes) -> bool:
    return data.lstrip()[:1] == b"<"


def load_refs(path, dataset="refcoco+"):
    """The list of refs in a `refs(<splitBy>).p`, read without running code: a REFER file is a (Python 2)
    pickle of plain lists, dicts, strings and numbers, which needs no global, so any global is refused."""
    fix = _fix(path, dataset)
    try:
        with open(path, "rb") as f:
            refs = RestrictedUnpickler(f, path, {}, "a REFER refs file holds only lists, dicts, strings and "
                                       f"numbers, so this file is not one or is unsafe; {fix}",
                                       error=AnnotationError).load()
    except AnnotationError:
        raise
    except Exception as error:  # a damaged pickle fails in many ways inside pickle
        with open(path, "rb") as f:
            start = f.read(64)
        raise _damaged(path, "a pickle", start, isinstance(error, EOFError) or "truncated" in str(error),
                       f"{type(error).__name__}: {' '.join(str(error).split())}", fix) from None
    if not isinstance(refs, list) or not refs or not all(isinstance(ref, dict) for ref in refs):
        raise AnnotationError(f"{path} does not hold a list of refs (it holds a {type(refs).__name__}); {fix}")
    _require_fields(path, "refs", refs, REF_FIELDS, fix)
    _require_fields(path, "sentences", [s for ref in refs for s in ref["sentences"]], SENTENCE_FIELDS, fix)
    return refs


def _damaged(path, kind: str, start: bytes, truncated: bool, detail: str, fix: str) -> AnnotationError:
    """One line for a file that does not parse as `kind`: cut short, an HTML page saved in its place, or else."""
    if truncated:
        problem = "is truncated (the download or copy stopped early)"
    elif _looks_like_html(start):
        problem = f"is an HTML page, not {kind} (a login or error page was saved instead of the file)"
    else:
        problem = f"is not {kind} ({detail})"
    return AnnotationError(f"{path} {problem}; {fix}")


def load_instances(path, dataset="refcoco+"):
    """The COCO `instances.json` beside the refs, with one clear error for a damaged or incomplete file."""
    fix = _fix(path, dataset)
    try:
        with open(path, "rb") as f:
            text = f.read()
        instances = json.loads(text)
    except json.JSONDecodeError as error:
        # cut short: the parser ran into the end, also from inside a string it had started
        truncated = error.pos >= len(text.rstrip()) or error.msg.startswith("Unterminated string")
        raise _damaged(path, "JSON", text, truncated, str(error), fix) from None
    except UnicodeDecodeError as error:
        raise AnnotationError(f"{path} is not JSON (not UTF-8 text: {error}); {fix}") from None
    if not isinstance(instances, dict):
        raise AnnotationError(f"{path} does not hold a COCO instances object (it holds a "
                              f"{type(instances).__name__}); {fix}")
    missing = [key for key in INSTANCES_FIELDS if not isinstance(instances.get(key), list)]
    if missing:
        raise AnnotationError(f"{path} has no {', '.join(missing)} list: it is not a COCO instances file; {fix}")
    for key, fields in INSTANCES_FIELDS.items():
        _require_fields(path, key, instances[key], fields, fix)
    return instances


def _require_fields(path, what, records, fields, fix):
    """One error naming the fields some record lacks (and how many records lack them)."""
    lacking = {}
    for record in records:
        for name in fields:
            if not isinstance(record, dict) or name not in record:
                lacking[name] = lacking.get(name, 0) + 1
    if lacking:
        shown = ", ".join(f"{name!r} ({count:,} of {len(records):,})" for name, count in lacking.items())
        raise AnnotationError(f"{path}: {what} are missing fields {shown}; {fix}")


def _ids(value):
    """One id or a collection of ids -> list (the original accepted only `int` and `list`)."""
    if value is None:
        return []
    if isinstance(value, (str, bytes, numbers.Integral)):
        return [value]
    if isinstance(value, np.ndarray):
        return value.ravel().tolist()
    return list(value)


class REFER:
    """Referring-expression annotations of one dataset and split scheme, indexed for lookup.

    Reads `<data_root>/<dataset>/refs(<splitBy>).p` (a pickled list of refs written by Python 2) and
    `<data_root>/<dataset>/instances.json` (COCO-style images, annotations and categories).
    """

    def __init__(self, data_root, dataset="refcoco+", splitBy="unc"):
        if dataset not in SPLITS_BY:
            raise ValueError(f"No refer dataset is called {dataset!r}; choose one of {sorted(SPLITS_BY)}")
        if splitBy not in SPLITS_BY[dataset]:
            raise ValueError(f"{dataset} has no splitBy={splitBy!r}; it has {', '.join(SPLITS_BY[dataset])}")
        data_root = str(data_root)
        self.DATA_DIR = osp.join(data_root, dataset)
        if dataset == "refclef":
            self.IMAGE_DIR = osp.join(data_root, "images", "saiapr_tc-12")
        else:
            self.IMAGE_DIR = osp.join(data_root, "images", "mscoco", "images", "train2014")

        ref_file = osp.join(self.DATA_DIR, f"refs({splitBy}).p")
        instances_file = osp.join(self.DATA_DIR, "instances.json")
        for path in (ref_file, instances_file):
            if not osp.isfile(path):
                raise FileNotFoundError(f"{path} not found: the {dataset} annotations are missing from {data_root}; "
                                        "run `bash download_dataset.sh` (RefCOCO+) or point data_root at the folder "
                                        f"that holds {dataset}/")
        refs = load_refs(ref_file, dataset)
        instances = load_instances(instances_file, dataset)
        self.data = {
            "dataset": dataset,
            "refs": refs,
            "images": instances["images"],
            "annotations": instances["annotations"],
            "categories": instances["categories"],
        }
        self.createIndex()

    def createIndex(self):
        """Build the lookup dicts, named as in the original."""
        self.Anns, self.Imgs, self.Cats, self.imgToAnns = {}, {}, {}, {}
        for ann in self.data["annotations"]:
            self.Anns[ann["id"]] = ann
            self.imgToAnns.setdefault(ann["image_id"], []).append(ann)
        for img in self.data["images"]:
            self.Imgs[img["id"]] = img
        for cat in self.data["categories"]:
            self.Cats[cat["id"]] = cat["name"]

        self.Refs, self.imgToRefs, self.refToAnn, self.annToRef, self.catToRefs = {}, {}, {}, {}, {}
        self.Sents, self.sentToRef, self.sentToTokens = {}, {}, {}
        for ref in self.data["refs"]:
            ref_id, ann_id = ref["ref_id"], ref["ann_id"]
            if ann_id not in self.Anns:
                raise AnnotationError(f"ref {ref_id} refers to annotation {ann_id}, which is not in "
                                      f"{osp.join(self.DATA_DIR, 'instances.json')}: the refs and instances files "
                                      "do not belong together")
            self.Refs[ref_id] = ref
            self.imgToRefs.setdefault(ref["image_id"], []).append(ref)
            self.catToRefs.setdefault(ref["category_id"], []).append(ref)
            self.refToAnn[ref_id] = self.Anns[ann_id]
            self.annToRef[ann_id] = ref
            for sent in ref["sentences"]:
                self.Sents[sent["sent_id"]] = sent
                self.sentToRef[sent["sent_id"]] = ref
                self.sentToTokens[sent["sent_id"]] = sent["tokens"]

    def getRefIds(self, image_ids=(), cat_ids=(), ref_ids=(), split=""):
        """Ref ids passing every given filter, in file order (in `image_ids` order when images are given).

        split: 'train', 'val', 'test' (every split holding "test": testA + testB for unc, test for umd),
        'testA' / 'testB' / 'testC' (every split holding that letter, so testAB too), or 'testAB' / 'testBC' /
        'testAC' (exactly).
        """
        image_ids, cat_ids, ref_ids = _ids(image_ids), set(_ids(cat_ids)), set(_ids(ref_ids))
        if image_ids:
            refs = [ref for image_id in image_ids for ref in self.imgToRefs.get(image_id, [])]
        else:
            refs = self.data["refs"]
        if cat_ids:
            refs = [ref for ref in refs if ref["category_id"] in cat_ids]
        if ref_ids:
            refs = [ref for ref in refs if ref["ref_id"] in ref_ids]
        if split:
            if split in ("testA", "testB", "testC"):
                refs = [ref for ref in refs if split[-1] in ref["split"]]
            elif split == "test":
                refs = [ref for ref in refs if "test" in ref["split"]]
            elif split in SPLITS:
                refs = [ref for ref in refs if ref["split"] == split]
            else:
                raise ValueError(f"No such split {split!r}; choose one of {', '.join(SPLITS)}")
        return [ref["ref_id"] for ref in refs]

    def getAnnIds(self, image_ids=(), cat_ids=(), ref_ids=()):
        """Annotation ids of the given images (all if none), of the given categories, referred by the given refs."""
        image_ids, cat_ids, ref_ids = _ids(image_ids), set(_ids(cat_ids)), _ids(ref_ids)
        if image_ids:
            anns = list(itertools.chain.from_iterable(self.imgToAnns.get(i, []) for i in image_ids))
        else:
            anns = self.data["annotations"]
        if cat_ids:
            anns = [ann for ann in anns if ann["category_id"] in cat_ids]
        if ref_ids:
            referred = {self.Refs[ref_id]["ann_id"] for ref_id in ref_ids}
            anns = [ann for ann in anns if ann["id"] in referred]
        return [ann["id"] for ann in anns]

    def getImgIds(self, ref_ids=()):
        """Ids of the images of the given refs (each once, first-seen order), or of every image."""
        ref_ids = _ids(ref_ids)
        if ref_ids:
            return list(dict.fromkeys(self.Refs[ref_id]["image_id"] for ref_id in ref_ids))
        return list(self.Imgs)

    def getCatIds(self):
        return list(self.Cats)

    def loadRefs(self, ref_ids=()):
        return [self.Refs[ref_id] for ref_id in _ids(ref_ids)]

    def loadAnns(self, ann_ids=()):
        return [self.Anns[ann_id] for ann_id in _ids(ann_ids)]

    def loadImgs(self, image_ids=()):
        return [self.Imgs[image_id] for image_id in _ids(image_ids)]

    def loadCats(self, cat_ids=()):
        """Category names (the original's `Cats` maps id -> name)."""
        return [self.Cats[cat_id] for cat_id in _ids(cat_ids)]

    def getRefBox(self, ref_id):
        """The referred object's COCO box [x, y, w, h] in pixels (floats)."""
        return self.refToAnn[ref_id]["bbox"]

    def getMask(self, ref):
        """{'mask': uint8 [H, W], 'area': int} of the referred object's segmentation.

        As in the original, the mask is the per-pixel SUM of the object's polygons, so it is binary except where
        two polygons of one object overlap (rare); use `mask > 0` for a strict binary mask. `area` is the
        rasterised area, which should be close to the annotation's `area`. RefCLEF's RLE segmentations
        (compressed or not) are handled too.
        """
        from pycocotools import mask as mask_api

        ann = self.refToAnn[ref["ref_id"]]
        image = self.Imgs[ref["image_id"]]
        segmentation = ann["segmentation"]
        if isinstance(segmentation, list):  # polygons: RefCOCO, RefCOCO+, RefCOCOg
            rles = mask_api.frPyObjects(segmentation, image["height"], image["width"])
        elif isinstance(segmentation["counts"], list):  # uncompressed RLE
            rles = [mask_api.frPyObjects(segmentation, image["height"], image["width"])]
        else:  # compressed RLE
            rles = [segmentation]
        m = mask_api.decode(rles)  # [H, W, number of polygons]
        return {"mask": np.sum(m, axis=2).astype(np.uint8), "area": int(np.sum(mask_api.area(rles)))}

    def showRef(self, ref, seg_box="seg", ax=None):
        """Draw the image with the referred object's segmentation ('seg') or box ('box'); print its sentences.

        Without the COCO image on disk (e.g. generated data), the drawing is on a blank canvas of the image's size.
        """
        import matplotlib.pyplot as plt
        from matplotlib.collections import PatchCollection
        from matplotlib.patches import Polygon, Rectangle

        if seg_box not in ("seg", "box"):
            raise ValueError(f"seg_box={seg_box!r} must be 'seg' or 'box'")
        ax = ax or plt.gca()
        image = self.Imgs[ref["image_id"]]
        image_path = osp.join(self.IMAGE_DIR, image["file_name"])
        if osp.isfile(image_path):
            ax.imshow(plt.imread(image_path))
        else:
            ax.imshow(np.full((image["height"], image["width"], 3), 0.9))
            ax.set_title(f"(no image at {image_path})", fontsize=8)
        for number, sent in enumerate(ref["sentences"], 1):
            print(f"{number}. {sent['sent']}")

        ann = self.refToAnn[ref["ref_id"]]
        if seg_box == "box":
            x, y, w, h = self.getRefBox(ref["ref_id"])
            ax.add_patch(Rectangle((x, y), w, h, fill=False, edgecolor="green", linewidth=3))
        elif isinstance(ann["segmentation"], list):
            polygons = [Polygon(np.asarray(seg).reshape(-1, 2), closed=True, alpha=0.4) for seg in ann["segmentation"]]
            ax.add_collection(PatchCollection(polygons, facecolors="none", edgecolors="yellow", linewidths=3))
            ax.add_collection(PatchCollection(polygons, facecolors="none", edgecolors="red", linewidths=1))
        else:
            m = self.getMask(ref)["mask"] > 0
            overlay = np.zeros(m.shape + (4,))
            overlay[..., :3] = np.array([2.0, 166.0, 101.0]) / 255
            overlay[..., 3] = m * 0.5
            ax.imshow(overlay)
        return ax

    def showMask(self, ref, ax=None):
        """Draw the referred object's mask (see `getMask`)."""
        import matplotlib.pyplot as plt

        ax = ax or plt.gca()
        ax.imshow(self.getMask(ref)["mask"])
        return ax
