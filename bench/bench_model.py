"""One RefCOCO+ training step at the full config, ours (Paddle) against the official PyTorch model, on this CPU.

    python bench/bench_model.py [--beta_src DIR] [--threads 2] [--batch 8] [--rounds 3] [--warmup 1] [--steps 2]
                                [--no_avx512]

Both sides train ``config/bert_base_6layer_6conect.json`` from random init on the same batch (``--batch`` x 20
tokens x 100 regions, some padding), in train mode, with the REC loss on ``vision_logit`` and beta's optimizer
(ours: ``vilbert.optimization.BertAdam``; official: beta's ``BertAdam`` with one group per tensor, as its
``train_tasks.py`` builds them). The official side is jiasenlu/vilbert_beta's ``VILBertForVLTasks``, which also
runs its pretraining heads (MLM over the vocabulary, region classes) in every forward, as the official training
does. ``--beta_src`` is a checkout of jiasenlu/vilbert_beta (cloned if not given; see
tools/make_parity_reference.py).

Each side lives in its own process (so its peak RSS is its own), with the same MKL/OpenMP thread count, and the
sides take turns, ``--rounds`` times: ``--warmup`` untimed steps (which also absorb the other side's threads
winding down), then ``--steps`` timed ones, back to back as in training; a slow spell of the machine thus hits
both sides alike.
Prints per side the median over the timed steps of forward (incl. the loss), backward, optimizer step + gradient
reset, their sum, the CPU time of a step, samples/s and peak RSS; then ours/official (target: <= 0.8).
Only float32: Paddle 3.3.1's CPU build has no bfloat16 matmul kernel and its autocast does nothing on CPU.
The first line printed gives the CPU and its vector extensions. ``--no_avx512`` hides AVX-512 from NumPy (our
optimizer), PyTorch's kernels, MKL and oneDNN on both sides, to come near a host without it; Paddle's own
generated kernels (its fused ``adamw_`` among them, which this project no longer uses) still see it.
"""
import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from host import describe_cpu

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

CONFIG = REPO / "config/bert_base_6layer_6conect.json"
NUM_TOKENS, NUM_REGIONS = 20, 100
SIDES = ("official", "ours")
# What --no_avx512 sets: NumPy's names for its AVX-512 targets (1.x/2.3 and 2.4 spellings; unknown ones are
# ignored), then PyTorch's, MKL's and oneDNN's instruction-set caps.
NO_AVX512 = {"NPY_DISABLE_CPU_FEATURES": "X86_V4 AVX512F AVX512CD AVX512_SKX AVX512_CLX AVX512_CNL AVX512_ICL "
                                         "AVX512_SPR",
             "ATEN_CPU_CAPABILITY": "avx2", "MKL_ENABLE_INSTRUCTIONS": "AVX2", "ONEDNN_MAX_CPU_ISA": "AVX2"}


def make_batch(batch, seed=0):
    """Inputs in the official argument order plus a RefCOCO+ training target (IoU, 0 below 0.5 and on padding)."""
    from tools.make_parity_reference import make_inputs

    rng = np.random.default_rng(seed)
    text_lengths = [NUM_TOKENS] + rng.integers(4, NUM_TOKENS, batch - 1).tolist()
    region_counts = [NUM_REGIONS] + rng.integers(20, NUM_REGIONS, batch - 1).tolist()
    inputs = make_inputs(json.loads(CONFIG.read_text()), text_lengths, region_counts, NUM_TOKENS, NUM_REGIONS, seed)
    iou = rng.random((batch, NUM_REGIONS, 1)).astype(np.float32)
    target = np.where(iou >= 0.5, iou, 0.0) * inputs["image_attention_mask"][..., None]
    return inputs, target.astype(np.float32)


def serve(args):
    """Child process: set up one side, then run one timed step per "step" line on stdin and answer each with one
    JSON line (forward, backward, optimizer wall seconds and the step's CPU seconds, all threads); "quit" answers
    with the peak RSS. Answers go to the original stdout; anything the libraries print goes to stderr."""
    answers = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)
    step = bench_official(args) if args.side == "official" else bench_ours(args)
    print("ready", file=answers)
    for command in sys.stdin:
        if command.strip() == "quit":
            peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB
            print(json.dumps({"peak_rss_mb": peak_mb}), file=answers)
            return
        cpu = time.process_time()
        forward, backward, optimizer = step()
        print(json.dumps({"forward": forward, "backward": backward, "optimizer": optimizer,
                          "cpu": time.process_time() - cpu}), file=answers)


def timed_step(loss, update):
    """One training step -> (forward, backward, optimizer) wall seconds: ``loss()`` (read back, so that the forward
    has run), its backward, then ``update()`` (optimizer step and gradient reset). The same for both sides."""
    def step():
        start = time.perf_counter()
        value = loss()
        float(value)
        forward = time.perf_counter()
        value.backward()
        backward = time.perf_counter()
        update()
        return forward - start, backward - forward, time.perf_counter() - backward

    return step


