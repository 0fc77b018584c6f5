"""Record the official training loop on real batches, for tests/test_trajectory.py (dev-only: needs torch).

    python tools/make_trajectory_reference.py [--beta_src DIR]

DIR is a checkout of jiasenlu/vilbert_beta (see tools/make_parity_reference.py; cloned if not given). The official
``VILBertForVLTasks`` (config/vilbert_tiny_parity.json with the BERT vocabulary, 2048-d region features and every
dropout 0, the task head's included: the two frameworks' random generators cannot be matched) trains on the
generated RefCOCO+ data of ``vilbert/demo_data.py``, as beta's ``train_tasks.py`` trains: its ``BertAdam`` with one
group per tensor, its per-epoch ``LambdaLR``, the REC loss ``BCEWithLogitsLoss(mean) * regions``, and with
gradient accumulation the loss divided by the number of micro-batches and a step after every that many.

The batches are ours: our dataset and sampler (``vilbert.training``, the options of ``run_options``) make them,
and the official model gets each of them padded as the official loader pads, to ``max_seq_length`` tokens and
``max_region_num`` regions with zeros (image mask 0); ours trims a batch to its longest expression and its most
regions. The content is the same; padding adds exactly 0 to the loss and its gradient.

Writes ``tests/data/trajectory_reference.npz``: ``config_json``; ``shapes_json`` (official state_dict names and
shapes, in order); for each accumulation ``k`` in ``ACCUMULATIONS``
``k{k}/loss`` [epochs, micro-batches] (each micro-batch's loss before the division by k), ``k{k}/lr`` (the lr of
every optimizer step) and the final weights (official names, float32). Each final tensor is stored as the rows
(first axis) that differ from the initial weights, ``k{k}/rows/<name>`` and ``k{k}/final/<name>``: the word
embeddings stay at their init except in the ~40 rows the data uses. The initial weights are not stored:
``initial_weights`` makes them from a seed (N(0, 0.02) matrices, LayerNorm weights near 1, small random biases).
"""
import argparse
import json
import sys
import tempfile
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from vilbert.options import RunOptions, load_task_config  # noqa: E402

OUT = REPO / "tests/data/trajectory_reference.npz"
ACCUMULATIONS = (1, 2)
SEED = 0
# 60 train expressions in global batches of 12: 5 steps per epoch (10 micro-batches of 6 with accumulation 2);
# 4 epochs, warm-up over the first 4 of the 20 steps, the lr cut at epochs 2 and 3.
RECIPE = dict(batch_size=12, num_train_epochs=4, learning_rate=1e-3, head_learning_rate=1e-3, warmup_proportion=0.2,
              lr_milestones=[2, 3], lr_gamma=0.1, weight_decay=0.01, max_grad_norm=1.0, feature_cache=False,
              num_workers=0)


def make_data_root(folder) -> Path:
    """The generated RefCOCO+ root both sides train on: 60 train expressions."""
    from vilbert.demo_data import make_demo_dataset

    return make_demo_dataset(folder, seed=0, num_train_images=8, num_val_images=4, num_test_images=1)


def run_options(root, accumulation: int) -> RunOptions:
    """The demo recipe (config/demo.yml) with ``RECIPE`` on ``root``."""
    values = {**load_task_config(REPO / "config/demo.yml"), **RECIPE, "dataroot": str(root),
              "gradient_accumulation_steps": accumulation}
    return RunOptions(**values)


def model_config() -> dict:
    """config/vilbert_tiny_parity.json (its three widths differ) for the demo data, without dropout."""
    config = json.loads((REPO / "config/vilbert_tiny_parity.json").read_text())
    config.update(vocab_size=30522, v_feature_size=2048)
    config.update({key: 0.0 for key in config if key.endswith("dropout_prob")})
    return config


def initial_weights(shapes, seed: int = SEED) -> dict:
    """Official name -> float32 initial value for ``shapes`` ((name, shape) pairs in state_dict order), from
    ``seed`` alone, so the reference need not store them."""
    rng = np.random.default_rng(seed)
    weights = {}
    for name, shape in shapes:
        if len(shape) > 1:
            value = 0.02 * rng.standard_normal(shape)
        elif "LayerNorm" in name and name.endswith("weight"):
            value = 1 + 0.1 * rng.standard_normal(shape)
        else:
            value = 0.1 * rng.standard_normal(shape)
        weights[name] = np.asarray(value, np.float32)
    return weights


def as_rows(value):
    """``value`` viewed along its first axis (a 0-d value as one row)."""
    return value.reshape((-1,) + value.shape[1:])


def epoch_batches(loader, epoch):
    """The loader's micro-batches of ``epoch`` as numpy arrays."""
    loader.batch_sampler.set_epoch(epoch)
    return [{key: value.numpy() for key, value in batch.items()} for batch in loader]


