"""The reader's errors: what a student catches around its training loop.

Every error names what went wrong and where: the teacher (``endpoint``), the task's first sample, the slot.

Example::

    try:
        for batch in reader():
            train(batch)
    except AllTeachersDownError as exc:      # no teacher usable for all_teachers_down_timeout seconds
        log.error("teachers gone: %s", exc)
"""
from __future__ import annotations

from typing import Optional


class DistillReaderError(RuntimeError):
    """The reader cannot go on (teachers unreachable, bad answers, bad input); the message says why."""


class AllTeachersDownError(DistillReaderError):
    """No teacher was usable for longer than ``all_teachers_down_timeout``; names the teachers and the last error."""


class TeacherAnswerInvalid(DistillReaderError):
    """No teacher answered a task correctly (missing fetch, wrong rows); ``endpoint`` names the last one asked.

    One teacher with a wrong answer is only set aside (it may run another model) and the task retried on
    another; this is raised when every teacher of the pool answered the task wrongly.
    """

    def __init__(self, endpoint: str, message: str):
        super().__init__(message)
        self.endpoint = endpoint


class TeacherRequestRefused(DistillReaderError):
    """Every teacher refused a task as an invalid request (wrong feed, shape or dtype for the served model).

    ``first_sample`` is the epoch index of the task's first sample; ``slots`` the feeds that were sent.
    """

    def __init__(self, message: str, first_sample: int, slots: Optional[list] = None):
        super().__init__(message)
        self.first_sample = first_sample
        self.slots = list(slots or [])


class TeacherAuthRefused(DistillReaderError):
    """Every teacher refused the student's credentials (a missing or wrong token, or client certificate) or its
    TLS settings (a teacher certificate not signed by ``tls_ca``, plaintext to a TLS teacher or TLS to a plaintext
    one)."""


class ReaderClosedError(DistillReaderError):
    """``close()`` was called (possibly from another thread) while this epoch was being iterated."""
