"""The documents in teacher and student nodes, parsed as untrusted input.

Anyone may create student nodes (and, without an identity on the service, teacher nodes), so every node's data is
parsed with limits: at most ``MAX_NODE_BYTES`` bytes (checked before decoding), UTF-8 JSON whose object and array
nesting is at most ``MAX_NESTING`` deep (checked by a scan before ``json.loads``, which would otherwise recurse
once per level), a JSON object at the top. A node that breaks a rule raises ``NodeDataError``; the watcher logs it
once and skips the node.

Example::

    >>> parse_teacher("teacher-0000000007", b'{"endpoint": "10.0.0.5:9292", "model": "mnist"}').endpoint
    '10.0.0.5:9292'
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any

from .arguments import node_sequence, validate_endpoint

MAX_NODE_BYTES = 64 * 1024       # our own documents are < 1 KiB; ZooKeeper allows up to jute.maxbuffer (1 MiB)
# An assignment lists up to MAX_REQUIRE_TEACHERS (node name, endpoint) pairs: 1024 x (21 + 262) bytes at most
# (a 253-character host name and a 5-digit port), so its own, larger limit.
MAX_ASSIGNMENT_BYTES = 320 * 1024
MAX_NESTING = 16
MAX_STUDENT_ID = 256
MAX_REQUIRE_TEACHERS = 1024
_TEACHER_NODE = re.compile(r"teacher-[0-9]{10}")   # fullmatch ("$" matches before a final newline)
_STUDENT_NODE = re.compile(r"student-[0-9]{10}")


class NodeDataError(ValueError):
    """A node's data is not a document discovery accepts (too big, too deep, not JSON, a bad field)."""


@dataclass(frozen=True)
class TeacherInfo:
    """One registered teacher: its node name (``teacher-0000000007``), endpoint and the rest of its JSON."""

    node: str
    endpoint: str
    meta: dict = field(default_factory=dict, compare=False, hash=False)

    @property
    def sequence(self) -> int:
        return node_sequence(self.node)


@dataclass(frozen=True)
class StudentInfo:
    """One registered student: node name, its id, how many teachers it wants and the node name of its previous
    registration ("" for none: a student whose session expired registers again under a new name and names the old
    one here, so that the assigner hands it the teachers it kept for it: ``discovery.assigner``, the grace)."""

    node: str
    student_id: str
    require_max_teacher: int = 1
    previous: str = ""

    @property
    def sequence(self) -> int:
        return node_sequence(self.node)


