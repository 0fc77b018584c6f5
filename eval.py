"""Evaluate a checkpoint on RefCOCO, RefCOCO+ or RefCOCOg splits: accuracy (chosen box IoU > 0.5), expressions,
upper bound.

  python eval.py --from_pretrained checkpoints/refcoco+_bert_base_6layer_6conect/best.pdparams --split all
  python eval.py --from_pretrained save/refcoco+_bert_base_6layer_6conect-pretrained/pytorch_model_19.bin
  python eval.py --demo --from_pretrained checkpoints/demo/best.pdparams
  python eval.py --task_config config/refcocog.yml --from_pretrained multi_task_model.bin --split all  # 12-in-1

Options default to the checkpoint's own run config (config.yaml beside it) when there is one, else to
config/refcoco+.yml (config/demo.yml with --demo). Predictions (sent_id, ref_id, chosen box, score, IoU,
correct) are written as JSON beside the checkpoint, one file per split; `--draw N` also draws the first N
expressions of each split (chosen box green, runners-up orange, referred box dashed red) into a folder there.
"""

import json
from pathlib import Path

import vilbert  # noqa: F401  (sets CPU threading defaults before paddle loads)
from vilbert.dataset import tokenize_expression
from vilbert.engine import evaluate, score_regions
from vilbert.options import build_parser, parse_options
from vilbert.refer_datasets import DATASETS, check_split
from vilbert.tokenization import BertTokenizer
from vilbert.training import (build_dataset, build_model, eval_loader, exit_on_user_error, is_main_process,
                              localize_paths, out_of_memory_hint, setup_device)
from vilbert.visualize import draw_prediction


def draw_first(model, dataset, tokenizer, options, count: int, folder: Path) -> None:
    folder.mkdir(exist_ok=True)
    for entry in dataset.entries[:count]:
        regions = dataset.det_features[entry["image_id"]]
        input_ids = tokenize_expression(tokenizer, entry["caption"], options.max_seq_length, options.tokenization)
        scores, boxes = score_regions(model, regions, input_ids, options.max_region_num, options.task_id)
        draw_prediction(folder / f"sent_{entry['sent_id']}.png", entry["caption"], boxes, scores,
                        image_size=(regions.image_w, regions.image_h), target_box=entry["ref_box"],
                        title=f"image {entry['image_id']}, sent {entry['sent_id']}")
    print(f"drew {min(count, len(dataset))} expressions into {folder}")


@exit_on_user_error()
def main(argv=None):
    parser = build_parser(__doc__)
    parser.add_argument("--split", default="val", help="a split name, or 'all' for the dataset's evaluation splits "
                        "(val, testA, testB; RefCOCOg: val, test)")
    parser.add_argument("--draw", type=int, default=0, metavar="N", help="draw the first N expressions per split")
    options, args = parse_options(parser, argv, config_beside_checkpoint=True)
    if not options.from_pretrained:
        parser.error("--from_pretrained CKPT is required")
    setup_device(options)
    options = localize_paths(options)
    splits = list(DATASETS[options.dataset].eval_splits) if args.split == "all" else [args.split]
    for split in splits:
        check_split(options.dataset, split, options.splitBy)
    tokenizer = BertTokenizer(options.bert_model)
    model = build_model(options, options.from_pretrained)
    checkpoint = Path(options.from_pretrained)
    rows = []
    for split in splits:
        dataset = build_dataset(options, split, tokenizer)
        with out_of_memory_hint(f"lower --eval_batch_size (now {options.eval_batch_size})"):
            result = evaluate(model, eval_loader(dataset, options), amp=options.amp, task_id=options.task_id,
                              show_progress=is_main_process(), desc=split)
        if is_main_process():
            stem = f"{checkpoint.stem}_{options.dataset}_{split}"
            out = checkpoint.with_name(f"{stem}_predictions.json")
            out.write_text(json.dumps(result.predictions))
            rows.append((split, result, out))
            if args.draw:
                draw_first(model, dataset, tokenizer, options, args.draw, checkpoint.with_name(f"{stem}_pictures"))
    if is_main_process():
        print(f"\n{'split':<8}{'accuracy':>10}{'expressions':>13}{'upper bound':>13}  predictions")
        for split, result, out in rows:
            print(f"{split:<8}{result.accuracy:>10.4f}{result.num_expressions:>13d}{result.upper_bound:>13.4f}  {out}")


if __name__ == "__main__":
    main()
