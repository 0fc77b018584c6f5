"""Unpickling that runs no code: the one unpickler every pickle the project reads goes through.

A pickle names the globals (functions, classes) it needs rebuilt, and plain `pickle.load` imports and calls
them, so a file can run anything. `RestrictedUnpickler` resolves only the globals its caller allows for that
kind of file and refuses the file at the first other one, naming the file. Plain data (lists, dicts, strings,
bytes, numbers, booleans, None, tuples) needs no global at all, so `allowed={}` reads exactly that.

This module imports nothing heavy, so the download script's audit can use it without Paddle.
"""

import codecs
import collections
import importlib
import pickle
from typing import Callable, Dict, Mapping, Tuple


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


def feature_record_globals() -> Dict[Tuple[str, str], Callable]:
    """What a region-feature LMDB record may name: numpy arrays and dtypes (12-in-1's records, under NumPy 1's
    `numpy.core` and NumPy 2's `numpy._core` names alike), `OrderedDict` (vilbert_beta's csv.DictReader rows) and
    `_codecs.encode` (bytes in protocol-2 pickles)."""
    import numpy as np

    core = "numpy._core" if int(np.__version__.split(".")[0]) >= 2 else "numpy.core"
    allowed = {("numpy", "ndarray"): np.ndarray, ("numpy", "dtype"): np.dtype,
               ("collections", "OrderedDict"): collections.OrderedDict, ("_codecs", "encode"): codecs.encode}
    for module, name in (("multiarray", "_reconstruct"), ("multiarray", "scalar"), ("numeric", "_frombuffer")):
        found = getattr(importlib.import_module(f"{core}.{module}"), name)
        allowed.update({(f"numpy.core.{module}", name): found, (f"numpy._core.{module}", name): found})
    return allowed
