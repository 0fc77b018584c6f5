"""When the fit loop saves in the middle of an epoch: on SIGINT or SIGTERM, and every few minutes.

SIGTERM is what Slurm and other schedulers send before they preempt a job or end it at its time limit, and what
Paddle's launcher sends its ranks when it is stopped (it kills them 30 s later). Neither signal stops the process
where it is: the fit loop finishes the update in progress, saves a resumable checkpoint of that step, prints one
line and exits with 128 + the signal's number. A second Ctrl-C stops at once (KeyboardInterrupt). The timer
(`--save_every_minutes`) saves the same checkpoint periodically, which bounds what a SIGKILL or a lost node costs.
"""

import contextlib
import signal
import threading
import time

import paddle
import paddle.distributed as dist

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class Stopped(Exception):
    """The run stopped on a signal after saving a checkpoint; `code` is the exit status a shell reports for a
    process that signal ended (128 + its number), so a job script sees it was stopped, not finished."""

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.code = 128 + signum


class SaveClock:
    """Says after each update whether to save now and whether to stop after saving, the same on every rank.

    In a distributed run the ranks agree with one small all-reduce per update: a signal reaches the ranks at
    slightly different steps (or one rank only), and the timer is rank 0's, yet every rank must save and stop
    after the same update.
    """

    def __init__(self, minutes: float):
        self.interval = minutes * 60 if minutes > 0 else float("inf")
        self.last_save = time.monotonic()
        self.signal = 0  # the first stop signal caught, 0 if none

    @contextlib.contextmanager
    def catching_signals(self):
        """While the block runs, SIGINT and SIGTERM ask for a stop instead of stopping the process (only the main
        thread can set handlers; elsewhere they keep theirs)."""
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        previous = {signum: signal.getsignal(signum) for signum in STOP_SIGNALS}
        for signum in STOP_SIGNALS:
            signal.signal(signum, self._caught)
        try:
            yield
        finally:
            for signum, handler in previous.items():
                signal.signal(signum, handler if handler is not None else signal.SIG_DFL)

    def _caught(self, signum, frame):
        if self.signal and signum == signal.SIGINT == self.signal:
            raise KeyboardInterrupt  # Ctrl-C twice: the user will not wait for the step
        if not self.signal:  # later ones (a launcher sends SIGTERM three times) change nothing
            self.signal = signum
            print(f"{signal.Signals(signum).name} received: saving a checkpoint after this step, then stopping "
                  f"(Ctrl-C again to stop at once, losing this epoch's steps since the last save)", flush=True)

    def due(self) -> "tuple[bool, int]":
        """(save now, the signal to stop on after saving or 0), agreed by all ranks."""
        timer = dist.get_rank() == 0 and time.monotonic() - self.last_save >= self.interval
        wanted = [self.signal, int(timer)]
        if dist.get_world_size() > 1:
            flags = paddle.to_tensor(wanted, dtype="int32")
            dist.all_reduce(flags, op=dist.ReduceOp.MAX)
            wanted = flags.tolist()
        stop = wanted[0]
        self.signal = self.signal or stop  # a rank that caught nothing stops as well
        return bool(stop or wanted[1]), stop

    def saved(self) -> None:
        self.last_save = time.monotonic()
