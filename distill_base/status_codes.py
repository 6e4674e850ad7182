"""Paddle Serving's ``err_no`` values: the one table that the teacher server and the student's client share.

Each code has a class that tells a student what to do with a request that got it:

================  =====  ===========================================================================
class             code   meaning and what the student does
================  =====  ===========================================================================
``INVALID_INPUT`` 5000   the request does not fit the model (feed, dtype, shape, an id past an
                         embedding): another teacher of the same model would refuse it too; the task is
                         tried once on another teacher, then ``TeacherRequestRefused``
``BUSY``          3001   the server is draining and takes no new work: retry elsewhere
``BUSY``          6000   the predictor did not answer within ``--predict_timeout``: the teacher is slow or
                         sick; retry elsewhere and count it toward setting the teacher aside
``SICK``          10000  the predictor failed (or its worker process died): retry elsewhere, set the
                         teacher aside and probe it
``BROKEN``        other  an answer the student cannot use: the teacher is set aside; ``TeacherAnswerInvalid``
                         when every teacher answers so
================  =====  ===========================================================================

The numbers are Paddle Serving's pipeline serving's (``CustomExceptionCode``: ``CLOSED_ERROR`` 3001,
``INPUT_PARAMS_ERROR`` 5000, ``TIMEOUT`` 6000, ``UNKNOW`` 10000; its ranges: 5000-5999 user input errors, 6000-6999
timeouts). A new code is one row here.

Example::

    from distill_base.status_codes import ErrNo, StatusClass, status_class

    assert status_class(6000) is StatusClass.BUSY
    assert ErrNo.INPUT == 5000
"""
from __future__ import annotations

import enum

__all__ = ["ErrNo", "StatusClass", "status_class", "is_transient"]


class ErrNo(enum.IntEnum):
    """The ``err_no`` values a teacher sends (0 is success)."""

    OK = 0
    SHUTDOWN = 3001   # draining: no new work
    INPUT = 5000      # the request does not fit the model
    TIMEOUT = 6000    # no answer within --predict_timeout
    INTERNAL = 10000  # the predictor (or its worker process) failed


class StatusClass(enum.Enum):
    """What an ``err_no`` says about the request and the teacher."""

    OK = "ok"
    INVALID_INPUT = "invalid input"   # the request's fault: any teacher of this model refuses it
    BUSY = "busy"                     # the teacher cannot answer now: elsewhere, later
    SICK = "sick"                     # the teacher failed: elsewhere; set it aside and probe it
    BROKEN = "broken"                 # an answer nobody understands: set the teacher aside


_CLASSES = {
    ErrNo.OK: StatusClass.OK,
    ErrNo.SHUTDOWN: StatusClass.BUSY,
    ErrNo.INPUT: StatusClass.INVALID_INPUT,
    ErrNo.TIMEOUT: StatusClass.BUSY,
    ErrNo.INTERNAL: StatusClass.SICK,
}


def status_class(err_no: int) -> StatusClass:
    """The class of ``err_no``; a code outside the table is ``StatusClass.BROKEN``.

    Example::

        status_class(5000)   # StatusClass.INVALID_INPUT
    """
    try:
        return _CLASSES[ErrNo(err_no)]
    except ValueError:
        return StatusClass.BROKEN


def is_transient(err_no: int) -> bool:
    """True when another teacher (or this one later) may answer the same request: ``BUSY`` and ``SICK``."""
    return status_class(err_no) in (StatusClass.BUSY, StatusClass.SICK)