def pad_as_official(batch, options):
    """Our trimmed batch padded with zeros to ``max_seq_length`` tokens and ``max_region_num`` regions."""
    sizes = {"input_ids": options.max_seq_length, "input_mask": options.max_seq_length,
             "segment_ids": options.max_seq_length, "features": options.max_region_num,
             "spatials": options.max_region_num, "image_mask": options.max_region_num,
             "target": options.max_region_num}
    padded = {}
    for key, size in sizes.items():
        value = batch[key]
        padded[key] = np.pad(value, [(0, 0), (0, size - value.shape[1])] + [(0, 0)] * (value.ndim - 2))
    padded["co_attention_mask"] = np.zeros((len(batch["input_ids"]), options.max_region_num, options.max_seq_length),
                                           np.float32)
    return padded


def train_official(beta, optimization, root, accumulation, config_path):
    """beta's train_tasks.py loop for one task -> (losses [epochs, micro-batches], lr per step, final state)."""
    import torch

    from vilbert.tokenization import BertTokenizer
    from vilbert.training import build_dataset, train_loader

    options = run_options(root, accumulation)
    loader = train_loader(build_dataset(options, options.train_split, BertTokenizer(options.bert_model)), options)
    model = beta.VILBertForVLTasks(beta.BertConfig.from_json_file(str(config_path)), num_labels=1, dropout_prob=0.0)
    state = model.state_dict()
    shapes = [(name, list(value.shape)) for name, value in state.items()]
    init = initial_weights(shapes)
    for name, value in state.items():  # a tied tensor (the MLM decoder is the word embeddings) takes its first value
        init[name] = init[next(first for first, other in state.items() if other.data_ptr() == value.data_ptr())]
    model.load_state_dict({name: torch.from_numpy(value) for name, value in init.items()})
    no_decay = ["bias", "LayerNorm.bias", "LayerNorm.weight"]
    groups = [{"params": [value], "lr": options.head_learning_rate if "vil_prediction" in key else options.learning_rate,
               "weight_decay": 0.01 if any(nd in key for nd in no_decay) else 0.0}
              for key, value in dict(model.named_parameters()).items() if value.requires_grad]
    num_iter = len(loader)
    t_total = num_iter * options.num_train_epochs // accumulation
    optimizer = optimization.BertAdam(groups, lr=options.learning_rate, warmup=options.warmup_proportion,
                                      t_total=t_total, schedule="warmup_constant")
    milestones = np.array(options.lr_milestones)
    lr_scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lr_lambda=lambda epoch: pow(options.lr_gamma, np.sum(milestones <= epoch)))
    bce = torch.nn.BCEWithLogitsLoss(reduction="mean")
    losses, rates = [], []
    for epoch in range(options.num_train_epochs):
        model.train()
        losses.append([])
        for step, batch in enumerate(epoch_batches(loader, epoch)):
            padded = {key: torch.from_numpy(value) for key, value in pad_as_official(batch, options).items()}
            outputs = model(padded["input_ids"], padded["features"], padded["spatials"], padded["segment_ids"],
                            padded["input_mask"], padded["image_mask"], padded["co_attention_mask"])
            vision_logit, target = outputs[4], padded["target"]
            loss = bce(vision_logit, target).mean() * target.size(1)
            losses[-1].append(float(loss))
            if accumulation > 1:
                loss = loss / accumulation
            loss.backward()
            if (step + 1) % accumulation == 0:
                optimizer.step()
                model.zero_grad()
                rates.append(optimizer.show_lr())
        lr_scheduler.step()
    final = {name: value.detach().numpy().astype(np.float32) for name, value in model.state_dict().items()}
    return np.array(losses, np.float64), np.array(rates), final, init, shapes


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--beta_src", help="checkout of jiasenlu/vilbert_beta (cloned if not given)")
    parser.add_argument("--out", default=str(OUT))
    args = parser.parse_args()

    import torch

    from tools.make_parity_reference import import_official, official_sources, save_atomic

    torch.set_num_threads(1)
    record = {"config_json": np.array(json.dumps(model_config()))}
    with official_sources(beta=args.beta_src) as src, tempfile.TemporaryDirectory() as tmp:
        beta = import_official(src["beta"], "beta")
        optimization = import_official(src["beta"], "beta", "optimization")
        config_path = Path(tmp) / "config.json"
        config_path.write_text(json.dumps(model_config()))
        root = make_data_root(Path(tmp) / "data")
        for k in ACCUMULATIONS:
            losses, rates, final, init, shapes = train_official(beta, optimization, root, k, config_path)
            record["shapes_json"] = np.array(json.dumps(shapes))
            record[f"k{k}/loss"], record[f"k{k}/lr"] = losses, rates
            for name, value in final.items():
                changed = as_rows(value) != as_rows(init[name])
                rows = np.flatnonzero(changed.reshape(len(changed), -1).any(1))
                record[f"k{k}/rows/{name}"], record[f"k{k}/final/{name}"] = rows, as_rows(value)[rows]
            print(f"accumulation {k}: {losses.size} micro-batches, loss {losses[0, 0]:.5f} -> {losses[-1, -1]:.5f}; "
                  f"{sum(len(record[f'k{k}/rows/{n}']) for n in final)} changed rows")
    save_atomic(Path(args.out), lambda tmp: np.savez_compressed(tmp, **record))
    print(f"wrote {args.out} ({Path(args.out).stat().st_size:,} bytes); torch {torch.__version__}")


if __name__ == "__main__":
    main()
