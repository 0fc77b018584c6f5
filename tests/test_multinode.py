"""Two nodes simulated on this machine: one `paddle.distributed.launch --nnodes 2 --master 127.0.0.1:PORT --rank
0|1 --nproc_per_node 1` launcher per node (gloo over loopback) trains what one process trains at the same global
batch; a node killed mid-epoch makes the other stop within seconds with one line, and `--resume auto` on both
nodes then finishes the run with the weights of a run never stopped."""

import os
import re
import signal
import socket
import time

import pytest

from training_support import (CPU_LAUNCH_ONLY, agreeing_runs, assert_same_run, finished, launch, read_metrics,
                              train_here, write_launcher)

pytestmark = CPU_LAUNCH_ONLY

STEPS_PER_EPOCH = 8  # 60 expressions, batch 8 = 2 ranks x 4


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """(flags of a named run, the output folder, the launcher script): 2 epochs of 60 expressions, batches of 8."""
    folder = tmp_path_factory.mktemp("multinode")
    return agreeing_runs(folder, num_train_epochs=2)[0], folder, write_launcher(folder)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_nodes(setup, name, logs, envs=({}, {}), extra=((), ())) -> list:
    """The launchers of nodes 0 and 1 of one job, started side by side, each with its `envs` and `extra` flags;
    each node logs to `logs`/node<rank>."""
    flags, _, launcher = setup
    master = f"127.0.0.1:{free_port()}"
    return [launch(launcher, [*flags(name), *extra[rank]], logs / f"node{rank}", node=(rank, 2, master),
                   env=envs[rank]) for rank in (0, 1)]


@pytest.fixture(scope="module")
def one_process(setup):
    flags, folder, _ = setup
    train_here(flags("one"))
    return folder / "one" / "run"


@pytest.fixture(scope="module")
def two_nodes(setup):
    """The same run on 2 nodes of 1 process each: (run directory, launch log folder)."""
    logs = setup[1] / "two_logs"
    for rank, node in enumerate(start_nodes(setup, "two", logs)):
        finished(node, logs / f"node{rank}")
    return setup[1] / "two" / "run", logs


def test_two_nodes_train_what_one_process_trains(one_process, two_nodes):
    run_dir, logs = two_nodes
    assert [m["epoch"] for m in read_metrics(run_dir)] == [0, 1]
    assert_same_run(run_dir, one_process)
    node0, node1 = (logs / f"node{rank}" / "workerlog.0" for rank in (0, 1))  # log/workerlog.<local rank>
    assert "Device: cpu x 2; 60 train / 23 val expressions; batch 8 = 2 device(s) x 1 step(s) x 4" in node0.read_text()
    assert "Epoch 1 done!" in node0.read_text() and "Epoch" not in node1.read_text()


@pytest.mark.parametrize("stall, where", [(f"train:{STEPS_PER_EPOCH + 3}", "the gradient all-reduce of a step"),
                                          ("eval:3", "the evaluation's gather")])
def test_a_killed_node_stops_the_other_and_resume_finishes_the_run(setup, one_process, tmp_path, stall, where):
    """Node 1 stops answering in epoch 1 (at step 3, or at its first evaluation batch) and is killed, launcher and
    worker, as when a machine dies; node 0, blocked in the collective that needs node 1, must exit on its own."""
    logs, marker = tmp_path / "logs", tmp_path / "stalled.pid"
    name = f"killed_{stall.split(':')[0]}"
    node0, node1 = start_nodes(setup, name, logs, envs=({}, {"STALL_AT": stall, "STALL_MARKER": str(marker)}))
    deadline = time.time() + 300
    while not marker.exists() or not marker.read_text():
        assert node0.poll() is None and time.time() < deadline, node0.communicate()[0][-3000:]
        time.sleep(0.1)
    time.sleep(1)  # node 0 reaches the collective
    os.kill(int(marker.read_text()), signal.SIGKILL)
    node1.kill()
    node1.wait()
    killed = time.time()
    output = node0.communicate(timeout=120)[0]
    stopped = time.time() - killed
    assert node0.returncode != 0 and stopped < 60, output[-3000:]
    log = (logs / "node0" / "workerlog.0").read_text()
    if where == "the evaluation's gather":  # Python sees the collective's error: one line
        errors = [line for line in log.splitlines() if line.startswith("error:")]
        assert len(errors) == 1 and "Traceback" not in log, log[-3000:]
        assert errors[0].startswith("error: rank 0 of 2 lost contact with another rank ([")
        assert errors[0].endswith("Start every node's launcher again with the same command (train.py: add --resume "
                                  "auto to continue from the last checkpoint)")
        message = errors[0]
    else:  # inside backward, Paddle aborts the process with gloo's exception, which names the lost peer
        assert "terminate called after throwing an instance of 'gloo::" in log, log[-3000:]
        message = next(line for line in log.splitlines() if "what():" in line).strip()
        assert "gloo/transport/tcp" in message
    print(f"node 0 stopped {stopped:.1f} s after node 1 was killed in {where}: {message}")
    run_dir = setup[1] / name / "run"
    assert [m["epoch"] for m in read_metrics(run_dir)] == [0]  # epoch 1 was in progress

    resumed = tmp_path / "resumed_logs"
    for rank, node in enumerate(start_nodes(setup, name, resumed, extra=[("--resume", "auto")] * 2)):
        finished(node, resumed / f"node{rank}")
    assert "continuing at epoch 1" in (resumed / "node0" / "workerlog.0").read_text()
    assert_same_run(run_dir, one_process)


