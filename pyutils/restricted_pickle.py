"""Unpickling that runs no code: the one unpickler every pickle the project reads goes through.

A pickle names the globals (functions, classes) it needs rebuilt, and plain `pickle.load` imports and calls
them, so a file can run anything. `RestrictedUnpickler` resolves only the globals its caller allows for that
kind of file and refuses the file at the first other one, naming the file. Plain data (lists, dicts, strings,
bytes, numbers, booleans, None, tuples) needs no global at all, so `allowed={}` reads exactly that.

This module imports nothing heavy, so the download script's audit can use it without Paddle.
"""

import pickle
from typing import Callable, Mapping, Tuple


class RestrictedUnpickler(pickle.Unpickler):
    """Resolves only the (module, name) globals in `allowed` (mapped to the object to use); any other global
    raises `error(f"{path}: refusing to unpickle global module.name: {refusal}")`.

    `encoding` decodes the byte strings of Python 2 pickles (the REFER files); their `str` are ASCII.
    """

    def __init__(self, file, path, allowed: Mapping[Tuple[str, str], Callable], refusal: str, *,
                 error: type = pickle.UnpicklingError, encoding: str = "ASCII"):
        super().__init__(file, encoding=encoding)
        self.path, self.allowed, self.refusal, self.error = path, allowed, refusal, error

    def find_class(self, module, name):
        if (module, name) in self.allowed:
            return self.allowed[(module, name)]
        raise self.error(f"{self.path}: refusing to unpickle global {module}.{name}: {self.refusal}")
