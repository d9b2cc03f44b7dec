#!/usr/bin/env bash
# guide_8gpu_1p1d.sh: the 8-GPU single-machine 1P1D deployment of FastDeploy's ERNIE-4.5 guides
# ("2.2.7 Disaggregated Deployment": a prefill node on GPUs 0-3 and a decode node on GPUs 4-7,
# each --tensor-parallel-size 4 --quantization wint4, ports 8180-8183 and 8184-8187, the decode
# node reaching the prefill node through --innode-prefill-ports), with `fastdeploy` replaced by
# `pdserve`. Clients call the decode node's port, 8184.
#
# On a machine without GPUs the same commands run on the CPU with the built-in model (each node
# then runs 4 tensor-parallel ranks as processes; the tests run exactly this):
#
#   MODEL=tiny bash deploy/guide_8gpu_1p1d.sh
#
# It starts the prefill node, waits for its /health, starts the decode node, waits for its
# /health, sends one chat request to the decode node and prints the response, then keeps both
# nodes serving until Ctrl-C or SIGTERM, which stop both with SIGTERM (ONESHOT=1: stop right
# after the request). The exit code is non-zero if anything failed.
#
# Environment (all optional):
#   MODEL          model directory (default: baidu/ERNIE-4.5-21B-A3B-Paddle, the guide's model
#                  name read as a local directory: pdserve does not download) or `tiny`
#   TP             --tensor-parallel-size of each node (default: 4)
#   QUANT          --quantization: wint4 (default), wint8, block_wise_fp8, or none (flag omitted)
#   PREFILL_DEVICES / DECODE_DEVICES   CUDA_VISIBLE_DEVICES (default: 0,1,2,3 / 4,5,6,7)
#   PREFILL_MSG_QUEUE_ID / DECODE_MSG_QUEUE_ID   INFERENCE_MSG_QUEUE_ID (default: 1315 / 1215,
#                  as in the ERNIE-4.5-21B-A3B guide)
#   BASE_PORT      default 8180: the guide's ports BASE_PORT..+7, then the two gRPC
#                  --pd-comm-port's pdserve adds, just above the decode node's per-rank KV ports
#                  (decode cache-queue port + TP, + TP + 1: 8191 and 8192 for TP 4)
#   PREFILL_PORT, PREFILL_METRICS_PORT, PREFILL_ENGINE_WORKER_QUEUE_PORT, PREFILL_CACHE_QUEUE_PORT,
#   PREFILL_PD_COMM_PORT and the same five DECODE_*: single ports overriding BASE_PORT's layout
#   (e.g. the ERNIE-4.5-21B-A3B page's 7012/7014/7013/7015 and 9012/8014/8013/8015)
#   BACKEND        --backend numpy|cupy|auto (default: the flag is left out, meaning auto)
#   EXTRA_ARGS     more flags for both nodes, split on spaces (e.g. "--max-model-len 32768
#                  --max-num-seqs 128")
#   LOG_ROOT       where log_prefill/ and log_decode/ go (default: the current directory, as in
#                  the guide)
#   PYTHON         interpreter with pdserve installed (default: python or python3 from PATH)
#   PROMPT, MAX_TOKENS, ONESHOT, START_TIMEOUT (default 900 s), STOP_TIMEOUT (default 60 s)
#
# Port note for TP > 1: pdserve's --cache-queue-port is the base of per-rank KV endpoints (rank r
# listens on port + r), where FastDeploy's is one port. The decode node's ranks take 8187..8190
# here. If prefill nodes ever listen per rank too, 8183..8186 would collide with the decode
# node's 8184-8186: then move PREFILL_CACHE_QUEUE_PORT out of the way.
set -euo pipefail

DEPLOY_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=deploy/lib.sh
. "$DEPLOY_DIR/lib.sh"

MODEL=${MODEL:-baidu/ERNIE-4.5-21B-A3B-Paddle}
TP=${TP:-4}
QUANT=${QUANT:-wint4}
PREFILL_DEVICES=${PREFILL_DEVICES:-0,1,2,3}
DECODE_DEVICES=${DECODE_DEVICES:-4,5,6,7}
PREFILL_MSG_QUEUE_ID=${PREFILL_MSG_QUEUE_ID:-1315}
DECODE_MSG_QUEUE_ID=${DECODE_MSG_QUEUE_ID:-1215}
PROMPT=${PROMPT:-Hello! Who are you?}
MAX_TOKENS=${MAX_TOKENS:-32}
ONESHOT=${ONESHOT:-0}
START_TIMEOUT=${START_TIMEOUT:-900} # the real model takes minutes to load
STOP_TIMEOUT=${STOP_TIMEOUT:-60}

