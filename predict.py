"""Ground referring expressions with a trained checkpoint: one expression drawn on its image, or a JSONL batch.

  python predict.py --demo --from_pretrained checkpoints/demo/best.pdparams --image_id 1 --expression "red dog"
  python predict.py --from_pretrained CKPT --image_id 581857 --expression "lady in the blue shirt" \
      --image train2014/COCO_train2014_000000581857.jpg --out lady.png
  # your own images: regions from a feature extractor, converted by tools/convert_features.py
  python predict.py --from_pretrained CKPT --features mine.lmdb --image_id 1 --image photo.jpg --expression "the dog"
  python predict.py --from_pretrained CKPT --features mine.lmdb --batch queries.jsonl --out predictions.jsonl

The regions are the image's boxes in the features LMDB: --features, else the task config's detected-box LMDB
(as in evaluation). Without --image the boxes are drawn on a blank canvas of the image's size. --batch reads
one {"image_id": ..., "expression": ...} per line and writes the same lines with the chosen region, its box
(x1, y1, x2, y2 pixels), its score and the --top_k best. A warning says when the features do not look like
the ones the checkpoint was trained on (`feature_extractor` of the task config; README, "Your own images").
"""

import json
import os
import sys
import time

import numpy as np

import vilbert  # noqa: F401  (sets CPU threading defaults before paddle loads)
from vilbert.dataset import tokenize_expression
from vilbert.engine import score_expressions
from vilbert.feature_lmdb import extractor_warnings, lmdb_layout
from vilbert.features import open_features
from vilbert.fileio import atomic_write
from vilbert.options import build_parser, parse_options
from vilbert.storage import localize
from vilbert.tokenization import BertTokenizer
from vilbert.training import build_model, exit_on_user_error, localize_paths, out_of_memory_hint, setup_device
from vilbert.visualize import draw_prediction


def read_queries(path, parser) -> list:
    """The {image_id, expression} lines of a JSONL file; a bad line ends the run naming it."""
    queries = []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                query = json.loads(line)
            except ValueError as err:
                parser.error(f"{path} line {number} is not JSON ({err})")
            if not isinstance(query, dict) or not {"image_id", "expression"} <= set(query):
                parser.error(f'{path} line {number}: expected {{"image_id": ..., "expression": "..."}}, got {line.strip()[:80]}')
            if not str(query["image_id"]).isdigit():
                parser.error(f"{path} line {number}: image_id {query['image_id']!r} is not an integer")
            queries.append(dict(query, image_id=int(query["image_id"])))
    if not queries:
        parser.error(f"{path} holds no queries")
    return queries


def rounded(box) -> list:
    return [round(float(v), 1) for v in box]


def prediction_line(query: dict, scores: np.ndarray, boxes: np.ndarray, top_k: int) -> dict:
    """The query's own fields, then the chosen region, its box and score, and the top_k best candidates."""
    best = [{"region": int(i), "box": rounded(boxes[i]), "score": round(float(scores[i]), 4)}
            for i in np.argsort(-scores)[:top_k]]
    return {**{k: v for k, v in query.items() if k != "input_ids"}, **best[0], "top_k": best}


