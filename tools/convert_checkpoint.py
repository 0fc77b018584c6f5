"""Convert an official ViLBERT checkpoint (or the earlier Paddle port's) into this project's `.pdparams`.

  python tools/convert_checkpoint.py \
      checkpoints/bert_base_6_layer_6_connect_freeze_0/pytorch_model_8.bin out/pytorch_model_8.pdparams

reads a torch `.bin`/`.tar` (legacy or zip format; torch is not needed) or a port `.pdparams`, converts it for
the model of `--config_file` with the task heads the checkpoint holds (`vision_logit` of referring expressions,
`vil_prediction` of VQA in its family's form and width, `vil_logit`; the pretraining and other heads dropped by
named rule), checks every key and shape strictly, and writes `out/pytorch_model_8-<sha256[:8]>.pdparams`.
Converting is optional: train.py and eval.py read the official files directly; a converted file loads faster
and can be checked against its name.
"""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from vilbert.checkpoint import CheckpointError, convert_checkpoint, heads_of, save_checkpoint, sha256_of  # noqa: E402
from vilbert.config import ViLBertConfig  # noqa: E402
from vilbert.model import TASK_HEADS, VILBertForVLTasks  # noqa: E402

import paddle  # noqa: E402  (after vilbert, which sets the CPU thread defaults first)


def main(argv=None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("src", help="official .bin/.tar or Paddle port .pdparams")
    parser.add_argument("dst", help="output .pdparams; the sha256 prefix is added to its name")
    parser.add_argument("--config_file", default="config/bert_base_6layer_6conect.json",
                        help="model config the checkpoint belongs to")
    args = parser.parse_args(argv)

    config = ViLBertConfig.from_json(args.config_file)

    def model_shapes(state: dict) -> dict:
        with paddle.LazyGuard():  # shapes only: no parameter is allocated
            model = VILBertForVLTasks(config, **heads_of(state, TASK_HEADS))
        return {name: tuple(p.shape) for name, p in model.state_dict().items()}

    converted, report = convert_checkpoint(args.src, model_shapes)
    out = save_checkpoint(converted, args.dst, hash_in_name=True)
    print(f"{args.src} -> {out}")
    print(report.summary())
    print(f"sha256 {sha256_of(out)}")
    return out


if __name__ == "__main__":
    try:
        main()
    except (CheckpointError, FileNotFoundError) as e:
        sys.exit(f"error: {e}")
