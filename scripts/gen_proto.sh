#!/usr/bin/env bash
# Regenerate distill_base/proto/*_pb2*.py from proto/*.proto with the LOWEST grpcio-tools setup.py admits.
# The generated files are committed so that a fresh clone works without a build step. Generated code refuses to
# import under an older grpcio (and older protobuf) than the tools that made it, so it must come from the floor of
# setup.py's ranges: grpcio-tools 1.74.0 (its protoc writes protobuf 6.31.1 code). Run after editing a .proto:
#   python3 -m venv /tmp/gen && /tmp/gen/bin/pip install grpcio-tools==1.74.0 protobuf==6.31.1
#   PYTHON=/tmp/gen/bin/python bash scripts/gen_proto.sh
# (scripts/smoke_lowest.sh, run by scripts/test.sh, installs the floors and imports the result.)
set -euo pipefail
cd "$(dirname "$0")/.."
"${PYTHON:-python}" -m grpc_tools.protoc -Iproto --python_out=distill_base/proto --grpc_python_out=distill_base/proto \
  proto/general_model_service.proto proto/general_model_config.proto
# protoc emits absolute imports; make them package-relative.
sed -i 's/^import general_model_service_pb2 as/from . import general_model_service_pb2 as/' \
  distill_base/proto/general_model_service_pb2_grpc.py
rm -f distill_base/proto/general_model_config_pb2_grpc.py  # the config has no service
