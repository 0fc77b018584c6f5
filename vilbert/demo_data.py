"""A small generated RefCOCO+ (or RefCOCO, RefCOCOg) in the official on-disk layout, for the demo, the tests and
the benchmarks.

Every file is in the format the official code reads, so the whole pipeline runs on it unchanged
(`bash download_dataset.sh --check --dataroot ROOT` audits it like the real data):

    <root>/refcoco+/refs(unc).p                               pickled list of refs (REFER fields)
    <root>/refcoco+/instances.json                            COCO images, annotations (polygons), categories
    <root>/refcoco+_resnet101_faster_rcnn_genome.lmdb/        detected boxes and their features
    <root>/refcoco+_gt_resnet101_faster_rcnn_genome.lmdb/     the referred objects' boxes and features

`dataset='refcoco'` or `'refcocog'` writes that dataset's files instead (`refcocog/refs(umd).p`,
`refcocog_resnet101_faster_rcnn_genome.lmdb`, ...: vilbert_beta's naming), so all three can share one root.

`layout='beta'` writes the LMDB records of vilbert_beta (str fields, base64 float32 arrays, with `cls_prob`);
`layout='mt'` those of vilbert-multi-task (ints, float32 numpy arrays). The paths are the same for both.
`region_files` also writes the detected regions as the feature extractors do (`vilbert/extractor_outputs.py`):
`<root>/regions/detected.tsv`, `<root>/regions/npy/<image_id>.npy`, `<root>/regions/npz/<image_id>.npz`.

The task is learnable by a small model trained from scratch: each image holds 4-8 objects with a colour and
a kind; an expression names what singles its object out (usually colour and kind, as other objects share
one of them); a region's feature vector carries its object's colour and kind as scaled one-hot blocks plus
noise. Detections are the objects' boxes jittered (IoU > 0.5 with their object) plus unrelated boxes, so the
best possible accuracy is 100% and chance is about 1 / number of boxes. Splits are the dataset's, with disjoint
images: train, val, testA (people are referred to) and testB (other objects are); RefCOCOg (umd): train, val
and test (any object). Image ids are >= 600000,
outside COCO train2014, so no real image is mistaken for a generated one.

`scene_objects`, `place_objects` and `detections` draw one image's objects and regions; the generated VQA data
(`vilbert/vqa_demo_data.py`) asks its questions about images drawn by them.
"""

import json
import pickle
from pathlib import Path
from typing import NamedTuple, Sequence

import numpy as np

from .dataset import iou_plus_one
from .extractor_outputs import FORMATS, WRITERS
from .feature_lmdb import FeatureLMDBWriter, ImageRegions, encode_record
from .fileio import atomic_write
from .refer_datasets import DATASETS, feature_files

DETECTED_LMDB, GT_LMDB = feature_files("refcoco+", "beta")  # the default dataset's
REGIONS_DIR = "regions"
REGION_FILES = {"tsv": "detected.tsv", "npy": "npy", "npz": "npz"}  # format -> file or folder in REGIONS_DIR
LAYOUTS = ("beta", "mt")


class Kind(NamedTuple):
    word: str
    category_id: int  # COCO category
    category: str
    supercategory: str


COLOURS = ("red", "blue", "green", "white", "black", "yellow")
KINDS = (
    Kind("man", 1, "person", "person"),
    Kind("woman", 1, "person", "person"),
    Kind("child", 1, "person", "person"),
    Kind("dog", 18, "dog", "animal"),
    Kind("cat", 17, "cat", "animal"),
    Kind("horse", 19, "horse", "animal"),
    Kind("car", 3, "car", "vehicle"),
    Kind("chair", 62, "chair", "furniture"),
)
PERSON_KINDS = tuple(i for i, kind in enumerate(KINDS) if kind.category_id == 1)
OTHER_KINDS = tuple(i for i, kind in enumerate(KINDS) if kind.category_id != 1)
ALL_KINDS = tuple(range(len(KINDS)))

# Expression templates: "{c}" colour, "{k}" kind. `sent` is the template; `raw` is typed text (see _raw).
BOTH_TEMPLATES_PERSON = ("{c} {k}", "the {c} {k}", "{k} in {c}", "{k} wearing {c}", "{k} with {c} shirt")
BOTH_TEMPLATES_OTHER = ("{c} {k}", "the {c} {k}", "{k} that is {c}", "a {c} {k}")
KIND_TEMPLATES = ("{k}", "the {k}")
COLOUR_TEMPLATES = ("{c} one", "the {c} one")

