#!/usr/bin/env bash
# local_1p1d.sh: one prefill node and one decode node on this machine (1P1D), in the shape of
# the disaggregated example of FastDeploy's ERNIE-4.5 best-practice guides: each node with its
# own FD_LOG_DIR, INFERENCE_MSG_QUEUE_ID and CUDA_VISIBLE_DEVICES, ports 8180-8183 for the
# prefill node and 8184-8187 for the decode node, and the decode node pointed at the prefill
# node's engine-worker-queue port with --innode-prefill-ports. Clients talk to the decode node.
#
# It runs the built-in `tiny` model on the CPU (--backend numpy), waits for /health of both
# nodes, sends one chat request to the decode node with curl and prints the response (the only
# thing written to stdout), then stops both nodes with SIGTERM. The nodes are stopped on any
# exit, Ctrl-C included; the exit code is non-zero if anything failed, a node's own exit included.
#
#   bash deploy/local_1p1d.sh                      # from the repo root, after `pip install -e .`
#   BASE_PORT=9180 bash deploy/local_1p1d.sh       # ports 9180-9189 instead
#
# Environment (all optional):
#   MODEL          model directory or `tiny` (default: tiny)
#   BASE_PORT      first of ten consecutive ports (default: 8180): the guide's eight, then the
#                  two gRPC --pd-comm-port's that pdserve adds (BASE_PORT+8 prefill, +9 decode)
#   PREFILL_PORT, PREFILL_METRICS_PORT, PREFILL_ENGINE_WORKER_QUEUE_PORT, PREFILL_CACHE_QUEUE_PORT,
#   PREFILL_PD_COMM_PORT and the same five DECODE_*: single ports, overriding BASE_PORT's layout
#   PREFILL_DEVICES / DECODE_DEVICES   CUDA_VISIBLE_DEVICES of each node (default: 0 / 1; the numpy
#                  backend ignores them)
#   BACKEND        numpy (default), cupy or auto
#   LOG_ROOT       where log_prefill/ and log_decode/ go (default: a new directory under /tmp)
#   PYTHON         interpreter with pdserve installed (default: python or python3 from PATH)
#   PROMPT, MAX_TOKENS   the chat request (default: "Hello! Who are you?", 32)
#   START_TIMEOUT  seconds to wait for each node's /health (default: 120)
#   STOP_TIMEOUT   seconds each node gets to drain after SIGTERM before SIGKILL (default: 30)
set -euo pipefail

DEPLOY_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=deploy/lib.sh
. "$DEPLOY_DIR/lib.sh"

MODEL=${MODEL:-tiny}
BACKEND=${BACKEND:-numpy}
PROMPT=${PROMPT:-Hello! Who are you?}
MAX_TOKENS=${MAX_TOKENS:-32}
START_TIMEOUT=${START_TIMEOUT:-120}
STOP_TIMEOUT=${STOP_TIMEOUT:-30}

# The guide's port layout: prefill 8180 (HTTP), 8181 (metrics), 8182 (engine-worker-queue),
# 8183 (cache-queue); decode 8184-8187 the same way. pdserve nodes also serve gRPC on
# --pd-comm-port (default 8004 on every node), so two nodes on one host need two more ports.
BASE_PORT=${BASE_PORT:-8180}
PREFILL_PORT=${PREFILL_PORT:-$((BASE_PORT + 0))}
PREFILL_METRICS_PORT=${PREFILL_METRICS_PORT:-$((BASE_PORT + 1))}
PREFILL_ENGINE_WORKER_QUEUE_PORT=${PREFILL_ENGINE_WORKER_QUEUE_PORT:-$((BASE_PORT + 2))}
PREFILL_CACHE_QUEUE_PORT=${PREFILL_CACHE_QUEUE_PORT:-$((BASE_PORT + 3))}
DECODE_PORT=${DECODE_PORT:-$((BASE_PORT + 4))}
DECODE_METRICS_PORT=${DECODE_METRICS_PORT:-$((BASE_PORT + 5))}
DECODE_ENGINE_WORKER_QUEUE_PORT=${DECODE_ENGINE_WORKER_QUEUE_PORT:-$((BASE_PORT + 6))}
DECODE_CACHE_QUEUE_PORT=${DECODE_CACHE_QUEUE_PORT:-$((BASE_PORT + 7))}
PREFILL_PD_COMM_PORT=${PREFILL_PD_COMM_PORT:-$((BASE_PORT + 8))}
DECODE_PD_COMM_PORT=${DECODE_PD_COMM_PORT:-$((BASE_PORT + 9))}

