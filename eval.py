"""Evaluate a checkpoint on the splits of its task: referring expressions (RefCOCO, RefCOCO+, RefCOCOg: accuracy,
chosen box IoU > 0.5, and the upper bound) or VQA 2.0 (soft score, official VQA accuracy, EvalAI results file).

  python eval.py --from_pretrained checkpoints/refcoco+_bert_base_6layer_6conect/best.pdparams --split all
  python eval.py --from_pretrained checkpoints/refcoco+_bert_base_6layer_6conect-pretrained/pytorch_model_19.bin
  python eval.py --demo --from_pretrained checkpoints/demo/best.pdparams
  python eval.py --task_config config/refcocog.yml --from_pretrained multi_task_model.bin --split all  # 12-in-1
  python eval.py --task vqa --from_pretrained checkpoints/VQA_bert_base_6layer_6conect-pretrained/pytorch_model_19.bin
  python eval.py --task vqa --from_pretrained CKPT --split test    # the EvalAI results file of test2015
  python eval.py --demo --task vqa --from_pretrained checkpoints/demo_vqa/best.pdparams

Options default to the checkpoint's own run config (config.yaml beside it) when there is one, else to the
task's config (config/refcoco+.yml, config/vqa.yml; with --demo its demo config). Files are written beside the
checkpoint, one set per split: referring expressions `<ckpt>_<dataset>_<split>_predictions.json` (sent_id,
ref_id, chosen box, score, IoU, correct; `--draw N` also draws the first N expressions of each split, chosen
box green, runners-up orange, referred box dashed red, into a folder there); VQA `<ckpt>_vqa_<split>_result.json`
(EvalAI: a list of {question_id, answer}), `_others.json` (vilbert_beta's top 8 answers per question) and
`_predictions.json` (answer, soft score, top answers with probabilities).
"""

from pathlib import Path

import vilbert  # noqa: F401  (sets CPU threading defaults before paddle loads)
from vilbert.engine import evaluate
from vilbert.fileio import atomic_write
from vilbert.options import build_parser, parse_options
from vilbert.tasks import get_task
from vilbert.tokenization import BertTokenizer
from vilbert.training import (build_dataset, build_model, eval_loader, exit_on_user_error, is_main_process,
                              localize_paths, out_of_memory_hint, setup_device)


@exit_on_user_error()
def main(argv=None):
    parser = build_parser(__doc__, "eval")
    parser.add_argument("--split", default=None, help="a split name, or 'all' for the task's evaluation splits "
                        "(RefCOCO/RefCOCO+: val, testA, testB; RefCOCOg: val, test; VQA: minval); default: the "
                        "config's val_split")
    parser.add_argument("--draw", type=int, default=0, metavar="N", help="draw the first N expressions per split")
    options, args = parse_options(parser, argv, config_beside_checkpoint=True)
    if not options.from_pretrained:
        parser.error("--from_pretrained CKPT is required")
    task = get_task(options.task)
    setup_device(options)
    options = localize_paths(options)
    splits = task.eval_splits(options, args.split or options.val_split)
    tokenizer = BertTokenizer(options.bert_model)
    model = build_model(options, options.from_pretrained)
    checkpoint = Path(options.from_pretrained)
    rows, files, drawn = [], {}, []
    for split in splits:
        dataset = build_dataset(options, split, tokenizer)
        with out_of_memory_hint(f"lower --eval_batch_size (now {options.eval_batch_size})"):
            result = evaluate(model, eval_loader(dataset, options), task=task, amp=options.amp,
                              task_id=options.task_id, show_progress=is_main_process(), desc=split)
        if is_main_process():
            result.summary.update(task.official_metrics(result.predictions, dataset))
            stem = checkpoint.with_name(f"{checkpoint.stem}_{options.dataset}_{split}")
            split_files = task.result_files(result.predictions, dataset, stem, options)
            rows.append((split, result.summary, result.count, list(split_files)))
            files.update(split_files)
            if args.draw:  # after the files; only then are the datasets kept
                drawn.append((dataset, stem.with_name(f"{stem.name}_pictures")))
    if is_main_process():
        print("\n" + task.table(rows), flush=True)  # first: a full disk below loses no number
        for path, content in files.items():
            atomic_write(path, content)
        for dataset, folder in drawn:
            task.draw(model, dataset, tokenizer, options, args.draw, folder)


if __name__ == "__main__":
    main()
