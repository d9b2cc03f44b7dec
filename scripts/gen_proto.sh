#!/usr/bin/env bash
# Regenerates the committed gRPC modules from proto/pdserve.proto and proto/health.proto:
#   pdserve/proto/{pdserve,health}_pb2.py, _pb2.pyi, _pb2_grpc.py
# Usage: scripts/gen_proto.sh [OUT_DIR]   (default pdserve/proto; tests pass a temp dir)
# Needs grpcio-tools at the version pinned in pyproject.toml's test extra: its protoc decides
# which protobuf runtime the generated code needs, and tests/test_proto.py compares byte for byte.
set -euo pipefail
cd "$(dirname "$0")/.."

out="${1:-pdserve/proto}"
python="${PYTHON:-python}"
mkdir -p "$out"

for name in pdserve health; do
    "$python" -m grpc_tools.protoc -Iproto \
        --python_out="$out" --grpc_python_out="$out" --pyi_out="$out" "proto/$name.proto"
    # protoc emits a top-level `import NAME_pb2`, which only works with pdserve/proto on sys.path.
    grpc_module="$out/${name}_pb2_grpc.py"
    grep -q "^import ${name}_pb2 as ${name}__pb2\$" "$grpc_module" || {
        echo "gen_proto.sh: expected 'import ${name}_pb2 as ${name}__pb2' in $grpc_module" >&2
        exit 1
    }
    sed -e "s/^import ${name}_pb2 as ${name}__pb2\$/from pdserve.proto import ${name}_pb2 as ${name}__pb2/" \
        "$grpc_module" > "$grpc_module.tmp"
    mv "$grpc_module.tmp" "$grpc_module"
done
