#!/usr/bin/env bash
# Regenerates the committed protobuf/gRPC code next to the .proto files (or into $OUT).
# Proto paths mirror the Python import path (entremise/v1), so no import rewriting is needed.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python}
OUT=${OUT:-proto}
BIN=$(dirname "$("$PYTHON" -c 'import sys; print(sys.executable)')")
if [ "$OUT" = proto ]; then
  rm -f proto/entremise/v1/*_pb2*.py proto/entremise/v1/*_pb2*.pyi
fi
mkdir -p "$OUT"
"$PYTHON" -m grpc_tools.protoc -I proto \
  --plugin=protoc-gen-mypy="$BIN/protoc-gen-mypy" \
  --plugin=protoc-gen-mypy_grpc="$BIN/protoc-gen-mypy_grpc" \
  --python_out="$OUT" --mypy_out="$OUT" \
  --grpc_python_out="$OUT" --mypy_grpc_out="$OUT" \
  proto/entremise/v1/*.proto
