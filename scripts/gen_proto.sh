#!/usr/bin/env bash
# Regenerate distill_reader/proto/*_pb2*.py from proto/*.proto with the pinned grpcio-tools.
# The generated files are committed so that a fresh clone works without a build step;
# run this after editing a .proto file (grpcio-tools must match the version pinned in setup.py).
set -euo pipefail
cd "$(dirname "$0")/.."
python -m grpc_tools.protoc -Iproto --python_out=distill_reader/proto --grpc_python_out=distill_reader/proto \
  proto/general_model_service.proto proto/general_model_config.proto
# protoc emits absolute imports; make them package-relative.
sed -i 's/^import general_model_service_pb2 as/from . import general_model_service_pb2 as/' \
  distill_reader/proto/general_model_service_pb2_grpc.py
rm -f distill_reader/proto/general_model_config_pb2_grpc.py  # the config has no service