def bench_official(args):
    import torch
    import torch.nn.functional as F

    from tools.make_parity_reference import INPUT_NAMES, VISION_LOGIT_POSITION, import_official

    torch.set_num_threads(args.threads)
    vilbert = import_official(args.beta_src, "beta")
    optimization = import_official(args.beta_src, "beta", "optimization")
    torch.manual_seed(0)
    model = vilbert.VILBertForVLTasks(vilbert.BertConfig.from_json_file(str(CONFIG)), num_labels=1).train()
    no_decay = ("bias", "LayerNorm.bias", "LayerNorm.weight")  # beta's inverted rule: these ARE decayed
    groups = [{"params": [param], "lr": 1e-4 if "vil_prediction" in name else 4e-5,
               "weight_decay": 0.01 if any(pattern in name for pattern in no_decay) else 0.0}
              for name, param in model.named_parameters()]
    optimizer = optimization.BertAdam(groups, lr=4e-5, warmup=0.1, t_total=1000, schedule="warmup_constant")
    inputs, target = make_batch(args.batch)
    tensors = [torch.from_numpy(inputs[name]) for name in INPUT_NAMES]
    target = torch.from_numpy(target)

    def loss():
        vision_logit = model(*tensors)[VISION_LOGIT_POSITION["beta"]]
        return F.binary_cross_entropy_with_logits(vision_logit, target) * target.size(1)

    def update():
        optimizer.step()
        model.zero_grad()

    return timed_step(loss, update)


def bench_ours(args):
    import paddle

    from tools.make_parity_reference import INPUT_NAMES
    from vilbert import ViLBertConfig, VILBertForVLTasks
    from vilbert.metrics import rec_loss
    from vilbert.optimization import BertAdam, build_param_groups

    paddle.set_device("cpu")
    paddle.seed(0)
    model = VILBertForVLTasks(ViLBertConfig.from_json(CONFIG))
    model.train()
    groups = build_param_groups(model.named_parameters(), base_lr=4e-5, head_lr=1e-4)
    optimizer = BertAdam(groups, t_total=1000, warmup=0.1)
    inputs, target = make_batch(args.batch)
    tensors = [paddle.to_tensor(inputs[name]) for name in INPUT_NAMES]
    target = paddle.to_tensor(target)

    def update():
        optimizer.step()
        optimizer.clear_grad()

    return timed_step(lambda: rec_loss(model(*tensors).vision_logit, target), update)


def start(side, args, beta_src):
    env = dict(os.environ, MKL_NUM_THREADS=str(args.threads), MKL_DEBUG_CPU_TYPE="5",
               **(NO_AVX512 if args.no_avx512 else {}))
    if side == "official":
        env["OMP_NUM_THREADS"] = str(args.threads)  # ours sets Paddle's OpenMP threads from MKL_NUM_THREADS
    command = [sys.executable, __file__, "--side", side, "--beta_src", str(beta_src), "--threads", str(args.threads),
               "--batch", str(args.batch)]
    return subprocess.Popen(command, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)


def ask(process, command):
    """Send one command to a side; its JSON answer."""
    process.stdin.write(command + "\n")
    process.stdin.flush()
    answer = process.stdout.readline()
    if not answer:
        raise RuntimeError(f"the benchmark process {process.args[3]} died (its error is above)")
    return json.loads(answer)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--beta_src", help="checkout of jiasenlu/vilbert_beta (cloned if not given)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=3, help="turns each side takes")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps at the start of each turn")
    parser.add_argument("--steps", type=int, default=2, help="timed steps per turn")
    parser.add_argument("--no_avx512", action="store_true", help="hide AVX-512 from NumPy, PyTorch, MKL, oneDNN")
    parser.add_argument("--side", choices=SIDES, help=argparse.SUPPRESS)  # set on the child processes
    args = parser.parse_args()
    if args.side:
        return serve(args)

    from tools.make_parity_reference import official_sources

    with official_sources(beta=args.beta_src) as src:
        processes = {side: start(side, args, src["beta"]) for side in SIDES}
        for side, process in processes.items():  # one at a time, so setting up never overlaps a timed step
            if process.stdout.readline().strip() != "ready":
                raise SystemExit(f"the {side} side failed to start (its error is above)")
        steps = {side: [] for side in SIDES}
        for _ in range(args.rounds):
            for side, process in processes.items():
                answers = [ask(process, "step") for _ in range(args.warmup + args.steps)]
                steps[side].extend(answers[args.warmup:])
        results = {}
        for side, process in processes.items():
            results[side] = {key: statistics.median(step[key] for step in steps[side]) for key in steps[side][0]}
            results[side]["step"] = sum(results[side][key] for key in ("forward", "backward", "optimizer"))
            results[side].update(ask(process, "quit"))
            process.wait()
    print(describe_cpu(args.no_avx512))
    print(f"one training step, batch {args.batch} x {NUM_TOKENS} tokens x {NUM_REGIONS} regions, {args.threads} "
          f"threads, median of {args.rounds} x {args.steps} timed steps, the sides taking turns; "
          f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs (above the thread count, other processes "
          "inflated the times)")
    header = ("side", "forward s", "backward s", "optimizer s", "step s", "step CPU s", "samples/s", "peak RSS MB")
    rows = [header] + [(side, *(f"{r[key]:.3f}" for key in ("forward", "backward", "optimizer", "step", "cpu")),
                        f"{args.batch / r['step']:.2f}", f"{r['peak_rss_mb']:.0f}") for side, r in results.items()]
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    for row in rows:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths)))
    ours, official = results["ours"], results["official"]
    print(f"ours / official: step time {ours['step'] / official['step']:.2f} (target <= 0.8), "
          f"step CPU time {ours['cpu'] / official['cpu']:.2f}")


if __name__ == "__main__":
    main()
