"""Outputs of the official PyTorch ViLBERT at a tiny config, for tests/test_parity.py (dev-only: needs torch).

    python tools/make_parity_reference.py [--beta_src DIR] [--mt_src DIR]

DIR is a checkout of jiasenlu/vilbert_beta (beta) or facebookresearch/vilbert-multi-task (mt, 12-in-1); only its
``vilbert/`` folder is read, so an export such as
``git --git-dir /work/.mirror/jiasenlu+vilbert_beta/repo archive HEAD vilbert | tar -x -C /tmp/beta`` will do.
A source not given is cloned from GitHub into a temp dir. The official model files are imported at run time under
their own package names (their package is called ``vilbert``, like ours), with stubs for the few modules their
``utils.py`` imports but the model never calls (``torch._six`` is gone in torch 2, tensorboardX ...).

The config (``config/vilbert_tiny_parity.json``, official keys only) gives text, vision and co-attention different
widths and head counts, so a swapped stream or a missed transpose fails on shape, and co-attention ids that leave
text layers before the first co-attention, vision layers between two, and tail layers in both streams. The weights
are the official random init with every 0-d and 1-D parameter (biases, LayerNorm weights and biases, beta's
weight-norm scales ``weight_g``) perturbed, because the init leaves those at 0, 1 or ||v||, where a dropped or
misplaced one would go unnoticed. beta's answer head has ``NUM_LABELS`` outputs; 12-in-1's has its hard-coded 3129
(the official class as it is). Inputs have padded text and padded regions; every model runs in eval mode.
Writes, under tests/data/:

- ``official_tiny.npz``: ``config_json``; ``weight/<official name>`` (beta state_dict, torch layout, float32);
  ``weight_12in1/<official name>`` (12-in-1's ``vil_prediction.logit_fc.*``); ``input/<name>`` (the 7 forward
  arguments); ``output/<name>``: ``vision_logit``, ``vil_logit``, ``vil_prediction_beta`` (beta's weight-normed
  head) and ``vil_prediction_12in1`` (12-in-1's ``logit_fc`` head) of the full models, the sequence and pooled
  outputs of beta's ``bert`` trunk; ``check/mt_vision_logit_max_abs_diff``, ``check/mt_vil_logit_max_abs_diff``.
- ``official_tiny_beta_legacy.bin``: beta ``VILBertForVLTasks`` state_dict in the legacy (torch < 1.6) pickle
  format, as the released checkpoints are (its bytes change from run to run: torch keys storages by address).
- ``official_tiny_mt_zip.bin``: the same weights in a 12-in-1 ``VILBertForVLTasks`` state_dict (its own extra
  heads random, perturbed likewise) in the zip format. Its ``vision_logit`` and ``vil_logit`` must equal beta's
  (model_spec.md: both trunks compute the same function); the differences are recorded in the npz.
"""
import argparse
import contextlib
import importlib
import importlib.util
import json
import math
import os
import subprocess
import sys
import tempfile
import types
import warnings
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
SOURCES = {"beta": "https://github.com/jiasenlu/vilbert_beta",
           "mt": "https://github.com/facebookresearch/vilbert-multi-task"}
INPUT_NAMES = ("input_txt", "input_imgs", "image_loc", "token_type_ids", "attention_mask", "image_attention_mask",
               "co_attention_mask")  # the official positional order
# index of each task head's output in the VILBertForVLTasks.forward tuple of each flavour
OUTPUT_POSITIONS = {"beta": {"vil_prediction": 0, "vil_logit": 1, "vision_logit": 4},
                    "mt": {"vil_prediction": 0, "vil_logit": 2, "vision_logit": 6}}
NUM_LABELS = 7  # beta's vil_prediction outputs (12-in-1 hard-codes 3129)
# What the official utils.py imports but the model never uses, stubbed only when it cannot be imported.
STUBS = {"torch._six": {"inf": math.inf}, "tensorboardX": {"SummaryWriter": object}, "boto3": {}, "requests": {},
         "botocore": {}, "botocore.exceptions": {"ClientError": Exception}}


@contextlib.contextmanager
def official_sources(**sources):
    """``official_sources(beta=DIR or None, mt=...)`` yields {flavour: dir}, cloning from GitHub those given None."""
    with tempfile.TemporaryDirectory() as tmp:
        dirs = {}
        for flavour, given in sources.items():
            if given:
                dirs[flavour] = Path(given)
            else:
                dirs[flavour] = Path(tmp) / flavour
                print(f"cloning {SOURCES[flavour]} ...", file=sys.stderr)
                subprocess.run(["git", "clone", "--quiet", "--depth", "1", SOURCES[flavour], str(dirs[flavour])],
                               check=True)
        yield dirs


