"""The JSON form of Paddle Serving's ``Request`` and ``Response``: the one place both sides write and read it.

Paddle Serving's brpc front writes messages with json2pb: numbers for every integer (64-bit ones too), lists
for repeated fields, ``tensor_content`` in base64, ``err_no``/``err_msg``/``log_id`` always present. The teacher's
HTTP front answers in that form (``response_to_json``); the student's ``TeacherClient`` with
``http_format="json"`` sends the protobuf JSON mapping (``request_to_json``; Paddle Serving's own HTTP client
does too) and reads either back (``parse_response``).

Example::

    body = json.dumps(request_to_json(request)).encode()
    request = parse_request(body)                     # the teacher, from an HTTP body
    doc = response_to_json(response)                  # the teacher's answer, brpc's form
    response = parse_response(json.dumps(doc).encode())
"""
from __future__ import annotations

import base64

from google.protobuf import json_format

from .proto import general_model_service_pb2 as service_pb2

__all__ = ["ParseError", "parse_request", "parse_response", "request_to_json", "response_to_json",
           "tensor_to_json"]

ParseError = json_format.ParseError

# A Tensor's repeated value fields, in the order brpc's json2pb writes them.
_REPEATED = ("int64_data", "float_data", "int_data", "float64_data", "uint32_data", "bool_data",
             "complex64_data", "complex128_data", "data")


def tensor_to_json(tensor: service_pb2.Tensor) -> dict:
    """A Tensor as Paddle Serving's brpc json2pb writes it: numbers for every integer (64-bit too), lists for
    repeated fields, ``tensor_content`` in base64."""
    doc: dict = {}
    for field in _REPEATED:
        values = getattr(tensor, field)
        if values:
            doc[field] = list(values)
    doc["elem_type"] = tensor.elem_type
    doc["shape"] = list(tensor.shape)
    if tensor.lod:
        doc["lod"] = list(tensor.lod)
    doc["name"] = tensor.name
    doc["alias_name"] = tensor.alias_name
    if tensor.tensor_content:
        doc["tensor_content"] = base64.b64encode(tensor.tensor_content).decode("ascii")
    return doc


def response_to_json(response: service_pb2.Response) -> dict:
    """A Response as Paddle Serving writes it in JSON (``err_no``, ``err_msg``, ``log_id`` always present)."""
    doc: dict = {}
    if response.outputs:
        doc["outputs"] = [{"tensor": [tensor_to_json(t) for t in output.tensor], "engine_name": output.engine_name}
                          for output in response.outputs]
    doc["log_id"] = response.log_id
    doc["err_no"] = response.err_no
    doc["err_msg"] = response.err_msg
    return doc


def request_to_json(request: service_pb2.Request) -> dict:
    """A Request in the protobuf JSON mapping with the proto's field names (what Paddle Serving's HTTP client
    sends; 64-bit integers as strings, ``tensor_content`` in base64)."""
    return json_format.MessageToDict(request, preserving_proto_field_name=True)


def parse_request(body: bytes) -> service_pb2.Request:
    """A Request from a JSON body; unknown fields are refused.

    Raises:
        ParseError: the body is not JSON, or not a Request (an unknown field, a wrong type).
        UnicodeDecodeError, ValueError, TypeError: what ``json_format.Parse`` lets through for some bodies.
    """
    return json_format.Parse(body, service_pb2.Request())


def parse_response(body: bytes) -> service_pb2.Response:
    """A Response from a JSON body; unknown fields are ignored (a newer server may add some).

    Raises:
        ParseError: the body is not JSON, or not a Response.
    """
    return json_format.Parse(body, service_pb2.Response(), ignore_unknown_fields=True)
