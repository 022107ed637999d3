#!/usr/bin/env bash
# Regenerates the committed protobuf/gRPC code next to the .proto files.
# Proto paths mirror the Python import path (entremise/v1), so no import rewriting is needed.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python}
rm -f proto/entremise/v1/*_pb2*.py proto/entremise/v1/*_pb2*.pyi
"$PYTHON" -m grpc_tools.protoc -I proto \
  --python_out=proto --mypy_out=proto \
  --grpc_python_out=proto --mypy_grpc_out=proto \
  proto/entremise/v1/*.proto