def import_official(src, flavour, module="vilbert"):
    """Import ``<src>/vilbert/<module>.py`` as ``official_<flavour>.<module>``."""
    root = Path(src) / "vilbert"
    if not (root / f"{module}.py").is_file():
        raise FileNotFoundError(f"{root / module}.py not found: pass a checkout of {SOURCES[flavour]}")
    for name, attrs in STUBS.items():
        try:
            importlib.import_module(name)
        except ImportError:
            sys.modules[name] = types.ModuleType(name)
            vars(sys.modules[name]).update(attrs)
    # beta's task head uses torch.nn.utils.weight_norm, which torch 2 deprecates but still runs identically
    warnings.filterwarnings("ignore", message=r".*weight_norm.* is deprecated", category=FutureWarning)
    package = f"official_{flavour}"
    if package not in sys.modules:
        spec = importlib.util.spec_from_file_location(package, root / "__init__.py",
                                                      submodule_search_locations=[str(root)])
        sys.modules[package] = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(sys.modules[package])
    return importlib.import_module(f"{package}.{module}")


def build_official(vilbert, config_path, seed, num_labels=NUM_LABELS):
    """The official ``VILBertForVLTasks`` with its own init, 0-d and 1-D parameters perturbed, in eval mode."""
    torch.manual_seed(seed)
    model = vilbert.VILBertForVLTasks(vilbert.BertConfig.from_json_file(str(config_path)), num_labels=num_labels)
    generator = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for param in model.parameters():
            if param.dim() <= 1:
                param.add_(0.1 * torch.randn(param.shape, generator=generator))
    return model.eval()


def copy_shared_weights(source, target):
    """Load every entry of ``source`` into ``target`` (beta -> 12-in-1); only ``target``'s extra heads may stay."""
    state = source.state_dict()
    missing, unexpected = target.load_state_dict(
        {name: value for name, value in state.items() if name in target.state_dict()}, strict=False)
    left_out = [name for name in state if name not in target.state_dict()]
    trunk_missing = [name for name in missing if name.startswith(("bert.", "cls.", "vision_logit"))]
    if trunk_missing or unexpected or any(not name.startswith("vil_prediction.") for name in left_out):
        raise RuntimeError(f"trunk not transferred: missing {trunk_missing}, unexpected {unexpected}, "
                           f"left out {left_out}")


def make_inputs(config, text_lengths, region_counts, num_tokens, num_regions, seed):
    """One batch as the RefCOCO+ dataset builds it: [CLS] ... [SEP] then 0-padding at the end; region 0 is the
    whole image (mean feature, box [0,0,1,1,1]) followed by detections, then zero padding. Segment ids are mixed
    0/1 (RefCOCO+ uses 0 only) so the token-type table is exercised. ``co_attention_mask`` is random: the official
    model builds it and never applies it, so it must not change any output."""
    rng = np.random.default_rng(seed)
    batch = len(text_lengths)
    text_mask = (np.arange(num_tokens) < np.array(text_lengths)[:, None]).astype(np.int64)
    region_mask = (np.arange(num_regions) < np.array(region_counts)[:, None]).astype(np.int64)
    features = rng.standard_normal((batch, num_regions, config["v_feature_size"])).astype(np.float32)
    corners = np.sort(rng.random((batch, num_regions, 2, 2)), axis=2)  # [.., (x or y sorted), (x, y)]
    boxes = np.concatenate([corners[:, :, 0], corners[:, :, 1]], axis=-1)  # x1, y1, x2, y2 in [0, 1]
    area = (boxes[..., 2] - boxes[..., 0]) * (boxes[..., 3] - boxes[..., 1])
    locations = np.concatenate([boxes, area[..., None]], axis=-1).astype(np.float32)
    detections = region_mask[:, 1:, None]
    features[:, 0] = (features[:, 1:] * detections).sum(1) / np.maximum(detections.sum(1), 1)
    locations[:, 0] = [0, 0, 1, 1, 1]
    features *= region_mask[..., None]
    locations *= region_mask[..., None]
    return {"input_txt": rng.integers(1, config["vocab_size"], (batch, num_tokens)) * text_mask,
            "input_imgs": features,
            "image_loc": locations,
            "token_type_ids": rng.integers(0, config["type_vocab_size"], (batch, num_tokens)) * text_mask,
            "attention_mask": text_mask,
            "image_attention_mask": region_mask,
            "co_attention_mask": rng.integers(0, 2, (batch, num_regions, num_tokens)).astype(np.float32)}


