"""Full-size parity: official PyTorch ViLBERT vs ours, through our converter (dev-only: needs torch).

    python tools/check_parity.py [--beta_src DIR] [--mt_src DIR] [--config config/bert_base_6layer_6conect.json]
                                 [--num_labels N]

The official beta and 12-in-1 ``VILBertForVLTasks`` are built from their own source (see
tools/make_parity_reference.py for ``--*_src``) at the released config, with the official random init and
perturbed biases, LayerNorms and weight-norm scales; 12-in-1 gets beta's weights except its own ``vil_prediction``.
beta's answer head has ``--num_labels`` outputs (default 3129, the VQA answer vocabulary, which 12-in-1 hard-codes).
Their state_dicts are saved like the released checkpoints (beta: legacy torch format, 12-in-1: zip), each file is
loaded by ``vilbert.checkpoint.load_pretrained`` into our Paddle model with every task head and that family's
classifier (``--classifier beta`` / ``12in1``), and both models run in float32 on one batch (2 expressions, 20
tokens, 100 regions, padded text and regions). Prints max |ours - official| per output and exits non-zero when a
task head differs by more than 1e-5 (``vision_logit`` on the real regions: padded ones sit at -10000 + logit, where
float32 steps by ~1e-3; there only that rounding is allowed). ``vil_prediction`` is also compared with the official
model run in float64, the exact function of its weights, and passes within 1e-5 of either: torch's float32 CPU norm
of beta's 1024 x 2048 ``weight_v`` is off by ~2.5e-5 relative (against its float64 norm), and that error, not
ours, reaches beta's answer scores at this size.
"""
import argparse
import copy
import json
import sys
import tempfile
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

try:
    import torch  # noqa: F401  (the official model runs in PyTorch; the project itself never imports it)
except ModuleNotFoundError:
    sys.exit("tools/check_parity.py is a dev-only tool that needs PyTorch (pip install torch==2.13.0, CPU build): it "
             "compares the official PyTorch ViLBERT with ours at the full config. The parity shipped without torch "
             "is tests/test_parity.py and selfcheck.py's parity check, against a stored reference of the official "
             "model.")

from tools.make_parity_reference import (build_official, copy_shared_weights, import_official,  # noqa: E402
                                         make_inputs, max_abs_diff, official_sources, run_official,
                                         save_state_dict)

TOLERANCE = 1e-5
PADDED_TOLERANCE = 2 * float(np.spacing(np.float32(1e4)))
OUTPUTS = ("vision_logit", "vil_prediction", "vil_logit", "pooled_output_t", "pooled_output_v", "sequence_output_t",
           "sequence_output_v")
MT_NUM_LABELS = 3129  # 12-in-1's vil_prediction, hard-coded in its VILBertForVLTasks


def official_checkpoints(sources, config_path, inputs, out_dir, seed, num_labels):
    """Saves the two official checkpoints into ``out_dir``; returns {label: (path, --classifier, num_labels,
    official outputs)}."""
    beta = build_official(import_official(sources["beta"], "beta"), config_path, seed, num_labels)
    mt = build_official(import_official(sources["mt"], "mt"), config_path, seed + 100)
    copy_shared_weights(beta, mt)
    outputs = {"beta": run_official(beta, "beta", inputs), "mt": run_official(mt, "mt", inputs)}
    for flavour, model in (("beta", beta), ("mt", mt)):
        outputs[flavour]["vil_prediction (float64)"] = float64_outputs(model, flavour, inputs)["vil_prediction"]
    for name in ("vision_logit", "vil_logit"):
        print(f"official 12-in-1 vs beta, same weights: {name} max |diff| = "
              f"{max_abs_diff(outputs['mt'][name], outputs['beta'][name]):.3g}")
    checkpoints = {"beta, legacy .bin": (Path(out_dir) / "beta_legacy.bin", "beta", num_labels, outputs["beta"]),
                   "12-in-1, zip .bin": (Path(out_dir) / "mt_zip.bin", "12in1", MT_NUM_LABELS, outputs["mt"])}
    save_state_dict(beta, checkpoints["beta, legacy .bin"][0], legacy=True)
    save_state_dict(mt, checkpoints["12-in-1, zip .bin"][0], legacy=False)
    return checkpoints


