"""discovery.nodes: node data is untrusted input; whatever the bytes, the parsers answer or raise NodeDataError."""
import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from discovery.nodes import (
    MAX_ASSIGNMENT_BYTES,
    MAX_NESTING,
    MAX_NODE_BYTES,
    Assignment,
    NodeDataError,
    load_document,
    nesting_depth,
    parse_assignment,
    parse_student,
    parse_teacher,
)

json_values = st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
                           lambda inner: st.lists(inner) | st.dictionaries(st.text(), inner), max_leaves=30)


@settings(max_examples=500, deadline=None)
@given(st.binary(max_size=2048) | json_values.map(lambda v: json.dumps(v).encode()))
def test_any_bytes_give_a_document_or_node_data_error(value):
    for parse in (parse_teacher, parse_student):
        try:
            parse("node-0000000001", value)
        except NodeDataError:
            pass


@pytest.mark.parametrize("depth", [1, MAX_NESTING, MAX_NESTING + 1, 50_000])
def test_nesting_is_counted_outside_strings_and_bounded(depth):
    value = b'{"a":' * depth + b'"[[[{{{\\"["' + b"}" * depth
    assert nesting_depth(value) == min(depth, MAX_NESTING + 1)
    if depth <= MAX_NESTING and len(value) <= MAX_NODE_BYTES:
        assert load_document(value)
    else:
        with pytest.raises(NodeDataError, match="nested|bytes of data"):
            load_document(value)


def test_documents_within_bounds_are_read():
    teacher = parse_teacher("teacher-0000000003", b'{"endpoint": " [::1]:9292 ", "model": "m"}')
    assert (teacher.endpoint, teacher.sequence, teacher.meta["model"]) == ("[::1]:9292", 3, "m")
    student = parse_student("student-0000000004", b'{"student_id": "s", "require_max_teacher": 3}')
    assert (student.student_id, student.require_max_teacher, student.sequence) == ("s", 3, 4)
    assert parse_student("student-0000000005", b"{}").student_id == "student-0000000005"
    with pytest.raises(NodeDataError, match="bytes of data"):
        load_document(b" " * (MAX_NODE_BYTES + 1))


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=2048) | json_values.map(lambda v: json.dumps(v).encode())
       | st.fixed_dictionaries({"teachers": json_values, "endpoints": json_values}).map(
           lambda v: json.dumps(v).encode()))
def test_any_bytes_give_an_assignment_or_node_data_error(value):
    try:
        parse_assignment("student-0000000001", value)
    except NodeDataError:
        pass


def test_assignments_name_only_teacher_nodes_of_the_service_and_are_bounded():
    good = Assignment("student-0000000001", ("teacher-0000000007",), ("10.0.0.5:9292",))
    assert parse_assignment("student-0000000001", good.document()) == good
    for document, message in (
            ({"teachers": ["../../other/teacher-0000000001"], "endpoints": ["a:1"]}, "teacher node names"),
            ({"teachers": ["teacher-0000000001"], "endpoints": []}, "same length"),
            ({"teachers": ["teacher-0000000001"], "endpoints": [5]}, "other than strings"),
            ({"teachers": ["teacher-0000000001"], "endpoints": ["0.0.0.0:1"]}, "wildcard"),
            ({"teachers": ["teacher-0000000001"] * 1025, "endpoints": ["a:1"] * 1025}, "at most 1024"),
            ({"teachers": "teacher-0000000001", "endpoints": "a:1"}, "two lists")):
        with pytest.raises(NodeDataError, match=message):
            parse_assignment("student-0000000001", json.dumps(document).encode())


def test_the_largest_assignment_the_assigner_writes_is_read():
    """1024 teachers (the most a student may ask for) with 253-character host names must not be refused."""
    host = ".".join(["a" * 63, "b" * 63, "c" * 63, "d" * 61])
    teachers = tuple(f"teacher-{i:010d}" for i in range(1024))
    largest = Assignment("student-0000000001", teachers, tuple(f"{host}:{60000 + i % 5000}" for i in range(1024)))
    assert len(largest.document()) > MAX_NODE_BYTES
    assert parse_assignment("student-0000000001", largest.document()) == largest
    with pytest.raises(NodeDataError, match="bytes of data"):
        parse_assignment("student-0000000001", b" " * (MAX_ASSIGNMENT_BYTES + 1))
