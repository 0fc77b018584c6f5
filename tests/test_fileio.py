"""`file_lock`: one process at a time where the filesystem has locks, every process (with a note) where not."""

import errno
import threading
import time

import pytest

from vilbert import fileio
from vilbert.fileio import file_lock


def test_a_second_holder_waits_for_the_first(tmp_path, capsys):
    order, entered = [], threading.Event()

    def first():
        with file_lock(tmp_path / "job.lock", waiting="waiting"):
            entered.set()
            time.sleep(0.3)
            order.append("first done")

    thread = threading.Thread(target=first)
    thread.start()
    entered.wait(10)
    with file_lock(tmp_path / "job.lock", waiting="waiting"):
        order.append("second in")
    thread.join()
    assert order == ["first done", "second in"]
    assert capsys.readouterr().out == "waiting\n"


@pytest.mark.parametrize("code", [errno.ENOLCK, errno.EOPNOTSUPP])
def test_a_filesystem_without_locks_runs_the_block_with_a_note(tmp_path, monkeypatch, capsys, code):
    def no_locks(fd, operation):
        raise OSError(code, "No locks available")

    monkeypatch.setattr(fileio.fcntl, "flock", no_locks)
    ran = []
    with file_lock(tmp_path / "nfs" / "job.lock", waiting="waiting"):
        ran.append(True)
    assert ran == [True]
    assert capsys.readouterr().out == (f"Note: {tmp_path / 'nfs'} has no file locks (No locks available); this "
                                       f"process does the work itself, even if another does it too\n")


def test_other_lock_errors_are_not_hidden(tmp_path, monkeypatch):
    def broken(fd, operation):
        raise OSError(errno.EBADF, "Bad file descriptor")

    monkeypatch.setattr(fileio.fcntl, "flock", broken)
    with pytest.raises(OSError, match="Bad file descriptor"):
        with file_lock(tmp_path / "job.lock", waiting="waiting"):
            pass