def float64_outputs(model, flavour, inputs):
    """The official model's outputs computed in float64 (returned as float32)."""
    exact = {name: value.astype(np.float64) if value.dtype == np.float32 else value for name, value in inputs.items()}
    return run_official(copy.deepcopy(model).double(), flavour, exact)


def run_ours(config_path, checkpoint, inputs, classifier, num_labels):
    import paddle

    from tools.make_parity_reference import INPUT_NAMES
    from vilbert import ViLBertConfig, VILBertForVLTasks
    from vilbert.checkpoint import load_pretrained
    from vilbert.model import TASK_HEADS

    model = VILBertForVLTasks(ViLBertConfig.from_json(config_path), heads=TASK_HEADS, num_labels=num_labels,
                              classifier=classifier)
    load_pretrained(model, checkpoint, log=lambda message: print("  " + message.replace("\n", "\n  ")))
    model.eval()
    with paddle.no_grad():
        output = model(*(paddle.to_tensor(inputs[name]) for name in INPUT_NAMES))
    return {name: getattr(output, name).numpy() for name in OUTPUTS}


def differences(ours, official, region_mask):
    real = region_mask.astype(bool)
    logit = np.abs(ours["vision_logit"].astype(np.float64) - official["vision_logit"])[..., 0]
    return {"vision_logit": logit[real].max(), "vision_logit (padded regions)": logit[~real].max(),
            **{name: max_abs_diff(ours[name], official[name]) for name in OUTPUTS[1:]},
            "vil_prediction (vs official in float64)": max_abs_diff(ours["vil_prediction"],
                                                                   official["vil_prediction (float64)"])}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--beta_src", help="checkout of jiasenlu/vilbert_beta (cloned if not given)")
    parser.add_argument("--mt_src", help="checkout of facebookresearch/vilbert-multi-task (cloned if not given)")
    parser.add_argument("--config", default=str(REPO / "config/bert_base_6layer_6conect.json"),
                        help="model JSON (default: the official 6-layer/6-connection one; if absent, beta's copy)")
    parser.add_argument("--num_labels", type=int, default=MT_NUM_LABELS, help="outputs of beta's vil_prediction")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    with official_sources(beta=args.beta_src, mt=args.mt_src) as sources, tempfile.TemporaryDirectory() as tmp:
        config_path = Path(args.config)
        if not config_path.is_file():
            config_path = Path(sources["beta"]) / "config" / config_path.name
        inputs = make_inputs(json.loads(config_path.read_text()), text_lengths=[20, 9], region_counts=[100, 37],
                             num_tokens=20, num_regions=100, seed=args.seed)
        checkpoints = official_checkpoints(sources, config_path, inputs, tmp, args.seed, args.num_labels)
        results = {}
        for label, (path, classifier, num_labels, official) in checkpoints.items():
            print(f"ours (--classifier {classifier}, --num_labels {num_labels}) <- {label}:")
            results[label] = differences(run_ours(config_path, path, inputs, classifier, num_labels), official,
                                         inputs["image_attention_mask"])

    print(f"\nmax |ours - official| at {config_path.name}, batch 2 x 20 tokens x 100 regions, float32")
    names = list(next(iter(results.values())))
    width = max(map(len, names))
    print("output".ljust(width), *(label.rjust(18) for label in results))
    for name in names:
        print(name.ljust(width), *(f"{diffs[name]:18.3g}" for diffs in results.values()))
    failed = [label for label, diffs in results.items()
              if max(diffs["vision_logit"], diffs["vil_logit"]) > TOLERANCE
              or min(diffs["vil_prediction"], diffs["vil_prediction (vs official in float64)"]) > TOLERANCE
              or diffs["vision_logit (padded regions)"] > PADDED_TOLERANCE]
    if failed:
        print(f"FAIL: a task head differs by more than {TOLERANCE:g} when loading {', '.join(failed)}")
        return 1
    print(f"OK: vision_logit, vil_prediction and vil_logit within {TOLERANCE:g} from both checkpoint formats")
    return 0


if __name__ == "__main__":
    sys.exit(main())
