"""Data parallel training over 2 processes (`paddle.distributed.launch`, CPU and gloo) trains what 1 process
trains at the same global batch, and so does gradient accumulation; only rank 0 writes and logs.

On CPU, `--nproc_per_node 2` starts the 2 data-parallel processes (`--devices` selects GPUs only). Dropout
differs per rank by design, so these runs have none (`training_support.LAUNCHER`).
"""

import json
import shutil

import paddle
import pytest

import eval as eval_script
import train
from test_vqa_task import vqa_flags
from training_support import (CPU_LAUNCH_ONLY, PROJECT, agreeing_runs, assert_same_run, finished, launch,
                              max_weight_difference, read_metrics, read_weights, train_here, write_launcher)
from vilbert.config import ViLBertConfig
from vilbert.model import VILBertForVLTasks

pytestmark = CPU_LAUNCH_ONLY


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """(flags of a named run, the output folder, the model config): 1 epoch of 60 expressions, batches of 8."""
    folder = tmp_path_factory.mktemp("distributed")
    flags, model = agreeing_runs(folder, num_train_epochs=1)
    return flags, folder, model


@pytest.fixture(scope="module")
def one_process(setup):
    flags, folder, _ = setup
    train_here(flags("one"))
    return folder / "one" / "run"


@pytest.fixture(scope="module")
def two_processes(setup):
    """The same run launched as 2 processes: (run directory, launch log directory)."""
    flags, folder, _ = setup
    logs = folder / "launch_logs"
    finished(launch(write_launcher(folder), flags("two"), logs, nproc_per_node=2), logs)
    return folder / "two" / "run", logs


def test_two_processes_train_what_one_process_trains(one_process, two_processes):
    assert_same_run(two_processes[0], one_process)  # val over the samples of both ranks, train numbers summed


def test_the_compared_runs_did_train(setup, one_process):
    paddle.seed(0)  # fit's initialisation (seed 0)
    initial = VILBertForVLTasks(ViLBertConfig.from_json(setup[2])).state_dict()
    initial = {name: value.numpy().astype("float64") for name, value in initial.items()}
    assert max_weight_difference(initial, read_weights(one_process / "last.pdparams")) > 1e-3


def test_only_rank_0_writes_and_logs(two_processes):
    run_dir, logs = two_processes
    assert sorted(p.name for p in run_dir.parent.iterdir()) == ["run"]
    assert sorted(p.name for p in run_dir.iterdir()) == [
        ".run.lock", "best.pdparams", "config.yaml", "curves.png", "last.pdparams", "metrics.jsonl"]
    assert len(read_metrics(run_dir)) == 1
    rank0, rank1 = (logs / "workerlog.0").read_text(), (logs / "workerlog.1").read_text()
    assert "Device: cpu x 2; 60 train / 23 val expressions; batch 8 = 2 device(s) x 1 step(s) x 4; " \
           "8 steps/epoch" in rank0
    assert "Epoch 0 done! Train loss:" in rank0 and "Best val accuracy" in rank0
    for line in ("Device:", "Epoch 0 done!", "group  tensors", "Training from random"):
        assert line not in rank1


@pytest.mark.parametrize("steps", [2, 4])
def test_gradient_accumulation_trains_what_one_big_batch_trains(setup, one_process, steps, capsys):
    flags, folder, _ = setup
    train_here(flags(f"accumulate{steps}", gradient_accumulation_steps=steps))
    assert f"batch 8 = 1 device(s) x {steps} step(s) x {8 // steps}; 8 steps/epoch" in capsys.readouterr().out
    assert_same_run(folder / f"accumulate{steps}" / "run", one_process)


@pytest.fixture(scope="module")
def vqa_run(vqa_root, tmp_path_factory):
    """A 1-epoch VQA run of the tiny model: its run directory."""
    out = tmp_path_factory.mktemp("vqa_distributed")
    train.main(vqa_flags(vqa_root, out, num_train_epochs=1))
    return out / "run"


def assert_close(actual, expected):
    """Equal JSON values, floats to 1e-5: batches of other samples pad and sum in another order."""
    if isinstance(expected, float):
        assert actual == pytest.approx(expected, rel=1e-5, abs=1e-6)
    elif isinstance(expected, (list, dict)):
        assert type(actual) is type(expected) and len(actual) == len(expected)
        for key in (expected if isinstance(expected, dict) else range(len(expected))):
            assert_close(actual[key], expected[key])
    else:
        assert actual == expected


@pytest.mark.parametrize("task", ["refer", "vqa"])
def test_evaluation_over_2_ranks_equals_1_process(task, request, tmp_path, capsys):
    """eval.py under the launcher: each rank scores every other sample, rank 0 gathers and writes the same files
    and the same table as one process does."""
    run = request.getfixturevalue({"refer": "one_process", "vqa": "vqa_run"}[task])
    split, written = {"refer": ("val", "best_refcoco+_val_predictions.json"),
                      "vqa": ("minval", "best_vqa_minval_predictions.json")}[task]
    one, two = (shutil.copytree(run, tmp_path / name) for name in ("one", "two"))
    capsys.readouterr()
    eval_script.main(["--from_pretrained", str(one / "best.pdparams"), "--split", split, "--num_workers", "0"])
    table_one = capsys.readouterr().out.strip().splitlines()[-2:]
    logs = tmp_path / "logs"
    finished(launch(PROJECT / "eval.py", ["--from_pretrained", str(two / "best.pdparams"), "--split", split,
                                         "--num_workers", "0"], logs, nproc_per_node=2), logs)
    log = [line.replace(str(two), str(one)) for line in (logs / "workerlog.0").read_text().splitlines()]
    assert table_one[0] in log, log[-20:]  # Paddle 2.6 logs its store's shutdown after the table
    assert log[log.index(table_one[0]):][:2] == table_one
    print(f"\n{task}, 1 process and 2 ranks: {table_one[0]}\n{table_one[1]}")
    predictions = json.loads((one / written).read_text())
    assert_close(json.loads((two / written).read_text()), predictions)  # scores of other batches: float rounding
    assert len(predictions) > 20 and not (logs / "workerlog.1").read_text().count(table_one[0])
    assert sorted(p.name for p in two.iterdir()) == sorted(p.name for p in one.iterdir())  # rank 1 wrote nothing