# Region features: 2048-d like ResNet-101 bottom-up features, non-negative; attribute blocks at the front.
FEATURE_SIZE = 2048
NUM_CLASSES = 1601  # Visual Genome classes + background, the width of beta's cls_prob
BLOCK = 16  # dims per attribute value
COLOUR_OFFSET = 0
KIND_OFFSET = COLOUR_OFFSET + BLOCK * len(COLOURS)
NOISE_END = 512  # dims [KIND_OFFSET + BLOCK * len(KINDS), NOISE_END) hold noise, the rest are zero
IMAGE_SIZES = ((640, 480), (640, 427), (640, 360), (500, 375), (640, 512), (480, 640), (427, 640))
FIRST_IMAGE_ID = 600_000  # COCO train2014 ids end at 581929
FIRST_ANN_ID = 3_000_000


def make_demo_dataset(root, *, dataset: str = "refcoco+", seed: int = 0, layout: str = "beta",
                      num_train_images: int = 600, num_val_images: int = 150, num_test_images: int = 60,
                      max_detections: int = 0, region_files: Sequence[str] = ()) -> Path:
    """Write the generated data of `dataset` into the root (deterministic in `seed`) and return its path.

    num_test_images is per test split (testA and testB each; RefCOCOg's test). The refs file is written last,
    so its presence means the dataset is complete. A few seconds for the default size (~870 images, ~180 MB
    in beta layout). max_detections > 0 adds background boxes anywhere in the image, up to a count drawn
    uniformly from [the image's own count, max_detections], as real detectors return up to 100 (RefCOCO+-sized
    data for benchmarks: 20,000 images at max_detections=100 are about 24 GB in beta layout). Records are
    written as they are made, so memory stays small at any size. region_files: formats of
    `vilbert.extractor_outputs.FORMATS` to also write the detected regions in (`<root>/regions/`; these are
    kept in memory until the end).
    """
    if layout not in LAYOUTS:
        raise ValueError(f"layout={layout!r} must be one of {LAYOUTS}")
    if dataset not in DATASETS:
        raise ValueError(f"dataset={dataset!r} must be one of {', '.join(DATASETS)}")
    if set(region_files) - set(FORMATS):
        raise ValueError(f"region_files={region_files!r}: the formats are {FORMATS}")
    if num_train_images < 1 or num_val_images < 0 or num_test_images < 0:
        raise ValueError("need num_train_images >= 1 and num_val_images, num_test_images >= 0")
    root = Path(root)
    rng = np.random.default_rng(seed)
    spec = DATASETS[dataset]
    test_splits = [split for split in spec.splits if split not in ("train", "val")]
    splits = (["train"] * num_train_images + ["val"] * num_val_images
              + [split for split in test_splits for _ in range(num_test_images)])
    splits = [splits[i] for i in rng.permutation(len(splits))]  # interleaved, as in the real refs file
    image_ids = FIRST_IMAGE_ID + np.sort(rng.choice(400_000, size=len(splits), replace=False))

    images, annotations, refs = [], [], []
    num_sentences = 0
    detected_lmdb, gt_lmdb = feature_files(dataset, "beta")
    kept = []  # the detected regions, for region_files
    with FeatureLMDBWriter(root / detected_lmdb) as detected, FeatureLMDBWriter(root / gt_lmdb) as gt:
        for image_id, split in zip(image_ids.tolist(), splits):
            width, height = IMAGE_SIZES[rng.integers(len(IMAGE_SIZES))]
            colours, kinds, boxes, referents, free_cells = _scene(rng, split, width, height)
            ann_ids = [FIRST_ANN_ID + len(annotations) + i for i in range(len(boxes))]
            images.append(_image(image_id, width, height))
            annotations.extend(_annotation(rng, ann_id, image_id, KINDS[kind].category_id, box)
                               for ann_id, kind, box in zip(ann_ids, kinds, boxes))
            for number, index in enumerate(referents):
                sentences = []
                for _ in range(rng.integers(2, 5)):
                    raw, sent = _sentence(rng, index, colours, kinds)
                    sentences.append({"tokens": sent.split(), "raw": raw, "sent_id": num_sentences, "sent": sent})
                    num_sentences += 1
                refs.append({"sent_ids": [s["sent_id"] for s in sentences],
                             "file_name": f"COCO_train2014_{image_id:012d}_{number + 1}.jpg",
                             "ann_id": ann_ids[index], "ref_id": len(refs), "image_id": image_id, "split": split,
                             "category_id": KINDS[kinds[index]].category_id, "sentences": sentences})
            regions = detections(rng, image_id, width, height, colours, kinds, boxes, free_cells, max_detections)
            detected.put(image_id, encode_record(regions, layout))
            kept += [regions] if region_files else []
            referred = _regions(rng, image_id, width, height, [_xyxy(boxes[i]) for i in referents],
                                [colours[i] for i in referents], [kinds[i] for i in referents])
            gt.put(image_id, encode_record(referred, layout))
    for fmt in region_files:
        WRITERS[fmt](root / REGIONS_DIR / REGION_FILES[fmt], kept)

    data_dir = root / dataset
    data_dir.mkdir(parents=True, exist_ok=True)
    instances = {
        "info": {"description": f"ViLBERT-Paddle generated {dataset}-format demo data", "version": "1.0",
                 "year": 2024, "contributor": "vilbert/demo_data.py", "date_created": "2024-01-01",
                 "seed": seed},
        "images": images,
        "licenses": [{"url": "", "id": 1, "name": "generated data, no license restrictions"}],
        "annotations": annotations,
        "categories": [{"supercategory": sup, "id": cid, "name": name}
                       for cid, name, sup in sorted({(k.category_id, k.category, k.supercategory) for k in KINDS})],
    }
    atomic_write(data_dir / "instances.json", json.dumps(instances).encode())
    atomic_write(data_dir / f"refs({spec.splitBy}).p", pickle.dumps(refs, protocol=2))
    return root


