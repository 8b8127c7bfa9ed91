"""Exception hierarchy. Every error a user can cause names the file, parameter and problem."""


class UcpError(Exception):
    """Base class of every error ucp raises on purpose."""