def load_document(value: bytes, max_bytes: int = MAX_NODE_BYTES) -> dict[str, Any]:
    """A JSON object from untrusted node data of at most ``max_bytes``; NodeDataError naming the broken limit.

    Raises:
        NodeDataError: the data is missing or over ``max_bytes``, not UTF-8 JSON, nested too deep, or not an object.
    """
    if value is None or len(value) > max_bytes:
        raise NodeDataError(f"{len(value or b'')} bytes of data (at most {max_bytes} accepted)")
    depth = nesting_depth(value)
    if depth > MAX_NESTING:
        raise NodeDataError(f"JSON nested {depth} deep (at most {MAX_NESTING} accepted)")
    try:
        document = json.loads(value.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise NodeDataError(f"not UTF-8 JSON ({exc})") from None
    if not isinstance(document, dict):
        raise NodeDataError(f"JSON {type(document).__name__}, not an object")
    return document


def nesting_depth(value: bytes) -> int:
    """The deepest nesting of ``[``/``{`` outside JSON strings (stops counting past MAX_NESTING + 1)."""
    depth = deepest = 0
    in_string = escaped = False
    for byte in value:
        if in_string:
            if escaped:
                escaped = False
            elif byte == 0x5C:        # backslash
                escaped = True
            elif byte == 0x22:        # quote
                in_string = False
        elif byte == 0x22:
            in_string = True
        elif byte in (0x5B, 0x7B):    # [ {
            depth += 1
            if depth > deepest:
                deepest = depth
                if deepest > MAX_NESTING:
                    return deepest
        elif byte in (0x5D, 0x7D):    # ] }
            depth -= 1
    return deepest


def parse_teacher(name: str, value: bytes) -> TeacherInfo:
    """The teacher in node ``name``; NodeDataError unless its data is a document with a dialable ``endpoint``.

    Raises:
        NodeDataError: the data is not a bounded JSON object with a dialable ``endpoint``.
    """
    document = load_document(value)
    try:
        endpoint = validate_endpoint(document["endpoint"])
    except KeyError:
        raise NodeDataError("no 'endpoint' field") from None
    except ValueError as exc:
        raise NodeDataError(str(exc)) from None
    return TeacherInfo(node=name, endpoint=endpoint, meta=document)


def parse_student(name: str, value: bytes) -> StudentInfo:
    """The student in node ``name``; NodeDataError for data out of bounds (an id too long, a bad maximum).

    Raises:
        NodeDataError: the data is out of bounds (a ``student_id`` too long, a ``require_max_teacher`` outside
            1-MAX_REQUIRE_TEACHERS, a ``previous`` that is not a student node name) or not a bounded JSON object.
    """
    document = load_document(value)
    student_id = document.get("student_id", name)
    wanted = document.get("require_max_teacher", 1)
    previous = document.get("previous", "")
    if not isinstance(previous, str) or previous and not _STUDENT_NODE.fullmatch(previous):
        raise NodeDataError("'previous' is not a student node name (student-NNNNNNNNNN)")
    if not isinstance(student_id, str) or len(student_id) > MAX_STUDENT_ID:
        raise NodeDataError(f"'student_id' is not a string of at most {MAX_STUDENT_ID} characters")
    if isinstance(wanted, bool) or not isinstance(wanted, int) or not 1 <= wanted <= MAX_REQUIRE_TEACHERS:
        raise NodeDataError(f"'require_max_teacher' {wanted!r} is not an integer in 1-{MAX_REQUIRE_TEACHERS}")
    return StudentInfo(node=name, student_id=student_id, require_max_teacher=wanted, previous=previous)


@dataclass(frozen=True)
class Assignment:
    """The teachers the assigner gave one student: teacher node names and their endpoints, in the same order."""

    student: str
    teachers: tuple[str, ...]
    endpoints: tuple[str, ...]

    def document(self) -> bytes:
        """The node data: compact JSON ``{"teachers": [...], "endpoints": [...]}``."""
        return json.dumps({"teachers": list(self.teachers), "endpoints": list(self.endpoints)},
                          separators=(",", ":")).encode()


def parse_assignment(name: str, value: bytes) -> Assignment:
    """The assignment in node ``name``; NodeDataError unless ``teachers`` lists at most MAX_REQUIRE_TEACHERS
    teacher node names (``teacher-`` and 10 digits: nothing that leads out of the service folder) and
    ``endpoints`` as many dialable endpoints; at most MAX_ASSIGNMENT_BYTES of data.

    Raises:
        NodeDataError: ``teachers`` and ``endpoints`` are not two lists of the same length, hold too many entries, a
            name that is not a teacher node name or an endpoint that cannot be dialled.
    """
    document = load_document(value, MAX_ASSIGNMENT_BYTES)
    teachers, endpoints = document.get("teachers"), document.get("endpoints")
    if not isinstance(teachers, list) or not isinstance(endpoints, list) or len(teachers) != len(endpoints):
        raise NodeDataError("'teachers' and 'endpoints' are not two lists of the same length")
    if len(teachers) > MAX_REQUIRE_TEACHERS:
        raise NodeDataError(f"{len(teachers)} teachers (at most {MAX_REQUIRE_TEACHERS} accepted)")
    if not all(isinstance(t, str) and _TEACHER_NODE.fullmatch(t) for t in teachers):
        raise NodeDataError("'teachers' holds something other than teacher node names (teacher-NNNNNNNNNN)")
    if not all(isinstance(e, str) for e in endpoints):
        raise NodeDataError("'endpoints' holds something other than strings")
    try:
        checked = tuple(validate_endpoint(e) for e in endpoints)
    except ValueError as exc:
        raise NodeDataError(str(exc)) from None
    return Assignment(student=name, teachers=tuple(teachers), endpoints=checked)
