"""On a CUDA build with a visible GPU: the numerics there match the CPU and the official code, both half precisions
train, batches assembled in page-locked memory reach the GPU unchanged, and 2 GPUs launch. Skipped elsewhere;
`python selfcheck.py` runs the same checks on the user's box."""

import numpy as np
import paddle
import pytest

from training_support import DEMO_TASK, make_tiny_root
from vilbert.options import RunOptions, load_task_config
from vilbert.selfcheck import (OPTIMIZER_TOLERANCE, PARITY_TOLERANCE, bertadam_replay_difference, launch_two_gpus,
                               loader_check, official_tiny_outputs, official_tiny_reference, tiny_training)

GPUS = paddle.device.cuda.device_count() if paddle.device.is_compiled_with_cuda() else 0
pytestmark = pytest.mark.skipif(GPUS == 0, reason="needs a CUDA build of Paddle and a visible GPU")


def test_vision_logit_is_the_same_on_gpu_and_cpu():
    reference = official_tiny_reference()
    gpu, cpu = official_tiny_outputs(reference, "gpu"), official_tiny_outputs(reference, "cpu")
    real = reference["input/image_attention_mask"].astype(bool)
    assert np.abs(gpu["vision_logit"] - cpu["vision_logit"])[..., 0][real].max() <= PARITY_TOLERANCE["gpu"]


def test_bertadam_on_gpu_matches_the_official_bertadam():
    assert bertadam_replay_difference("gpu") <= OPTIMIZER_TOLERANCE


@pytest.mark.parametrize("amp", ["bf16", "fp16"])
def test_a_half_precision_training_step_is_finite(amp):
    loss, weights = tiny_training("gpu", amp)
    assert np.isfinite(loss) and all(np.isfinite(w).all() for w in weights.values())


def test_loader_batches_reach_the_gpu_unchanged(tmp_path):
    options = RunOptions(**{**load_task_config(DEMO_TASK), "dataroot": str(make_tiny_root(tmp_path))})
    assert loader_check(options, "gpu", timed=2)[0] == []


@pytest.mark.skipif(GPUS < 2, reason="needs 2 visible GPUs")
def test_two_gpu_processes_train_the_demo():
    status, detail = launch_two_gpus()
    assert status == "PASS" and "Epoch 0 done!" in detail
