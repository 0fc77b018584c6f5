"""Is this machine ready for the long run? Checks Paddle, the GPU numerics, a real training step, the data and the
checkpoint in about a minute, and ends with a PASS/FAIL table (exit status 1 on any FAIL).

  python selfcheck.py                                    # with the options train.py would use (config/refcoco+.yml)
  python selfcheck.py --from_pretrained CKPT --batch_size 256 --gradient_accumulation_steps 2 --amp bf16
  python selfcheck.py --demo --quick                     # the demo data, the demo model's step (what CI runs)
"""

import vilbert  # noqa: F401  (sets CPU threading defaults before paddle loads)
from vilbert.options import build_parser, parse_options
from vilbert.selfcheck import SelfCheck
from vilbert.training import exit_on_user_error


@exit_on_user_error()
def main(argv=None):
    parser = build_parser(__doc__)
    parser.add_argument("--quick", action="store_true", help="the demo model's step instead of the real config's")
    parser.add_argument("--gpus", type=int, default=0, help="GPUs the run will use (default: all visible)")
    options, args = parse_options(parser, argv)
    if args.demo:
        from train import ensure_demo_data

        ensure_demo_data(options)
    raise SystemExit(SelfCheck(options, quick=args.quick, gpus=args.gpus).run())


if __name__ == "__main__":
    main()
