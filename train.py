"""Fine-tune ViLBERT on a task: referring expressions (RefCOCO+, or RefCOCO, RefCOCOg: --dataset) or VQA 2.0
(--task vqa); the task's val metric every epoch.

The defaults are the task's recipe of the run behind the paper (config/refcoco+.yml: the 72.34 val;
config/vqa.yml); every option is also a flag, named as in the official scripts.

  # 1 GPU (or CPU), from the Conceptual Captions checkpoint of vilbert_beta:
  python train.py --from_pretrained checkpoints/bert_base_6_layer_6_connect_freeze_0/pytorch_model_8.bin
  # N GPUs: same global batch (256), split over the devices:
  python -m paddle.distributed.launch --devices 0,1,2,3 train.py --from_pretrained ...
  # several machines: one launcher per node, the same global batch (README.md, "Beyond one machine")
  python -m paddle.distributed.launch --nnodes 2 --master 10.0.0.1:8090 --rank 0 --devices 0,1,2,3,4,5,6,7 train.py ...
  # continue a stopped run where it left off:
  python train.py --resume auto
  # VQA 2.0 (train on trainval, score minval), the same launch forms:
  python train.py --task vqa --from_pretrained ...
  # the embedded demo: small model from scratch on generated data, on CPU (any of the three datasets, or VQA):
  python train.py --demo
  python train.py --demo --dataset refcocog
  python train.py --demo --task vqa
"""

from pathlib import Path

import vilbert  # noqa: F401  (sets CPU threading defaults before paddle loads)
from vilbert.fileio import file_lock
from vilbert.options import PROJECT_ROOT, build_parser, load_task_config, parse_options
from vilbert.tasks import get_task
from vilbert.training import exit_on_user_error, fit


def ensure_demo_data(options) -> None:
    """Generate the task's demo data at the demo config's own data root if it is not there yet (once per machine:
    the ranks of a launch wait for the first)."""
    task = get_task(options.task)
    marker = task.data_marker(options)
    if marker.exists():
        return
    demo_root = load_task_config(PROJECT_ROOT / "config" / task.configs[1])["dataroot"]
    if Path(options.dataroot) != Path(demo_root):
        raise FileNotFoundError(f"--dataroot {options.dataroot} has no {marker.relative_to(options.dataroot)}; point "
                                f"it at a data root of {options.dataset} (see `bash download_dataset.sh --check "
                                f"{task.download_args(options)} --dataroot {options.dataroot}`)")
    root = Path(options.dataroot)
    with file_lock(root.with_name(f".{root.name}.lock"), waiting=f"Waiting for the demo data in {root} ..."):
        if not marker.exists():
            print(f"Generating the {options.dataset} demo data in {options.dataroot} ...")
            task.make_demo_data(options)


@exit_on_user_error()
def main(argv=None):
    options, args = parse_options(build_parser(__doc__, "train"), argv)
    if args.demo and "://" not in options.dataroot:  # a bucket's demo data is fetched, not generated
        ensure_demo_data(options)
    fit(options)


if __name__ == "__main__":
    main()