PREFILL_DEVICES=${PREFILL_DEVICES:-0}
DECODE_DEVICES=${DECODE_DEVICES:-1}

command -v curl >/dev/null 2>&1 || die "curl is needed to check health and send the request"
resolve_python
LOG_ROOT=${LOG_ROOT:-$(mktemp -d "${TMPDIR:-/tmp}/pdserve-1p1d.XXXXXX")}
mkdir -p "$LOG_ROOT/log_prefill" "$LOG_ROOT/log_decode"
LOG_ROOT=$(cd "$LOG_ROOT" && pwd)

# From here on, however the script ends, both nodes get SIGTERM (see deploy/lib.sh).
install_traps

# ---- prefill node: ports 8180-8183 --------------------------------------------------------
# Each node is a function that exports the node's environment and execs the server; start_node
# runs it in a background subshell, so the exports stay in that subshell and $! is the server.
# `python -m pdserve.entrypoints.openai.api_server` is `pdserve serve` under FastDeploy's module
# path: the command is the guide's with `fastdeploy` replaced by `pdserve`.
prefill_node() {
    export FD_LOG_DIR="$LOG_ROOT/log_prefill"
    export CUDA_VISIBLE_DEVICES="$PREFILL_DEVICES"
    # names the node's ipc sockets and shared memory; its engine port is unique on this host
    export INFERENCE_MSG_QUEUE_ID="$PREFILL_ENGINE_WORKER_QUEUE_PORT"
    exec "$PYTHON" -m pdserve.entrypoints.openai.api_server \
        --model "$MODEL" \
        --backend "$BACKEND" \
        --port "$PREFILL_PORT" --metrics-port "$PREFILL_METRICS_PORT" \
        --engine-worker-queue-port "$PREFILL_ENGINE_WORKER_QUEUE_PORT" \
        --cache-queue-port "$PREFILL_CACHE_QUEUE_PORT" \
        --pd-comm-port "$PREFILL_PD_COMM_PORT" \
        --splitwise-role "prefill"
}

# ---- decode node: ports 8184-8187 ---------------------------------------------------------
decode_node() {
    export FD_LOG_DIR="$LOG_ROOT/log_decode"
    export CUDA_VISIBLE_DEVICES="$DECODE_DEVICES"
    export INFERENCE_MSG_QUEUE_ID="$DECODE_ENGINE_WORKER_QUEUE_PORT"
    # Note that --innode-prefill-ports is the prefill node's --engine-worker-queue-port.
    exec "$PYTHON" -m pdserve.entrypoints.openai.api_server \
        --model "$MODEL" \
        --backend "$BACKEND" \
        --port "$DECODE_PORT" --metrics-port "$DECODE_METRICS_PORT" \
        --engine-worker-queue-port "$DECODE_ENGINE_WORKER_QUEUE_PORT" \
        --cache-queue-port "$DECODE_CACHE_QUEUE_PORT" \
        --pd-comm-port "$DECODE_PD_COMM_PORT" \
        --innode-prefill-ports "$PREFILL_ENGINE_WORKER_QUEUE_PORT" \
        --splitwise-role "decode"
}

start_node prefill "$LOG_ROOT/log_prefill/console.log" prefill_node
# The decode node looks the prefill node up through its engine-worker-queue port when it starts
# and gives up after 30 s, so it starts once the prefill node has loaded its model.
wait_healthy 0 "http://127.0.0.1:$PREFILL_PORT" "$START_TIMEOUT"
start_node decode "$LOG_ROOT/log_decode/console.log" decode_node
wait_healthy 1 "http://127.0.0.1:$DECODE_PORT" "$START_TIMEOUT"

# ---- one request, to the decode node's port (as the guide says: clients call the decode node)
chat_once "http://127.0.0.1:$DECODE_PORT" "$MODEL" "$PROMPT" "$MAX_TOKENS"

# Leaving runs the EXIT trap: SIGTERM to both nodes, and a non-zero exit if either does not
# drain and exit 0.
