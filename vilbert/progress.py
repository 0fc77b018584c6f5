"""Progress of a loop over batches: tqdm's live bar on a terminal, a few plain lines in a log file.

Long runs on a GPU box go to a file (`nohup python train.py > train.log 2>&1 &`), where every refresh of a bar
would be appended to one ever-growing carriage-return line. There, `PlainProgress` writes one line at each
quarter of the loop instead: steps done, steps/s, ETA and the loop's own figures (loss, accuracy).
"""

import datetime
import math
import sys
import time

from tqdm import tqdm

PLAIN_LINES = 4  # per loop, when the stream is not a terminal


def progress(iterable, desc: str, *, enabled: bool = True, stream=None, unit: str = "steps", initial: int = 0):
    """`iterable` with progress on `stream` (default stderr); the result has tqdm's `set_postfix(**values)`.
    `initial`: items of the loop done before (a resumed epoch), which `iterable` leaves out but `len` counts."""
    stream = stream or sys.stderr
    if enabled and not stream.isatty():
        return PlainProgress(iterable, desc, stream, unit, initial)
    return tqdm(iterable, desc=desc, disable=not enabled, dynamic_ncols=True, file=stream, unit=unit,
                initial=initial)


class PlainProgress:
    """Yields the items of a sized iterable and writes a line after each `PLAIN_LINES`-th of them, e.g.
    `Epoch 3: 235/470 steps, 11.8 steps/s, ETA 0:00:20, loss=0.8123, acc=0.7031`."""

    def __init__(self, iterable, desc: str, stream, unit: str = "steps", initial: int = 0):
        self.iterable, self.desc, self.stream, self.unit, self.initial = iterable, desc, stream, unit, initial
        self.postfix = {}

    def __len__(self) -> int:
        return len(self.iterable)

    def set_postfix(self, **values) -> None:
        self.postfix = values

    def __iter__(self):
        total = len(self.iterable)
        marks = {math.ceil(total * k / PLAIN_LINES) for k in range(1, PLAIN_LINES + 1)}
        started = time.monotonic()
        for done, item in enumerate(self.iterable, self.initial + 1):
            yield item  # the loop body runs here, so the line below includes this item
            if done in marks:
                rate = (done - self.initial) / max(time.monotonic() - started, 1e-9)
                eta = datetime.timedelta(seconds=round((total - done) / rate))
                figures = "".join(f", {key}={value}" for key, value in self.postfix.items())
                self.stream.write(f"{self.desc}: {done}/{total} {self.unit}, {rate:.2f} {self.unit}/s, ETA {eta}{figures}\n")
                self.stream.flush()
