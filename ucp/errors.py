"""Exception hierarchy. Every error a user can cause names the file, parameter and problem."""

import re


class UcpError(Exception):
    """Base class of every error ucp raises on purpose."""


class FormatError(UcpError):
    """A file of a universal checkpoint is malformed or does not match its manifest."""


class NotCommittedError(FormatError):
    """The path holds no committed ucp checkpoint (no valid ``ucp.manifest.json``)."""


class CorruptChunkError(FormatError):
    """A chunk file is missing, has the wrong size or fails its crc32c check."""


class IncompleteCheckpointError(UcpError):
    """``commit()`` found chunks that were never (fully) written."""


class OverlapError(UcpError):
    """Two writes covered the same region of a chunk."""


class NotFoundError(UcpError, KeyError):
    """Unknown parameter or state; the message lists close matches."""

    def __str__(self):  # KeyError quotes its argument; keep the message readable
        return str(self.args[0]) if self.args else ""


#: the signal that interrupted this process, set by the command line's handler: a job's other
#: processes are told that, not the error torch's zip writer makes of it ("unexpected pos")
interrupted_by: int | None = None


class DestinationNotEmptyError(UcpError):
    """``create_checkpoint`` refused a non-empty destination without ``overwrite=True``."""


class MetadataEncodingError(UcpError, TypeError):
    """A non-tensor metadata value has no JSON encoding (ucp never pickles)."""


def unpickling_refusal(e: BaseException) -> str:
    """What torch's weights-only unpickler refused, in one line: the pickled class where its message
    names one. The message itself starts with advice to load with ``weights_only=False`` (which ucp
    never does) in terminal escapes, and names the class only further down."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(e))
    # "Unsupported global: GLOBAL x", and for a blocked module "Trying to load unsupported GLOBAL x whose
    # module m is blocked"
    found = re.search(r"[Uu]nsupported (?:global: )?GLOBAL (\S+)", text) or re.search(r"but got <class '([^']+)'>", text)
    if found:
        return f"it holds a pickled {found.group(1)}, which ucp does not unpickle"
    lines = [line.strip() for line in text.splitlines() if line.strip() and "weights_only" not in line]
    return lines[0] if lines else type(e).__name__


def value_globals() -> list:
    """What ``torch.save``'d plain values name when pickled, beyond what weights-only loading
    allows, for ``torch.serialization.safe_globals``: DCP pickles a state dict's non-tensor
    values. ``b""`` is pickled as a call of ``bytes()`` (torchtitan's dataloader state may be
    empty); a ``best_loss`` kept as ``np.float64`` names numpy's reconstructor, ``ndarray`` and
    its dtype's class. Numeric and bool dtypes only: an object array would carry arbitrary
    pickles."""
    import numpy as np

    core = getattr(np, "_core", None) or np.core
    kinds = [getattr(np.dtypes, n) for n in dir(np.dtypes) if n.endswith("DType")
             and n not in ("ObjectDType", "VoidDType", "StrDType", "BytesDType", "StringDType",
                           "DateTime64DType", "TimeDelta64DType")]
    return [(_empty_bytes, "builtins.bytes"),
            core.multiarray.scalar, core.multiarray._reconstruct, np.ndarray, np.dtype, *kinds]


def _empty_bytes(*args) -> bytes:
    """``bytes()`` as a pickle of ``b""`` calls it; any argument is refused (``bytes(10**12)``
    would allocate a terabyte)."""
    if args:
        raise UcpError(f"a pickled call of bytes{args!r}: only bytes() (an empty bytes value) is loaded")
    return b""
