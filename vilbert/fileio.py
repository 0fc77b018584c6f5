"""Files written so that a crash or a full disk never leaves a half-written one behind.

Everything the project writes (checkpoints, caches, logs, pictures) goes to a temporary file in the same
folder, which is renamed over the target only once complete: the previous version stays intact until then.
What several processes would otherwise all do (build a cache, fetch a data root) runs under `file_lock`.
"""

import errno
import fcntl
import os
import re
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
    except BaseException as error:
        tmp.unlink(missing_ok=True)
        renamed = naming_target(error, path, tmp)
        if renamed:
            raise renamed from error
        raise


def naming_target(error: BaseException, path, tmp) -> "OSError | None":
    """For an OSError of writing `tmp`, the temp file of `path`, about `tmp` or about no file (as a full disk's
    write() is): the same error naming `path`, the file the user knows. None for any other error."""
    if isinstance(error, OSError) and error.errno and error.filename in (None, os.fspath(tmp), tmp):
        return type(error)(error.errno, error.strerror, os.fspath(path))
    return None


def user_cache(kind: str) -> Path:
    """Where caches go that cannot live beside their data (a read-only data root): `$XDG_CACHE_HOME` (default
    ~/.cache)/vilbert-paddle/<kind>."""
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "vilbert-paddle" / kind


def writable(folder: Union[str, os.PathLike]) -> bool:
    """Whether files can be made in `folder`: it, or the nearest folder above it that exists, is writable."""
    folder = Path(os.path.abspath(folder))
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    return folder.is_dir() and os.access(folder, os.W_OK)


_TEMPORARY = re.compile(r"^\..+\.(\d+)\.tmp(\.\w+)?$")  # atomic_path's (and save_checkpoint's) names


def remove_stale_temporaries(folder: Union[str, os.PathLike]) -> list:
    """Removes the temporary files of `atomic_path` in `folder` whose process is gone (killed mid-write) and
    returns their names; those of live processes are left alone."""
    removed = []
    for path in sorted(Path(folder).glob(".*.tmp*")):
        match = _TEMPORARY.match(path.name)
        if match and not _alive(int(match.group(1))):
            path.unlink(missing_ok=True)
            removed.append(path.name)
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def atomic_write(path: Union[str, os.PathLike], data: Union[str, bytes]) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data.encode() if isinstance(data, str) else data)


# What flock raises where the filesystem has no locks (an NFS mount without its lock service, Lustre without -o flock)
NO_LOCKS = (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL)


@contextmanager
def file_lock(path: Union[str, os.PathLike], waiting: str) -> Iterator[None]:
    """An exclusive lock (flock) on the file `path` for the block: the processes that start a job together (the
    ranks of one machine, or of every machine where a shared filesystem supports flock, as NFSv4 and Lustre
    mounted with -o flock do) run it one at a time, so the first does it and the others find it done. Prints
    `waiting` when another process holds the lock. Where the filesystem has no locks, every process runs the
    block; what it writes is atomic (`atomic_path`), so the result is still whole, only built more than once.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as lock:
        locked = True
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            print(waiting, flush=True)
            fcntl.flock(lock, fcntl.LOCK_EX)
        except OSError as error:
            if error.errno not in NO_LOCKS:
                raise
            locked = False
            print(f"Note: {path.parent} has no file locks ({error.strerror}); this process does the work "
                  f"itself, even if another does it too", flush=True)
        try:
            yield
        finally:
            if locked:
                fcntl.flock(lock, fcntl.LOCK_UN)
