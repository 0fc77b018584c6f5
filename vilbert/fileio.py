"""Files written so that a crash or a full disk never leaves a half-written one behind.

Everything the project writes (checkpoints, caches, logs, pictures) goes to a temporary file in the same
folder, which is renamed over the target only once complete: the previous version stays intact until then.
"""

import os
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Union


@contextmanager
def atomic_path(path: Union[str, os.PathLike]) -> Iterator[Path]:
    """Yields a temporary path beside `path`; after the block, it replaces `path` (or is removed on error)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp{path.suffix}")  # same suffix: savefig picks the format
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write(path: Union[str, os.PathLike], data: Union[str, bytes]) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data.encode() if isinstance(data, str) else data)
