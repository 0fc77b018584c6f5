"""Ground one expression in one image with a trained checkpoint: print the chosen box, draw the candidates.

  python predict.py --demo --from_pretrained checkpoints/demo/best.pdparams --image_id 1 --expression "red dog"
  python predict.py --from_pretrained CKPT --image_id 581857 --expression "lady in the blue shirt" \
      --image train2014/COCO_train2014_000000581857.jpg --out lady.png

The regions are the image's detected boxes from the features LMDB of the task config (as in evaluation).
Without --image the boxes are drawn on a blank canvas of the image's size.
"""

import numpy as np

import vilbert  # noqa: F401  (sets CPU threading defaults before paddle loads)
from vilbert.dataset import tokenize_expression
from vilbert.engine import score_regions
from vilbert.features import open_features
from vilbert.options import build_parser, parse_options
from vilbert.tokenization import BertTokenizer
from vilbert.training import build_model, exit_on_user_error, localize_paths, setup_device
from vilbert.visualize import draw_prediction


@exit_on_user_error()
def main(argv=None):
    parser = build_parser(__doc__)
    parser.add_argument("--image_id", type=int, required=True, help="COCO image id (must be in the features)")
    parser.add_argument("--expression", required=True, help="the referring expression")
    parser.add_argument("--image", default=None, help="the COCO image file, to draw on")
    parser.add_argument("--out", default=None, help="PNG to write (default: prediction_<image_id>.png)")
    parser.add_argument("--top_k", type=int, default=3, help="candidates to list and draw")
    options, args = parse_options(parser, argv, config_beside_checkpoint=True)
    if not options.from_pretrained:
        parser.error("--from_pretrained CKPT is required")
    setup_device(options)
    options = localize_paths(options)
    tokenizer = BertTokenizer(options.bert_model)
    input_ids = tokenize_expression(tokenizer, args.expression, options.max_seq_length)
    if len(input_ids) <= 2:
        parser.error(f"--expression {args.expression!r} has no tokens; give some words")
    features = open_features(options.data_path(options.features_h5path1), cache=options.feature_cache)
    if args.image_id not in features:
        parser.error(f"--image_id {args.image_id} is not in the features {features.path}; give one of its "
                     f"{len(features)} images (e.g. {', '.join(map(str, features.image_ids[:5]))})")
    regions = features[args.image_id]
    model = build_model(options, options.from_pretrained)
    scores, boxes = score_regions(model, regions, input_ids, options.max_region_num, options.task_id)
    order = np.argsort(-scores)[:args.top_k]
    best = order[0]
    print(f'"{args.expression}" in image {args.image_id}: region {best}, box (x1, y1, x2, y2) = '
          f"{[round(float(v), 1) for v in boxes[best]]}, score {scores[best]:.3f}")
    for rank, index in enumerate(order, 1):
        print(f"  #{rank}  region {index:3d}  score {scores[index]:8.3f}  box {[round(float(v), 1) for v in boxes[index]]}")
    out = args.out or f"prediction_{args.image_id}.png"
    draw_prediction(out, args.expression, boxes, scores, image_size=(regions.image_w, regions.image_h),
                    image=args.image, top_k=args.top_k, title=f"image {args.image_id}")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
