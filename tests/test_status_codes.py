"""The err_no table shared by the teacher server and the student's client."""
import numpy  # noqa: F401  (before paddle: environment.md)

from distill_reader import client
from distill_reader.status_codes import ErrNo, StatusClass, is_transient, status_class


def test_every_code_has_its_class_and_unknown_codes_are_broken():
    assert [(int(code), status_class(code)) for code in ErrNo] == [
        (0, StatusClass.OK), (3001, StatusClass.BUSY), (5000, StatusClass.INVALID_INPUT),
        (6000, StatusClass.BUSY), (10000, StatusClass.SICK)]
    assert status_class(7000) is StatusClass.BROKEN and status_class(-1) is StatusClass.BROKEN
    assert [code for code in (0, 3001, 5000, 6000, 10000, 7000) if is_transient(code)] == [3001, 6000, 10000]


def test_server_and_client_read_the_same_table():
    from teachers import inference

    assert (inference.ERR_INPUT, inference.ERR_SHUTDOWN, inference.ERR_TIMEOUT, inference.ERR_INTERNAL) == (
        5000, 3001, 6000, 10000)
    assert client.ERR_NO_INVALID_INPUT == inference.ERR_INPUT
    assert type(inference.ERR_INPUT) is int   # protobuf fields take plain ints
