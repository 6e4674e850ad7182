"""The errors of Pantheon mode (one base class, so callers can catch every Pantheon failure at once)."""
from __future__ import annotations


class PantheonError(RuntimeError):
    """Base class of every Pantheon failure (connection, protocol, knowledge mismatch)."""


class AuthenticationError(PantheonError):
    """The peer did not present the shared token."""


class ConnectionLost(PantheonError):
    """The peer closed the connection, died, or stayed silent longer than the timeout."""


class ProtocolError(PantheonError):
    """The peer sent something that is not a valid Pantheon frame (malformed, too long, or failing its MAC)."""


class ForkedConnectionError(PantheonError):
    """A connection used in a child process after ``os.fork()``: it belongs to the parent (one socket, one frame
    counter per direction), so the child must connect a Student or Teacher of its own."""
