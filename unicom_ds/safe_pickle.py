"""`load(path)`: a pickle from elsewhere read as data, never run.

A pickle names the functions that rebuild its objects, and unpickling calls them: a planted file can name
`os.system`. This unpickler admits only what numpy arrays are rebuilt from, and Python 3's spelling of byte
strings in protocol 2; lists, dicts, numbers and strings need no function. Anything else is refused before it
is called. It reads CIFAR-10's python release (Python 2 pickles of dicts of uint8 arrays and lists).
"""
from __future__ import annotations

import codecs
import os
import pickle

import numpy as np

try:
    from numpy._core.multiarray import _reconstruct
except ImportError:  # numpy < 2
    from numpy.core.multiarray import _reconstruct

# numpy 2 moved numpy.core to numpy._core: older pickles (the CIFAR release's) name the first, newer the second.
ALLOWED = {
    ("numpy.core.multiarray", "_reconstruct"): _reconstruct,
    ("numpy._core.multiarray", "_reconstruct"): _reconstruct,
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
    ("_codecs", "encode"): codecs.encode,  # bytes, as Python 3 writes them at protocol < 3
    ("__builtin__", "bytes"): bytes,       # b"", likewise
    ("builtins", "bytes"): bytes,
}
WHAT = "only numpy arrays, lists, dicts, numbers and strings are read"


class Refused(ValueError):
    """A pickle names a function outside ALLOWED; nothing was called."""


class _Unpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        if (module, name) not in ALLOWED:
            raise Refused(f"refused to unpickle {module}.{name} ({WHAT})")
        return ALLOWED[module, name]


def load(path: str | os.PathLike, encoding: str = "ASCII"):
    """The object pickled in `path` (`encoding`: how Python 2 strings decode, as pickle.load's); a refused
    function or a damaged file raises one ValueError naming the file."""
    with open(path, "rb") as f:
        try:
            return _Unpickler(f, encoding=encoding).load()
        except Refused as e:
            raise Refused(f"{path}: {e}") from None
        except Exception as e:  # truncated, not a pickle, an array that does not rebuild
            raise ValueError(f"{path}: not a readable pickle ({type(e).__name__}: {e})") from None