@exit_on_user_error()
def main(argv=None):
    parser = build_parser(__doc__)
    parser.add_argument("--features", default=None,
                        help="region-feature LMDB folder (default: the task config's features_h5path1)")
    parser.add_argument("--image_id", type=int, help="image id (must be in the features)")
    parser.add_argument("--expression", help="the referring expression")
    parser.add_argument("--batch", metavar="JSONL", help='queries, one {"image_id": ..., "expression": ...} per line')
    parser.add_argument("--image", default=None, help="the photo to draw on (JPEG, PNG)")
    parser.add_argument("--out", default=None, help="picture to write (default: prediction_<image_id>.png); with "
                        "--batch, the predictions JSONL (default: <JSONL>.predictions.jsonl)")
    parser.add_argument("--top_k", type=int, default=3, help="candidates to list and draw")
    options, args = parse_options(parser, argv, config_beside_checkpoint=True)
    if not options.from_pretrained:
        parser.error("--from_pretrained CKPT is required")
    if args.batch and (args.image_id is not None or args.expression is not None or args.image):
        parser.error("--batch takes the image ids and expressions from its file: leave out --image_id, "
                     "--expression and --image")
    if not args.batch and (args.image_id is None or args.expression is None):
        parser.error("give --image_id and --expression, or --batch JSONL")
    if args.image and not os.path.isfile(args.image):
        parser.error(f"--image {args.image} not found")
    setup_device(options)
    options = localize_paths(options)
    features_path = localize(args.features) if args.features else options.data_path(options.features_h5path1)
    features = open_features(features_path, cache=options.feature_cache)
    queries = read_queries(args.batch, parser) if args.batch else [
        {"image_id": args.image_id, "expression": args.expression}]
    tokenizer = BertTokenizer(options.bert_model)
    flag = "" if args.batch else "--"
    for number, query in enumerate(queries, 1):
        where = f"{args.batch} query {number}: " if args.batch else ""
        query["input_ids"] = tokenize_expression(tokenizer, query["expression"], options.max_seq_length,
                                                 options.tokenization)
        if len(query["input_ids"]) <= 2:
            parser.error(f"{where}{flag}expression {query['expression']!r} has no tokens; give some words")
        if query["image_id"] not in features:
            parser.error(f"{where}{flag}image_id {query['image_id']} is not in the features {features.path}; give "
                         f"one of its {len(features)} images (e.g. {', '.join(map(str, features.image_ids[:5]))})")
    regions = {image_id: features[image_id] for image_id in dict.fromkeys(q["image_id"] for q in queries)}
    for warning in extractor_warnings(options.feature_extractor, lmdb_layout(features_path),
                                      {image_id: r.num_boxes - 1 for image_id, r in regions.items()}):
        print(f"warning: {warning}", file=sys.stderr)
    model = build_model(options, options.from_pretrained)

    started = time.perf_counter()
    results = []
    with out_of_memory_hint(f"lower --eval_batch_size (now {options.eval_batch_size})"):
        for start in range(0, len(queries), options.eval_batch_size):
            chunk = queries[start:start + options.eval_batch_size]
            results += score_expressions(model, [(regions[q["image_id"]], q["input_ids"]) for q in chunk],
                                         options.max_region_num, options.task_id)
    seconds = time.perf_counter() - started
    if args.batch:
        out = args.out or f"{args.batch}.predictions.jsonl"
        atomic_write(out, "".join(json.dumps(prediction_line(query, scores, boxes, args.top_k)) + "\n"
                                  for query, (scores, boxes) in zip(queries, results)))
        print(f"Grounded {len(queries)} expressions in {len(regions)} images in {seconds:.2f} s "
              f"({len(queries) / seconds:.0f} expressions/s, batches of up to {options.eval_batch_size}, model "
              f"loading not counted); wrote {out}")
        return
    (scores, boxes), image = results[0], regions[args.image_id]
    order = np.argsort(-scores)[:args.top_k]
    print(f'"{args.expression}" in image {args.image_id}: region {order[0]}, box (x1, y1, x2, y2) = '
          f"{rounded(boxes[order[0]])}, score {scores[order[0]]:.3f}")
    for rank, index in enumerate(order, 1):
        print(f"  #{rank}  region {index:3d}  score {scores[index]:8.3f}  box {rounded(boxes[index])}")
    if args.image:
        check_photo_size(args.image, image.image_w, image.image_h)
    out = args.out or f"prediction_{args.image_id}.png"
    draw_prediction(out, args.expression, boxes, scores, image_size=(image.image_w, image.image_h),
                    image=args.image, top_k=args.top_k, title=f"image {args.image_id}")
    print(f"wrote {out}")


def check_photo_size(path, image_w: int, image_h: int) -> None:
    """Warns when the photo is not the size the features' boxes are in (they are then drawn scaled to it)."""
    from PIL import Image

    with Image.open(path) as photo:
        size = photo.size
    if size != (image_w, image_h):
        print(f"warning: {path} is {size[0]}x{size[1]} pixels but the features were extracted from a "
              f"{image_w}x{image_h} image: the boxes are drawn scaled to the photo, which is right only if it "
              f"is the same photo resized", file=sys.stderr)


if __name__ == "__main__":
    main()
