"""A restricted unpickler: pickles from outside (a copied run folder, a downloaded checkpoint)
may name only the classes and functions of an explicit allow-list.  Anything else -- os.system,
builtins.eval, subprocess.Popen, an arbitrary class with a __reduce__ -- stops the load before
it is called, with an error naming the file and the refused global.

Python's pickle runs code only through globals it looks up (GLOBAL / STACK_GLOBAL / INST)
and then calls or builds; REDUCE, NEWOBJ and BUILD can only act on what a lookup returned.
Refusing the lookup therefore refuses the code: an allow-list of plain data classes whose
constructors and __setstate__ do no I/O is safe to unpickle.
"""
from __future__ import annotations

import io
import pickle
from typing import BinaryIO, Callable, FrozenSet, Optional, Tuple

Global = Tuple[str, str]


class UnsafePickleError(pickle.UnpicklingError):
    """A pickle named a global outside the allow-list (or was not a pickle at all)."""


class RestrictedUnpickler(pickle.Unpickler):
    """pickle.Unpickler whose find_class admits only `allowed` (module, name) pairs, or those a
    `predicate(module, name)` accepts (e.g. every torch.dtype).  Persistent ids are refused."""

    def __init__(self, file: BinaryIO, allowed: FrozenSet[Global], what: str,
                 predicate: Optional[Callable[[str, str], bool]] = None):
        super().__init__(file)
        self._allowed, self._what, self._predicate = allowed, what, predicate

    def find_class(self, module: str, name: str):
        if (module, name) in self._allowed or (self._predicate is not None and self._predicate(module, name)):
            return super().find_class(module, name)
        raise UnsafePickleError(f"{self._what}: refusing to unpickle {module}.{name} (not in the allow-list "
                                f"of data classes this file may hold); the file may be crafted to run code")

    def persistent_load(self, pid):
        raise UnsafePickleError(f"{self._what}: refusing a persistent id in the pickle")


def restricted_loads(data: bytes, allowed: FrozenSet[Global], what: str,
                     predicate: Optional[Callable[[str, str], bool]] = None):
    """Unpickle `data` with the allow-list; `what` (a file path) names the source in errors."""
    return restricted_load(io.BytesIO(data), allowed, what, predicate)


def restricted_load(file: BinaryIO, allowed: FrozenSet[Global], what: str,
                    predicate: Optional[Callable[[str, str], bool]] = None):
    try:
        return RestrictedUnpickler(file, allowed, what, predicate).load()
    except UnsafePickleError:
        raise
    except (pickle.UnpicklingError, EOFError, AttributeError, ImportError, IndexError, KeyError,
            TypeError, ValueError) as e:
        raise UnsafePickleError(f"{what}: not a readable pickle ({type(e).__name__}: {e})") from None