def _scene(rng, split, width, height):
    """Objects (colour, kind, xywh box) in distinct grid cells, the indices of the referred ones, the free cells."""
    if split == "testA":
        referable = PERSON_KINDS
    elif split == "testB":
        referable = OTHER_KINDS
    else:
        referable = ALL_KINDS
    colours, kinds = scene_objects(rng, referable)
    pairs = list(zip(colours, kinds))
    unique = [i for i, pair in enumerate(pairs) if pairs.count(pair) == 1 and kinds[i] in referable]
    referents = sorted(rng.choice(unique, size=min(len(unique), int(rng.integers(2, 5))), replace=False).tolist())
    boxes, free_cells = place_objects(rng, len(kinds), width, height)
    return colours, kinds, boxes, referents, free_cells


def scene_objects(rng, referable=ALL_KINDS):
    """The colours and kinds (indices into COLOURS, KINDS) of an image's 4-8 objects, drawn from few kinds and
    colours so that objects share them, with at least one object of a `referable` kind whose colour and kind
    together are unique in the image."""
    while True:
        num_objects = int(rng.integers(4, 9))
        # Few kinds and colours per image, so other objects share the referent's kind or its colour.
        kind_pool = rng.choice(referable, size=2, replace=False).tolist() + [int(rng.integers(len(KINDS)))]
        colour_pool = rng.choice(len(COLOURS), size=int(rng.integers(2, 5)), replace=False)
        kinds = [kind_pool[i] for i in rng.integers(len(kind_pool), size=num_objects)]
        colours = rng.choice(colour_pool, size=num_objects).tolist()
        pairs = list(zip(colours, kinds))
        if any(pairs.count(pair) == 1 and kinds[i] in referable for i, pair in enumerate(pairs)):
            return colours, kinds


def place_objects(rng, num_objects, width, height):
    """xywh boxes of `num_objects` objects, each in its own cell of a grid over the image, and the cells left."""
    cells = _cells(rng, width, height)
    return [_box_in(rng, cell, 0.5, 0.95) for cell in cells[:num_objects]], cells[num_objects:]


def _cells(rng, width, height):
    """The 12 cells of a 4x3 (landscape) or 3x4 (portrait) grid as (x, y, w, h), in random order."""
    cols, rows = (4, 3) if width >= height else (3, 4)
    cell_w, cell_h = width / cols, height / rows
    cells = [(c * cell_w, r * cell_h, cell_w, cell_h) for r in range(rows) for c in range(cols)]
    return [cells[i] for i in rng.permutation(len(cells))]


def _box_in(rng, cell, low, high):
    """A box inside the cell, each side `low`..`high` of the cell's, as [x, y, w, h] with 2 decimals."""
    x, y, cell_w, cell_h = cell
    w, h = cell_w * rng.uniform(low, high), cell_h * rng.uniform(low, high)
    x, y = x + rng.uniform(0, cell_w - w), y + rng.uniform(0, cell_h - h)
    return [round(float(v), 2) for v in (x, y, w, h)]


def _xyxy(box):
    x, y, w, h = box
    return [x, y, x + w, y + h]


def _features(rng, colour, kind):
    """Non-negative noise, plus scaled one-hot blocks for the colour and kind when the region is an object."""
    feature = np.zeros(FEATURE_SIZE, np.float32)
    feature[:NOISE_END] = np.abs(rng.normal(0.0, 0.1, NOISE_END))
    if colour is not None:
        start = COLOUR_OFFSET + BLOCK * colour
        feature[start:start + BLOCK] += rng.uniform(1.5, 2.5, BLOCK)
        start = KIND_OFFSET + BLOCK * kind
        feature[start:start + BLOCK] += rng.uniform(1.5, 2.5, BLOCK)
    return feature


