"""Run a trained checkpoint on your own queries: ground a referring expression (drawn on its image), or answer a
question (VQA); one query from the flags, or a JSONL batch.

  python predict.py --demo --from_pretrained checkpoints/demo/best.pdparams --image_id 1 --expression "red dog"
  python predict.py --from_pretrained CKPT --image_id 581857 --expression "lady in the blue shirt" \\
      --image train2014/COCO_train2014_000000581857.jpg --out lady.png
  python predict.py --demo --task vqa --from_pretrained checkpoints/demo_vqa/best.pdparams --image_id 1 \\
      --question "what color is the dog?"
  # your own images: regions from a feature extractor, converted by tools/convert_features.py
  python predict.py --from_pretrained CKPT --features mine.lmdb --image_id 1 --image photo.jpg --expression "the dog"
  python predict.py --from_pretrained CKPT --features mine.lmdb --batch queries.jsonl --out predictions.jsonl

The regions are the image's boxes in the features LMDB: --features, else the task config's features_h5path1
(as in evaluation). Referring expressions: the picture (boxes drawn on --image, else on a blank canvas of the
image's size) is written to --out, by default prediction_<image_id>.png beside the checkpoint (as eval.py writes
its files); --batch reads one {"image_id": ..., "expression": ...} per line and writes the same lines with the
chosen region, its box (x1, y1, x2, y2 pixels), its score and the --top_k best, to --out (default:
<JSONL>.predictions.jsonl). VQA: the top answers with their probabilities (answers of the data root's
cache/trainval_label2ans.pkl); --batch reads {"image_id": ..., "question": ...} lines and writes them with the
answer, its probability and the --top_k best. A warning says when the features do not look like the ones the
checkpoint was trained on (`feature_extractor` of the task config; README, "Your own images").
"""

import json
import os
import sys
import time

import vilbert  # noqa: F401  (sets CPU threading defaults before paddle loads)
from vilbert.dataset import tokenize_expression
from vilbert.engine import score_queries
from vilbert.feature_lmdb import extractor_warnings, lmdb_layout
from vilbert.features import open_features
from vilbert.fileio import atomic_write
from vilbert.options import build_parser, parse_options
from vilbert.storage import localize
from vilbert.tasks import get_task
from vilbert.tokenization import BertTokenizer
from vilbert.training import build_model, exit_on_user_error, localize_paths, out_of_memory_hint, setup_device

TEXT_FLAGS = ("expression", "question")


def read_queries(path, parser, field: str) -> list:
    """The {image_id, <field>} lines of a JSONL file; a bad line ends the run naming it."""
    queries = []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                query = json.loads(line)
            except ValueError as err:
                parser.error(f"{path} line {number} is not JSON ({err})")
            if not isinstance(query, dict) or not {"image_id", field} <= set(query):
                parser.error(f'{path} line {number}: expected {{"image_id": ..., "{field}": "..."}}, '
                             f'got {line.strip()[:80]}')
            if not str(query["image_id"]).isdigit():
                parser.error(f"{path} line {number}: image_id {query['image_id']!r} is not an integer")
            if not isinstance(query[field], str) or not query[field].strip():
                parser.error(f"{path} line {number}: {field} {query[field]!r} is not a non-empty string")
            queries.append(dict(query, image_id=int(query["image_id"])))
    if not queries:
        parser.error(f"{path} holds no queries")
    return queries


