"""Protocol messages generated from ``proto/*.proto`` (wire-compatible with Paddle Serving 0.9).

Regenerate with ``scripts/gen_proto.sh``. Do not edit the ``*_pb2*.py`` files by hand.
"""
from . import general_model_config_pb2, general_model_service_pb2, general_model_service_pb2_grpc

__all__ = ["general_model_config_pb2", "general_model_service_pb2", "general_model_service_pb2_grpc"]