def _regions(rng, image_id, width, height, boxes, colours, kinds):
    """One image's regions; colour/kind None marks a region that is no object."""
    features = np.stack([_features(rng, c, k) for c, k in zip(colours, kinds)])
    boxes = np.asarray(boxes, np.float32).reshape(-1, 4)
    # A valid distribution over classes: most mass on the kind's class, class 0 (background) otherwise.
    cls_prob = np.full((len(boxes), NUM_CLASSES), 0.1 / (NUM_CLASSES - 1), np.float32)
    cls_prob[np.arange(len(boxes)), [0 if k is None else 1 + k for k in kinds]] = 0.9
    return ImageRegions(image_id, width, height, boxes, features, cls_prob)


def detections(rng, image_id, width, height, colours, kinds, boxes, free_cells, max_detections=0):
    """Each object's box jittered (IoU > 0.5 with it) plus 2-3 boxes in cells without objects, in random order;
    with max_detections, background boxes anywhere up to a count drawn from [that count, max_detections]."""
    regions = []
    for colour, kind, box in zip(colours, kinds, boxes):
        x1, y1, x2, y2 = _xyxy(box)
        while True:
            dx, dy = 0.1 * (x2 - x1), 0.1 * (y2 - y1)
            jittered = [max(0.0, x1 + rng.uniform(-dx, dx)), max(0.0, y1 + rng.uniform(-dy, dy)),
                        min(width - 1.0, x2 + rng.uniform(-dx, dx)), min(height - 1.0, y2 + rng.uniform(-dy, dy))]
            if iou_plus_one([jittered], [x1, y1, x2, y2])[0] > 0.6:
                break
        regions.append((jittered, colour, kind))
    for cell in free_cells[:int(rng.integers(2, 4))]:
        regions.append((_xyxy(_box_in(rng, cell, 0.3, 0.9)), None, None))
    if max_detections > len(regions):
        whole_image = (0.0, 0.0, float(width), float(height))
        for _ in range(int(rng.integers(len(regions), max_detections + 1)) - len(regions)):
            regions.append((_xyxy(_box_in(rng, whole_image, 0.1, 0.9)), None, None))
    regions = [regions[i] for i in rng.permutation(len(regions))]
    return _regions(rng, image_id, width, height, *map(list, zip(*regions)))


def _sentence(rng, index, colours, kinds):
    """(raw, sent) naming object `index`: colour and kind, or just one of them when that alone is unique."""
    colour, kind = colours[index], kinds[index]
    kind_unique = kinds.count(kind) == 1
    colour_unique = colours.count(colour) == 1
    draw = rng.random()
    if kind_unique and draw < 0.25:
        templates = KIND_TEMPLATES
    elif colour_unique and draw > 0.85:
        templates = COLOUR_TEMPLATES
    elif kind in PERSON_KINDS:
        templates = BOTH_TEMPLATES_PERSON
    else:
        templates = BOTH_TEMPLATES_OTHER
    sent = templates[rng.integers(len(templates))].format(c=COLOURS[colour], k=KINDS[kind].word)
    return _raw(rng, sent), sent


def _raw(rng, sent):
    """What an annotator typed: RefCOCO+ raw text abbreviates "with" to "w" and is sometimes all caps."""
    raw = sent
    if " with " in raw and rng.random() < 0.5:
        raw = raw.replace(" with ", " w ")
    if rng.random() < 0.1:
        raw = raw.upper()
    return raw


def _image(image_id, width, height):
    return {"license": 1, "file_name": f"COCO_train2014_{image_id:012d}.jpg", "coco_url": "", "height": height,
            "width": width, "date_captured": "2013-11-14 11:18:45", "flickr_url": "", "id": image_id}


def _annotation(rng, ann_id, image_id, category_id, box):
    """A COCO annotation whose polygon is the box with its corners cut, so the polygon's bbox is the box."""
    x, y, w, h = box
    cx, cy = w * rng.uniform(0.1, 0.3), h * rng.uniform(0.1, 0.3)
    corners = [(x + cx, y), (x + w - cx, y), (x + w, y + cy), (x + w, y + h - cy),
               (x + w - cx, y + h), (x + cx, y + h), (x, y + h - cy), (x, y + cy)]
    polygon = [round(float(v), 2) for point in corners for v in point]
    xs, ys = np.array(polygon[0::2]), np.array(polygon[1::2])
    area = 0.5 * abs(float(np.dot(xs, np.roll(ys, -1)) - np.dot(ys, np.roll(xs, -1))))  # shoelace
    return {"segmentation": [polygon], "area": area, "iscrowd": 0, "image_id": image_id, "bbox": list(box),
            "category_id": category_id, "id": ann_id}
