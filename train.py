"""Fine-tune ViLBERT on RefCOCO+ referring expressions and report val accuracy every epoch.

The defaults (config/refcoco+.yml) are the recipe of the run behind the paper's 72.34 val; every option is
also a flag, named as in the official scripts.

  # 1 GPU (or CPU), from the Conceptual Captions checkpoint of vilbert_beta:
  python train.py --from_pretrained checkpoints/bert_base_6_layer_6_connect_freeze_0/pytorch_model_8.bin
  # N GPUs: same global batch (256), split over the devices:
  python -m paddle.distributed.launch --devices 0,1,2,3 train.py --from_pretrained ...
  # continue a stopped run where it left off:
  python train.py --resume auto
  # the embedded demo: small model from scratch on generated data, on CPU:
  python train.py --demo
"""

from pathlib import Path

import vilbert  # noqa: F401  (sets CPU threading defaults before paddle loads)
from vilbert.options import build_parser, load_task_config, parse_options, DEMO_TASK_CONFIG
from vilbert.training import exit_on_user_error, fit


def ensure_demo_data(dataroot: str) -> None:
    """Generate the demo data at the demo config's own data root if it is not there yet."""
    if Path(dataroot, "refcoco+", "refs(unc).p").exists():
        return
    if Path(dataroot) != Path(load_task_config(DEMO_TASK_CONFIG)["dataroot"]):
        raise FileNotFoundError(f"--dataroot {dataroot} has no refcoco+/refs(unc).p; point it at a RefCOCO+ "
                                "data root (see `bash download_dataset.sh --check`)")
    from vilbert.demo_data import make_demo_dataset

    print(f"Generating the demo data in {dataroot} ...")
    make_demo_dataset(dataroot)


@exit_on_user_error()
def main(argv=None):
    options, args = parse_options(build_parser(__doc__), argv)
    if args.demo:
        ensure_demo_data(options.dataroot)
    fit(options)


if __name__ == "__main__":
    main()