def test_sigterm_to_one_node_stops_both_at_one_update_and_resume_finishes_the_run(setup, one_process, tmp_path):
    """A scheduler preempting a job signals every node's launcher, not always at the same step: SIGTERM to node 1's
    alone (sent while node 0 logs epoch 0's progress, so the stop lands before the run's end) makes both ranks save
    after the same update and stop with one line; --resume auto on both nodes finishes the run."""
    logs, name = tmp_path / "logs", "preempted"
    nodes = start_nodes(setup, name, logs)
    log0, log1 = (logs / f"node{rank}" / "workerlog.0" for rank in (0, 1))
    progress = re.compile(r"Epoch 0: (\d+)/(\d+) steps")
    deadline = time.time() + 300
    while not (log0.exists() and any(0 < int(done) < int(total) for done, total in progress.findall(log0.read_text()))):
        assert nodes[0].poll() is None and time.time() < deadline, nodes[0].communicate()[0][-3000:]
        time.sleep(0.02)
    nodes[1].send_signal(signal.SIGTERM)
    for node in nodes:
        node.communicate(timeout=120)
    stops = []
    for log in (log0, log1):
        text = log.read_text()
        assert "Traceback" not in text, text[-3000:]
        stops += [line for line in text.splitlines() if line.startswith("stopped by SIGTERM")]
    assert len(stops) == 2 and stops[0] == stops[1], stops  # the same update on both ranks
    assert re.fullmatch(r"stopped by SIGTERM (at epoch [01], update [1-8] of 8|after epoch 0): .* holds it; continue "
                        r"with --resume auto", stops[0])
    print(f"node 1's launcher got SIGTERM; both ranks: {stops[0]}")

    resumed = tmp_path / "resumed_logs"
    for rank, node in enumerate(start_nodes(setup, name, resumed, extra=[("--resume", "auto")] * 2)):
        finished(node, resumed / f"node{rank}")
    assert_same_run(setup[1] / name / "run", one_process)


def test_nodes_that_see_different_run_folders_refuse_to_resume(setup, two_nodes, tmp_path):
    """Node 0 sees the finished run, node 1 (as without a shared filesystem) an empty folder: both stop at once
    with one line, and nothing in the run folder changes."""
    run_dir, logs = two_nodes[0], tmp_path / "logs"
    before = {path.name: path.stat().st_mtime_ns for path in run_dir.iterdir() if path.name != ".run.lock"}
    nodes = start_nodes(setup, "two", logs, extra=[("--resume", "auto"),
                                                   ("--resume", "auto", "--output_dir", str(tmp_path / "empty"))])
    for rank, node in enumerate(nodes):
        node.communicate(timeout=300)
        assert node.returncode != 0
        log = (logs / f"node{rank}" / "workerlog.0").read_text()
        errors = [line for line in log.splitlines() if line.startswith("error:")]
        assert len(errors) == 1 and "Traceback" not in log, log[-3000:]
        host = socket.gethostname()
        assert errors[0].startswith(f"error: --resume auto: the ranks start at different points ({host}: rank 0 at "
                                    f"epoch 2; {host}: rank 1 at epoch 0), as they do not all see the same ")
    assert {path.name: path.stat().st_mtime_ns for path in run_dir.iterdir() if path.name != ".run.lock"} == before