BASE_PORT=${BASE_PORT:-8180}
PREFILL_PORT=${PREFILL_PORT:-$((BASE_PORT + 0))}
PREFILL_METRICS_PORT=${PREFILL_METRICS_PORT:-$((BASE_PORT + 1))}
PREFILL_ENGINE_WORKER_QUEUE_PORT=${PREFILL_ENGINE_WORKER_QUEUE_PORT:-$((BASE_PORT + 2))}
PREFILL_CACHE_QUEUE_PORT=${PREFILL_CACHE_QUEUE_PORT:-$((BASE_PORT + 3))}
DECODE_PORT=${DECODE_PORT:-$((BASE_PORT + 4))}
DECODE_METRICS_PORT=${DECODE_METRICS_PORT:-$((BASE_PORT + 5))}
DECODE_ENGINE_WORKER_QUEUE_PORT=${DECODE_ENGINE_WORKER_QUEUE_PORT:-$((BASE_PORT + 6))}
DECODE_CACHE_QUEUE_PORT=${DECODE_CACHE_QUEUE_PORT:-$((BASE_PORT + 7))}
PREFILL_PD_COMM_PORT=${PREFILL_PD_COMM_PORT:-$((DECODE_CACHE_QUEUE_PORT + TP))}
DECODE_PD_COMM_PORT=${DECODE_PD_COMM_PORT:-$((DECODE_CACHE_QUEUE_PORT + TP + 1))}

# Flags both nodes share. QUANT=none leaves --quantization out (bf16 weights).
COMMON_ARGS=(--model "$MODEL" --tensor-parallel-size "$TP")
[[ $QUANT == none ]] || COMMON_ARGS+=(--quantization "$QUANT")
[[ -z ${BACKEND:-} ]] || COMMON_ARGS+=(--backend "$BACKEND")
# shellcheck disable=SC2206 # EXTRA_ARGS is split on spaces on purpose
[[ -z ${EXTRA_ARGS:-} ]] || COMMON_ARGS+=(${EXTRA_ARGS})

command -v curl >/dev/null 2>&1 || die "curl is needed to check health and send the request"
[[ $MODEL == tiny || -d $MODEL ]] ||
    die "MODEL=$MODEL is not a directory: download ERNIE-4.5-21B-A3B-Paddle there first," \
        "set MODEL=/path/to/it, or try MODEL=tiny"
resolve_python
LOG_ROOT=${LOG_ROOT:-.}
mkdir -p "$LOG_ROOT/log_prefill" "$LOG_ROOT/log_decode"
LOG_ROOT=$(cd "$LOG_ROOT" && pwd)

install_traps # from here on, however the script ends, both nodes get SIGTERM

# ---- prefill: GPUs 0-3, ports 8180-8183 (started by start_node in a background subshell) ----
prefill_node() {
    export FD_LOG_DIR="$LOG_ROOT/log_prefill"
    export CUDA_VISIBLE_DEVICES="$PREFILL_DEVICES"
    export INFERENCE_MSG_QUEUE_ID="$PREFILL_MSG_QUEUE_ID"
    exec "$PYTHON" -m pdserve.entrypoints.openai.api_server \
        "${COMMON_ARGS[@]}" \
        --port "$PREFILL_PORT" --metrics-port "$PREFILL_METRICS_PORT" \
        --engine-worker-queue-port "$PREFILL_ENGINE_WORKER_QUEUE_PORT" \
        --cache-queue-port "$PREFILL_CACHE_QUEUE_PORT" \
        --pd-comm-port "$PREFILL_PD_COMM_PORT" \
        --splitwise-role "prefill"
}

# ---- decode: GPUs 4-7, ports 8184-8187 -----------------------------------------------------
decode_node() {
    export FD_LOG_DIR="$LOG_ROOT/log_decode"
    export CUDA_VISIBLE_DEVICES="$DECODE_DEVICES"
    export INFERENCE_MSG_QUEUE_ID="$DECODE_MSG_QUEUE_ID"
    # Note that --innode-prefill-ports is the prefill node's --engine-worker-queue-port.
    exec "$PYTHON" -m pdserve.entrypoints.openai.api_server \
        "${COMMON_ARGS[@]}" \
        --port "$DECODE_PORT" --metrics-port "$DECODE_METRICS_PORT" \
        --engine-worker-queue-port "$DECODE_ENGINE_WORKER_QUEUE_PORT" \
        --cache-queue-port "$DECODE_CACHE_QUEUE_PORT" \
        --pd-comm-port "$DECODE_PD_COMM_PORT" \
        --innode-prefill-ports "$PREFILL_ENGINE_WORKER_QUEUE_PORT" \
        --splitwise-role "decode"
}

start_node prefill "$LOG_ROOT/log_prefill/console.log" prefill_node
# The decode node finds the prefill node through its engine-worker-queue port at start and gives
# up after 30 s; loading the real model takes longer, so decode starts once prefill is healthy.
wait_healthy 0 "http://127.0.0.1:$PREFILL_PORT" "$START_TIMEOUT"
start_node decode "$LOG_ROOT/log_decode/console.log" decode_node
wait_healthy 1 "http://127.0.0.1:$DECODE_PORT" "$START_TIMEOUT"

# One request to the decode node's port: clients call the decode node.
chat_once "http://127.0.0.1:$DECODE_PORT" "$MODEL" "$PROMPT" "$MAX_TOKENS"
log "clients: POST http://127.0.0.1:$DECODE_PORT/v1/chat/completions"
[[ $ONESHOT == 1 ]] || serve_until_stopped