@exit_on_user_error()
def main(argv=None):
    parser = build_parser(__doc__, "predict")
    parser.add_argument("--features", default=None, metavar="LMDB",
                        help="region-feature LMDB folder (default: the task config's features_h5path1)")
    parser.add_argument("--image_id", type=int, metavar="N", help="image id (must be in the features)")
    parser.add_argument("--expression", metavar="TEXT",
                        help="the referring expression (referring-expression checkpoints)")
    parser.add_argument("--question", metavar="TEXT", help="the question (VQA checkpoints)")
    parser.add_argument("--batch", metavar="JSONL", help='queries, one {"image_id": ..., "expression": ...} (VQA: '
                        '"question") per line')
    parser.add_argument("--image", default=None, metavar="PHOTO", help="the photo to draw the boxes on (JPEG, PNG)")
    parser.add_argument("--out", default=None, metavar="FILE", help="picture to write (default: "
                        "prediction_<image_id>.png beside the checkpoint); with --batch, the predictions JSONL "
                        "(default: <JSONL>.predictions.jsonl)")
    parser.add_argument("--top_k", type=int, default=3, metavar="K",
                        help="candidates (regions, answers) to list and draw")
    options, args = parse_options(parser, argv, config_beside_checkpoint=True)
    if not options.from_pretrained:
        parser.error("--from_pretrained CKPT is required")
    task = get_task(options.task)
    field = task.text_field
    for other in TEXT_FLAGS:
        if other != field and getattr(args, other) is not None:
            parser.error(f"--{other} is not a query of {task.title} (the checkpoint's task): give --{field}")
    text = getattr(args, field)
    if args.batch and (args.image_id is not None or text is not None or args.image):
        parser.error(f"--batch takes the image ids and {field}s from its file: leave out --image_id, "
                     f"--{field} and --image")
    if not args.batch and (args.image_id is None or text is None):
        parser.error(f"give --image_id and --{field}, or --batch JSONL")
    if args.image and not os.path.isfile(args.image):  # one line, like every missing file: no usage dump
        raise FileNotFoundError(f"--image {args.image} not found; give the photo the features were extracted from "
                                f"(JPEG, PNG), or leave --image out to draw on a blank canvas")
    if args.batch and not os.path.isfile(args.batch):
        raise FileNotFoundError(f'--batch {args.batch} not found; give a JSONL file of {{"image_id": ..., "{field}": '
                                f'"..."}} lines')
    setup_device(options)
    options = localize_paths(options)
    features_path = localize(args.features) if args.features else options.data_path(options.features_h5path1)
    features = open_features(features_path, cache=options.feature_cache)
    queries = read_queries(args.batch, parser, field) if args.batch else [{"image_id": args.image_id, field: text}]
    tokenizer = BertTokenizer(options.bert_model)
    flag = "" if args.batch else "--"
    for number, query in enumerate(queries, 1):
        where = f"{args.batch} query {number}: " if args.batch else ""
        if not isinstance(query[field], str):
            parser.error(f"{where}{field} {query[field]!r} is not text")
        query["input_ids"] = tokenize_expression(tokenizer, query[field], options.max_seq_length, options.tokenization)
        if len(query["input_ids"]) <= 2:
            parser.error(f"{where}{flag}{field} {query[field]!r} has no tokens; give some words")
        if query["image_id"] not in features:
            parser.error(f"{where}{flag}image_id {query['image_id']} is not in the features {features.path}; give "
                         f"one of its {len(features)} images (e.g. {', '.join(map(str, features.image_ids[:5]))})")
    regions = {image_id: features[image_id] for image_id in dict.fromkeys(q["image_id"] for q in queries)}
    for warning in extractor_warnings(options.feature_extractor, lmdb_layout(features_path),
                                      {image_id: r.num_boxes - 1 for image_id, r in regions.items()}):
        print(f"warning: {warning}", file=sys.stderr)
    model = build_model(options, options.from_pretrained)

    started = time.perf_counter()
    values = []
    with out_of_memory_hint(f"lower --eval_batch_size (now {options.eval_batch_size})"):
        for start in range(0, len(queries), options.eval_batch_size):
            chunk = queries[start:start + options.eval_batch_size]
            values += score_queries(model, [(regions[q["image_id"]], q["input_ids"]) for q in chunk],
                                    options.max_region_num, task.output, options.task_id)
    seconds = time.perf_counter() - started
    lines = [task.prediction_line({k: v for k, v in query.items() if k != "input_ids"}, value,
                                  regions[query["image_id"]], args.top_k, options)
             for query, value in zip(queries, values)]
    if args.batch:
        out = args.out or f"{args.batch}.predictions.jsonl"
        atomic_write(out, "".join(json.dumps(line) + "\n" for line in lines))
        print(f"{task.predicted.capitalize()} {len(queries)} {field}s in {len(regions)} images in {seconds:.2f} s "
              f"({len(queries) / seconds:.0f} {field}s/s, batches of up to {options.eval_batch_size}, model "
              f"loading not counted); wrote {out}")
        return
    if not args.out:  # beside the checkpoint, as eval.py writes its files: not into the working directory
        args.out = os.path.join(os.path.dirname(options.from_pretrained), f"prediction_{args.image_id}.png")
    task.show_prediction(lines[0], regions[args.image_id], args)


if __name__ == "__main__":
    main()
