"""Exception hierarchy. Every error a user can cause names the file, parameter and problem."""


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


class DestinationNotEmptyError(UcpError):
    """``create_checkpoint`` refused a non-empty destination without ``overwrite=True``."""


class MetadataEncodingError(UcpError, TypeError):
    """A non-tensor metadata value has no JSON encoding (ucp never pickles)."""
