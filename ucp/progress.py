"""Progress reporting for long commands: a tqdm bar on a terminal, silence otherwise.

Library code takes a ``progress`` callable-factory instead of printing, so that Python
users and tests get no output while the CLI gets bars.
"""
from __future__ import annotations

import sys
from contextlib import contextmanager


class _Null:
    def update(self, n=1):
        pass

    def set_postfix_str(self, s):
        pass

    def close(self):
        pass


@contextmanager
def bar(total=None, desc="", unit="B", enabled=None):
    """A progress bar that is only drawn when stderr is a terminal (or ``enabled=True``)."""
    if enabled is None:
        enabled = sys.stderr.isatty()
    if not enabled:
        b = _Null()
        yield b
        return
    from tqdm import tqdm

    b = tqdm(total=total, desc=desc, unit=unit, unit_scale=True, unit_divisor=1024,
             leave=False, file=sys.stderr, dynamic_ncols=True)
    try:
        yield b
    finally:
        b.close()
