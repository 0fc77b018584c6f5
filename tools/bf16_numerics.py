"""Does the recipe survive bfloat16? Trains the demo twice on CPU and prints both validation accuracies.

    python tools/bf16_numerics.py [--output_dir /tmp/bf16_numerics] [any train.py flag, e.g. --num_train_epochs 4]

The first run is float32. The second is ``--amp bf16``, where every matmul inside autocast (all Linear layers and both attention
products, in the forward and in the backward) takes its inputs rounded to bfloat16 and has its output rounded
to bfloat16, as AMP O1 computes them on a GPU (bf16 operands, float32 accumulation); embeddings, LayerNorm,
softmax, the loss, the optimizer and the ``vision_logit`` head (which the model runs outside autocast) stay
float32, as there.

Why emulate: Paddle 3.3.1's CPU build registers no bfloat16 kernel for matmul (nor add, layer_norm, softmax)
and ``paddle.amp.auto_cast`` does nothing on CPU, so ``train.py --amp bf16`` cannot run here. This measures
what bf16 rounding does to the result, not Paddle's AMP machinery, which only a GPU exercises.
"""
import argparse
import builtins
import contextlib
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import vilbert  # noqa: E402,F401  (CPU threading defaults and Paddle's import-time warning filters, before paddle)
import paddle  # noqa: E402

import train  # noqa: E402


def to_bf16(value):
    """A float32 tensor rounded to the nearest bfloat16 (ties to even), kept in float32; anything else as is."""
    if isinstance(value, paddle.Tensor) and value.dtype == paddle.float32:
        return value.astype("bfloat16").astype("float32")
    return value


@contextlib.contextmanager
def bf16_matmuls():
    """Route ``paddle.matmul`` and ``paddle.addmm`` (what vilbert/model.py multiplies with) through bf16 inside
    ``paddle.amp.auto_cast(enable=True)`` (``--amp bf16`` turns it on around each forward) and not inside
    ``auto_cast(enable=False)`` or outside any, as on a GPU."""
    originals = {name: getattr(paddle, name) for name in ("matmul", "addmm")}
    real_auto_cast = paddle.amp.auto_cast
    enabled = [False]  # a stack of autocast states, innermost last

    def rounded(op):
        def call(*args, **kwargs):
            if not enabled[-1]:
                return op(*args, **kwargs)
            args = [to_bf16(arg) for arg in args]
            kwargs = {key: to_bf16(value) for key, value in kwargs.items()}
            return to_bf16(op(*args, **kwargs))
        return call

    @contextlib.contextmanager
    def auto_cast(enable=True, *args, **kwargs):
        enabled.append(enable)
        try:
            with real_auto_cast(enable, *args, **kwargs):
                yield
        finally:
            enabled.pop()

    for name, op in originals.items():
        setattr(paddle, name, rounded(op))
    paddle.amp.auto_cast = auto_cast
    try:
        yield
    finally:
        for name, op in originals.items():
            setattr(paddle, name, op)
        paddle.amp.auto_cast = real_auto_cast


GAP_TOLERANCE = 1.0  # points of val accuracy bf16 may lose against float32


@contextlib.contextmanager
def without_cpu_amp_note():
    """Leaves out train.py's "Note: --amp bf16 has no effect on CPU": true of Paddle's autocast, but here
    ``bf16_matmuls`` does the bf16 rounding, so on this tool's bf16 run the note would say the opposite of what
    happens."""
    real_print = builtins.print

    def print_(*args, **kwargs):
        if not (args and str(args[0]).startswith("Note: --amp bf16 has no effect on CPU")):
            real_print(*args, **kwargs)

    builtins.print = print_
    try:
        yield
    finally:
        builtins.print = real_print


def best_val_accuracy(run_dir: Path) -> tuple:
    epochs = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    best = max(epochs, key=lambda epoch: epoch["val_accuracy"])
    return best["val_accuracy"], best["epoch"]


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output_dir", default="/tmp/bf16_numerics")
    args, train_flags = parser.parse_known_args()
    results = {}
    for label, amp, numerics in (("float32", "off", contextlib.nullcontext), ("bf16 matmuls", "bf16", bf16_matmuls)):
        run_dir = Path(args.output_dir) / label.replace(" ", "_")
        with numerics(), without_cpu_amp_note():
            train.main(["--demo", "--device", "cpu", "--amp", amp, "--output_dir", str(run_dir.parent),
                        "--save_name", run_dir.name, *train_flags])
        results[label] = best_val_accuracy(run_dir)
    print("\nnumerics        best val accuracy  at epoch")
    for label, (accuracy, epoch) in results.items():
        print(f"{label:14s}  {accuracy:17.4f}  {epoch:8d}")
    gap = 100 * (results["float32"][0] - results["bf16 matmuls"][0])
    verdict = "within" if gap <= GAP_TOLERANCE else "BEYOND"
    print(f"float32 - bf16: {gap:+.2f} points, {verdict} the {GAP_TOLERANCE:g} point bf16 may lose against float32")


if __name__ == "__main__":
    main()
