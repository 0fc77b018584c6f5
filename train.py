"""Fine-tune ViLBERT on RefCOCO+ (or RefCOCO, RefCOCOg: --dataset) referring expressions; val accuracy every epoch.

The defaults (config/refcoco+.yml) are the recipe of the run behind the paper's 72.34 val; every option is
also a flag, named as in the official scripts.

  # 1 GPU (or CPU), from the Conceptual Captions checkpoint of vilbert_beta:
  python train.py --from_pretrained checkpoints/bert_base_6_layer_6_connect_freeze_0/pytorch_model_8.bin
  # N GPUs: same global batch (256), split over the devices:
  python -m paddle.distributed.launch --devices 0,1,2,3 train.py --from_pretrained ...
  # continue a stopped run where it left off:
  python train.py --resume auto
  # the embedded demo: small model from scratch on generated data, on CPU (any of the three datasets):
  python train.py --demo
  python train.py --demo --dataset refcocog
"""

from pathlib import Path

import vilbert  # noqa: F401  (sets CPU threading defaults before paddle loads)
from vilbert.options import build_parser, load_task_config, parse_options, DEMO_TASK_CONFIG
from vilbert.training import exit_on_user_error, fit


def ensure_demo_data(options) -> None:
    """Generate the demo data of the dataset at the demo config's own data root if it is not there yet."""
    refs = Path(options.dataroot, options.dataset, f"refs({options.splitBy}).p")
    if refs.exists():
        return
    if Path(options.dataroot) != Path(load_task_config(DEMO_TASK_CONFIG)["dataroot"]):
        raise FileNotFoundError(f"--dataroot {options.dataroot} has no {options.dataset}/{refs.name}; point it at a "
                                f"data root of {options.dataset} (see `bash download_dataset.sh --check --dataset "
                                f"{options.dataset} --dataroot {options.dataroot}`)")
    from vilbert.demo_data import make_demo_dataset

    print(f"Generating the {options.dataset} demo data in {options.dataroot} ...")
    make_demo_dataset(options.dataroot, dataset=options.dataset)


@exit_on_user_error()
def main(argv=None):
    options, args = parse_options(build_parser(__doc__), argv)
    if args.demo:
        ensure_demo_data(options)
    fit(options)


if __name__ == "__main__":
    main()
