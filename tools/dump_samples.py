"""Dump what the model is fed: a split's samples at the official fixed sizes, for any task, as one .npz.

    python tools/dump_samples.py --task_config config/refcoco+.yml --dataroot data/referExpression --split val \\
        --out refcoco+_val.npz --indices 0,5,9
    python tools/dump_samples.py --task_config config/demo_vqa.yml --split minval --out vqa_minval.npz

Written with np.savez (no pickled objects; `np.load(F)` reads it without allow_pickle):
- `entry_id` [E]: the official id of every entry in dataset order (sent_id for referring expressions,
  question_id for VQA); `all_input_ids` [E, L]: every entry's token ids;
- `index` [K]: the dumped samples (--indices, default the first 8), and for them, at the official sizes
  (R = max_region_num, L = max_seq_length, zero padding, as the official `__getitem__` returns them):
  `features` [K, R, 2048] float32, `spatials` [K, R, 5], `image_mask` [K, R] int64, `input_ids`,
  `input_mask`, `segment_ids` [K, L] int64, and `target` (referring expressions [K, R, 1] IoU; VQA
  [K, num_labels] soft scores).
The features are read from the LMDB itself, not from the float16 cache training reads, so they are the
official float32 values. Any other option of the task config can be given as a flag (--max_region_num ...).
"""

import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import vilbert  # noqa: E402,F401  (sets CPU threading defaults before paddle loads)
from vilbert.fileio import atomic_path  # noqa: E402
from vilbert.options import build_parser, parse_options  # noqa: E402
from vilbert.tokenization import BertTokenizer  # noqa: E402
from vilbert.training import build_dataset, exit_on_user_error, localize_paths  # noqa: E402

TOKEN_KEYS = ("input_ids", "input_mask", "segment_ids")
DUMPED = ("features", "spatials", "image_mask", *TOKEN_KEYS, "target")


def padded(array: np.ndarray, size: int) -> np.ndarray:
    """`array` zero-padded along axis 1 to `size`."""
    widths = [(0, 0)] * array.ndim
    widths[1] = (0, size - array.shape[1])
    return np.pad(array, widths)


def dump(dataset, indices, max_region_num: int, max_seq_length: int) -> dict:
    batch = dataset.batch(indices)
    out = {"entry_id": np.asarray(dataset.entry_ids), "all_input_ids": np.asarray(dataset.token_ids),
           "index": np.asarray(indices, np.int64)}
    for key in DUMPED:
        if key in dataset.region_keys:
            out[key] = padded(batch[key], max_region_num)
        elif key in TOKEN_KEYS:
            out[key] = padded(batch[key], max_seq_length)
        else:
            out[key] = batch[key]
    out["features"] = out["features"].astype(np.float32)
    return out


def parse_indices(text: str, parser, count: int) -> list:
    try:
        indices = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        parser.error(f"--indices {text!r}: give sample indices separated by commas, e.g. 0,5,9")
    bad = [i for i in indices if not 0 <= i < count]
    if bad or not indices:
        parser.error(f"--indices {text!r}: the split has samples 0 to {count - 1}")
    return indices


@exit_on_user_error()
def main(argv=None) -> None:
    parser = build_parser(__doc__)
    parser.add_argument("--split", required=True, help="the split to dump (e.g. val; VQA: minval, trainval, test)")
    parser.add_argument("--out", required=True, help="the .npz to write")
    parser.add_argument("--indices", default=None, help="comma-separated sample indices (default: the first 8)")
    options, args = parse_options(parser, argv)
    options = localize_paths(options)
    options.feature_cache = False  # the LMDB's float32 values, not the float16 cache's
    dataset = build_dataset(options, args.split, BertTokenizer(options.bert_model))
    indices = (parse_indices(args.indices, parser, len(dataset)) if args.indices
               else list(range(min(8, len(dataset)))))
    arrays = dump(dataset, indices, options.max_region_num, options.max_seq_length)
    with atomic_path(args.out) as tmp, open(tmp, "wb") as f:
        np.savez(f, **arrays)
    print(f"wrote {args.out}: {len(arrays['entry_id'])} entries, {len(indices)} samples; "
          + ", ".join(f"{key} {list(value.shape)}" for key, value in arrays.items()))


if __name__ == "__main__":
    main()