@torch.no_grad()
def run_official(model, flavour, inputs):
    """The task heads of the full model; sequence and pooled outputs of its ``bert`` trunk (numpy, float32)."""
    args = [torch.from_numpy(inputs[name]) for name in INPUT_NAMES]
    sequence_t, sequence_v, pooled_t, pooled_v, _ = model.bert(*args, output_all_encoded_layers=False)
    heads = model(*args)
    outputs = {name: heads[position] for name, position in OUTPUT_POSITIONS[flavour].items()}
    outputs.update(pooled_output_t=pooled_t, pooled_output_v=pooled_v, sequence_output_t=sequence_t,
                   sequence_output_v=sequence_v)
    return {name: value.numpy().astype(np.float32) for name, value in outputs.items()}


def save_atomic(path, write):
    """Call ``write(temp_path)``, then move the temp file onto ``path``. The temp file has ``path``'s name (in a
    temp dir beside it) because torch's zip format names its records after the file, as in real checkpoints."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=path.parent, prefix=".tmp-") as tmp:
        write(Path(tmp) / path.name)
        os.replace(Path(tmp) / path.name, path)


def save_state_dict(model, path, legacy):
    """The plain state_dict pickle the official code writes; ``legacy`` is the pre-zip format of torch < 1.6."""
    save_atomic(path, lambda tmp: torch.save(model.state_dict(), tmp, _use_new_zipfile_serialization=not legacy))


def max_abs_diff(a, b):
    return float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))))


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--beta_src", help="checkout of jiasenlu/vilbert_beta (cloned if not given)")
    parser.add_argument("--mt_src", help="checkout of facebookresearch/vilbert-multi-task (cloned if not given)")
    parser.add_argument("--config", default=str(REPO / "config/vilbert_tiny_parity.json"))
    parser.add_argument("--out_dir", default=str(REPO / "tests/data"))
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    out = Path(args.out_dir)
    config_json = Path(args.config).read_text(encoding="utf-8")
    inputs = make_inputs(json.loads(config_json), text_lengths=[7, 5, 3], region_counts=[9, 6, 4], num_tokens=7,
                         num_regions=9, seed=args.seed)

    with official_sources(beta=args.beta_src, mt=args.mt_src) as src:
        beta = build_official(import_official(src["beta"], "beta"), args.config, args.seed)
        mt = build_official(import_official(src["mt"], "mt"), args.config, args.seed + 100)
    copy_shared_weights(beta, mt)
    outputs = run_official(beta, "beta", inputs)
    mt_outputs = run_official(mt, "mt", inputs)
    mt_diffs = {name: max_abs_diff(mt_outputs[name], outputs[name]) for name in ("vision_logit", "vil_logit")}
    if max(mt_diffs.values()) > 1e-6:
        raise RuntimeError(f"12-in-1 and beta disagree with the same weights: max |diff| {mt_diffs}")
    outputs["vil_prediction_beta"] = outputs.pop("vil_prediction")
    outputs["vil_prediction_12in1"] = mt_outputs["vil_prediction"]

    record = {"config_json": np.array(config_json),
              **{f"check/mt_{name}_max_abs_diff": np.array(diff, np.float32) for name, diff in mt_diffs.items()},
              **{f"weight/{name}": value.numpy().astype(np.float32) for name, value in beta.state_dict().items()},
              **{f"weight_12in1/{name}": value.numpy().astype(np.float32) for name, value in mt.state_dict().items()
                 if name.startswith("vil_prediction.")},
              **{f"input/{name}": value for name, value in inputs.items()},
              **{f"output/{name}": value for name, value in outputs.items()}}
    save_atomic(out / "official_tiny.npz", lambda tmp: np.savez_compressed(tmp, **record))
    save_state_dict(beta, out / "official_tiny_beta_legacy.bin", legacy=True)
    save_state_dict(mt, out / "official_tiny_mt_zip.bin", legacy=False)
    for name in ("official_tiny.npz", "official_tiny_beta_legacy.bin", "official_tiny_mt_zip.bin"):
        print(f"wrote {out / name} ({(out / name).stat().st_size:,} bytes)")
    print(f"beta: {len(beta.state_dict())} entries, 12-in-1: {len(mt.state_dict())} entries; 12-in-1 vs beta max "
          f"|diff|: vision_logit {mt_diffs['vision_logit']:.3g}, vil_logit {mt_diffs['vil_logit']:.3g}; "
          f"torch {torch.__version__}")


if __name__ == "__main__":
    main()
