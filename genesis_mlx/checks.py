"""Checks of the numbers users give, shared by the commands and the Python API."""

import math
import os
from numbers import Integral
from pathlib import Path

from .errors import GenesisError

# mx.random.seed takes an unsigned 64-bit integer.
MAX_SEED = 2 ** 64 - 1

# What the FoX cache can be quantized to (Model.make_cache's kv_bits).
KV_BITS = (4, 8)


def check_finite(flag: str, value: float):
    """nan and inf parse as floats but sample or train nothing useful."""
    if not math.isfinite(value):
        raise GenesisError(f"{flag} {value}: must be a finite number")


def check_seed(seed, flag: str = "--seed"):
    if seed is None:
        return
    if isinstance(seed, bool) or not isinstance(seed, Integral) or not 0 <= seed <= MAX_SEED:
        raise GenesisError(f"{flag} {seed}: must be an integer from 0 to 2**64-1 ({MAX_SEED})")


def check_at_least_one(flag: str, value: int):
    if value < 1:
        raise GenesisError(f"{flag} {value}: must be at least 1")


def check_kv_bits(bits, flag: str = "--kv-bits"):
    if bits is not None and bits not in KV_BITS:
        raise GenesisError(f"{flag} {bits}: use 4 or 8 (or leave it out: exact)")


def check_writable_file(path: str, flag: str):
    """A file a command writes at its end (a report): said before the work, not after."""
    target = Path(path).expanduser()
    if target.is_dir():
        raise GenesisError(f"{flag} {path} is a directory; give a file name (e.g. "
                           f"{target / 'report.json'})")
    parent = target.parent
    if not parent.is_dir():
        raise GenesisError(f"{flag} {path}: there is no directory {parent}; create it first, "
                           "or write elsewhere")
    if not os.access(parent, os.W_OK | os.X_OK) or (target.exists()
                                                    and not os.access(target, os.W_OK)):
        raise GenesisError(f"{flag} {path}: not writable here (permissions); write elsewhere")
