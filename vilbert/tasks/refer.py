"""Referring expressions (RefCOCO, RefCOCO+, RefCOCOg): task type "V-logit" of both official codebases.

The model scores every region (`vision_logit`); the loss and the score are the official ones
(`vilbert/metrics.py`); an expression is right when its chosen region has IoU > 0.5 with the referred box.
"""

import json
import sys
from pathlib import Path
from typing import Dict, List

import numpy as np

from pyutils.refer.refer import SPLITS_BY

from ..dataset import ReferExpressionDataset, tokenize_expression
from ..demo_data import make_demo_dataset
from ..engine import score_regions
from ..features import open_features
from ..metrics import rec_loss, rec_select
from ..options import OptionsError
from ..refer_datasets import DATASETS, UnknownSplitError, check_split
from ..visualize import draw_prediction
from .base import Task


class ReferTask(Task):
    name = "refer"
    title = "referring expressions"
    datasets = tuple(DATASETS)
    output = "vision_logit"
    metric = "accuracy"
    unit = "expressions"
    id_key = "sent_id"
    text_field = "expression"
    predicted = "grounded"
    configs = ("refcoco+.yml", "demo.yml")

    def validate(self, options) -> List[str]:
        if options.dataset not in DATASETS:
            return [f"dataset={options.dataset!r} must be one of {', '.join(DATASETS)} (VQA: --task vqa)"]
        if options.splitBy not in SPLITS_BY[options.dataset]:
            return [f"splitBy={options.splitBy!r}: {options.dataset} has {' or '.join(SPLITS_BY[options.dataset])}"]
        problems = []
        for name in ("train_split", "val_split"):
            try:
                check_split(options.dataset, getattr(options, name), options.splitBy)
            except UnknownSplitError as error:
                problems.append(f"{name}: {error}")
        return problems

    def eval_splits(self, options, split: str) -> List[str]:
        splits = list(DATASETS[options.dataset].eval_splits) if split == "all" else [split]
        for name in splits:
            check_split(options.dataset, name, options.splitBy)
        return splits

    def build_dataset(self, options, split: str, tokenizer) -> ReferExpressionDataset:
        det = open_features(options.data_path(options.features_h5path1), cache=options.feature_cache,
                            build=options.build_feature_cache)
        gt = None
        if split == options.train_split:
            gt = open_features(options.data_path(options.features_h5path2), cache=options.feature_cache,
                               build=options.build_feature_cache)
        return ReferExpressionDataset(options.dataroot, split, tokenizer, det, gt, dataset=options.dataset,
                                      splitBy=options.splitBy, max_seq_length=options.max_seq_length,
                                      max_region_num=options.max_region_num, tokenization=options.tokenization)

    def model_heads(self, options) -> Dict:
        return {"heads": ("vision_logit",)}

    def data_marker(self, options) -> Path:
        return Path(options.dataroot, options.dataset, f"refs({options.splitBy}).p")

    def download_args(self, options) -> str:
        return f"--dataset {options.dataset}"

    def make_demo_data(self, options) -> None:
        make_demo_dataset(options.dataroot, dataset=options.dataset)

    def loss(self, logit, batch):
        return rec_loss(logit, batch["target"])

    def scores(self, logit, batch):
        return rec_select(logit, batch["target"])[2].astype("float32")

    def predictions(self, logit, batch, dataset) -> List[dict]:
        index, iou, correct = (t.numpy() for t in rec_select(logit, batch["target"]))
        scores = logit.squeeze(2).numpy()
        reachable = (batch["target"].squeeze(2) > 0.5).any(1).numpy()
        ids = {k: batch[k].numpy() for k in ("sent_id", "ref_id", "image_id", "boxes")}
        return [{"sent_id": int(ids["sent_id"][i]), "ref_id": int(ids["ref_id"][i]),
                 "image_id": int(ids["image_id"][i]), "box": [round(float(v), 2) for v in ids["boxes"][i, chosen]],
                 "region": int(chosen), "score": float(scores[i, chosen]), "iou": float(iou[i]),
                 "correct": bool(correct[i]), "reachable": bool(reachable[i])}
                for i, chosen in enumerate(index)]

    def summarize(self, predictions: List[dict]) -> Dict[str, float]:
        """accuracy (IoU > 0.5, strict) and the upper bound: the share with any candidate at IoU > 0.5."""
        n = max(len(predictions), 1)
        return {"accuracy": sum(p["correct"] for p in predictions) / n,
                "upper_bound": sum(p["reachable"] for p in predictions) / n}

    def result_files(self, predictions, dataset, stem: Path, options) -> Dict[Path, str]:
        return {stem.with_name(f"{stem.name}_predictions.json"): json.dumps(predictions)}

    def draw(self, model, dataset, tokenizer, options, count: int, folder: Path) -> None:
        """The first `count` expressions: chosen box green, runners-up orange, referred box dashed red."""
        folder.mkdir(exist_ok=True)
        for entry in dataset.entries[:count]:
            regions = dataset.det_features[entry["image_id"]]
            input_ids = tokenize_expression(tokenizer, entry["caption"], options.max_seq_length, options.tokenization)
            scores, boxes = score_regions(model, regions, input_ids, options.max_region_num, options.task_id)
            draw_prediction(folder / f"sent_{entry['sent_id']}.png", entry["caption"], boxes, scores,
                            image_size=(regions.image_w, regions.image_h), target_box=entry["ref_box"],
                            title=f"image {entry['image_id']}, sent {entry['sent_id']}")
        print(f"drew {min(count, len(dataset))} expressions into {folder}")

    def prediction_line(self, query: dict, value, regions, top_k: int, options) -> dict:
        """The chosen region, its box (x1, y1, x2, y2 pixels) and score, and the top_k best regions."""
        kept = min(regions.num_boxes, options.max_region_num)
        scores, boxes = value[:kept, 0], regions.boxes[:kept]
        best = [{"region": int(i), "box": _rounded(boxes[i]), "score": round(float(scores[i]), 4)}
                for i in np.argsort(-scores)[:top_k]]
        return {**query, **best[0], "top_k": best}

    def show_prediction(self, line: dict, regions, args) -> None:
        """Prints the chosen region and the runners-up, and draws them (on --image when given)."""
        print(f'"{line["expression"]}" in image {line["image_id"]}: region {line["region"]}, box (x1, y1, x2, y2) = '
              f"{line['box']}, score {line['score']:.3f}")
        for rank, candidate in enumerate(line["top_k"], 1):
            print(f"  #{rank}  region {candidate['region']:3d}  score {candidate['score']:8.3f}  box {candidate['box']}")
        if args.image:
            _check_photo_size(args.image, regions.image_w, regions.image_h)
        out = args.out or f"prediction_{line['image_id']}.png"
        chosen = [c["region"] for c in line["top_k"]]
        draw_prediction(out, line["expression"], regions.boxes[chosen],
                        np.array([c["score"] for c in line["top_k"]]), image_size=(regions.image_w, regions.image_h),
                        image=args.image, top_k=len(chosen), title=f"image {line['image_id']}")
        print(f"wrote {out}")

    def table(self, rows) -> str:
        lines = [f"{'split':<8}{'accuracy':>10}{'expressions':>13}{'upper bound':>13}  predictions"]
        lines += [f"{split:<8}{summary['accuracy']:>10.4f}{count:>13d}{summary['upper_bound']:>13.4f}  {files[0]}"
                  for split, summary, count, files in rows]
        return "\n".join(lines)


def _rounded(box) -> list:
    return [round(float(v), 1) for v in box]


def _check_photo_size(path, image_w: int, image_h: int) -> None:
    """Warns when the photo is not the size the features' boxes are in (they are then drawn scaled to it)."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as photo:
            size = photo.size
    except UnidentifiedImageError:
        raise OptionsError(f"--image {path} is not an image Pillow can read: give the JPEG or PNG the features "
                           f"were extracted from, or leave --image out to draw on a blank canvas") from None
    if size != (image_w, image_h):
        print(f"warning: {path} is {size[0]}x{size[1]} pixels but the features were extracted from a "
              f"{image_w}x{image_h} image: the boxes are drawn scaled to the photo, which is right only if it "
              f"is the same photo resized", file=sys.stderr)
