"""CPU settings: the thread count a process takes, alone and as one of the ranks a launcher started."""

import os
import subprocess
import sys

import pytest

from training_support import PROJECT
from vilbert import runtime


@pytest.mark.parametrize("local_size, expected", [(None, 16), ("1", 16), ("2", 8), ("8", 2), ("32", 1), ("x", 16)])
def test_the_ranks_of_a_machine_share_its_cpus(monkeypatch, local_size, expected):
    monkeypatch.setattr(runtime.os, "sched_getaffinity", lambda pid: set(range(16)))
    if local_size is None:
        monkeypatch.delenv("PADDLE_LOCAL_SIZE", raising=False)
    else:
        monkeypatch.setenv("PADDLE_LOCAL_SIZE", local_size)
    assert runtime.available_cpus() == expected


def test_a_launched_rank_defaults_to_its_share_of_threads():
    env = {key: value for key, value in os.environ.items() if key != "MKL_NUM_THREADS"}
    cpus = len(os.sched_getaffinity(0))
    for local_size in ("1", str(cpus)):
        shown = subprocess.run([sys.executable, "-c", "import vilbert, os; print(os.environ['MKL_NUM_THREADS'])"],
                               cwd=PROJECT, env=dict(env, PADDLE_LOCAL_SIZE=local_size), capture_output=True,
                               text=True, check=True).stdout.split()[-1]
        assert int(shown) == cpus // int(local_size)
