#!/usr/bin/env bash
# multi_host.sh: nP/mD across hosts behind one router. Run it once per process, on the host
# that process belongs to; it execs the process in the foreground (for a terminal, tmux or a
# supervisor; deploy/systemd/ has units for the same commands). DRY_RUN=1 prints the command
# instead of running it.
#
#   deploy/multi_host.sh router                # the router: OpenAI API on :8000, nodes register on :8010
#   deploy/multi_host.sh prefill [INSTANCE]    # a prefill node that registers with the router
#   deploy/multi_host.sh decode  [INSTANCE]    # a decode node that registers with the router
#
# Example: a router on 10.0.0.1, two prefill nodes on 10.0.0.2 (8 GPUs, TP 4 each) and one
# decode node on 10.0.0.3 (TP 4):
#
#   10.0.0.1$ NODE_IP=10.0.0.1 MODEL=/models/ERNIE-4.5-21B-A3B-Paddle deploy/multi_host.sh router
#   10.0.0.2$ NODE_IP=10.0.0.2 ROUTER_HOST=10.0.0.1 MODEL=... TP=4 deploy/multi_host.sh prefill 0
#   10.0.0.2$ NODE_IP=10.0.0.2 ROUTER_HOST=10.0.0.1 MODEL=... TP=4 deploy/multi_host.sh prefill 1
#   10.0.0.3$ NODE_IP=10.0.0.3 ROUTER_HOST=10.0.0.1 MODEL=... TP=4 deploy/multi_host.sh decode 0
#   client$   curl http://10.0.0.1:8000/v1/chat/completions -H 'Content-Type: application/json' \
#               -d '{"model": "...", "messages": [{"role": "user", "content": "Hi"}]}'
#
# Nodes may start before or after the router: they register with --router ROUTER_HOST:8010 and
# heartbeat, and the router pairs prefill and decode nodes of the same model, block size and KV
# dtype. KV moves over ZeroMQ between hosts (CUDA IPC / shared memory within one host).
#
# Addresses. Every node binds its gRPC, KV and engine ports on --internal-host and tells its
# peers --advertise-host; both default to 127.0.0.1, which is useless across hosts, so here both
# are NODE_IP, this host's address on the cluster network. Set INTERNAL_HOST=0.0.0.0 to bind all
# interfaces (ADVERTISE_HOST stays NODE_IP: peers must never be told 0.0.0.0). Those ports
# accept unauthenticated traffic: keep them inside a firewalled cluster network. The router's
# HTTP API binds 0.0.0.0 for clients (set API_KEY to require a bearer token); nodes' HTTP and
# metrics ports stay on 127.0.0.1 unless HTTP_HOST says otherwise (e.g. for Prometheus).
#
# Environment:
#   NODE_IP        this host's cluster address (default: the first address of `hostname -I`)
#   ROUTER_HOST    the router's address (required for prefill/decode)
#   ROUTER_PORT    router HTTP port (default 8000)      ROUTER_GRPC_PORT  its gRPC port (8010)
#   ROUTER_METRICS_PORT   an extra /metrics port for the router (default: none; /metrics is also
#                  on ROUTER_PORT)
#   PREFILL_NODES, DECODE_NODES   router only: static HOST:GRPC_PORT lists, in addition to nodes
#                  that register themselves (default: none)
#   MODEL          model directory, the same on every host (default: tiny)
#   TP             --tensor-parallel-size (default 1)   QUANT  --quantization, or none (default)
#   INSTANCE       (or the second argument) this node's slot on its host, 0, 1, ...: give every
#                  node on one host its own, whatever its role. It picks the GPUs (the INSTANCE-th
#                  group of TP: TP=4 INSTANCE=1 is 4,5,6,7) and the ports (see below).
#   GPUS           CUDA_VISIBLE_DEVICES, overriding the INSTANCE-th group
#   BASE_PORT      default 8180. A node's ports are P = BASE_PORT + 20*INSTANCE: HTTP P,
#                  metrics P+1, engine-worker-queue P+2, gRPC (--pd-comm-port) P+3, KV
#                  (--cache-queue-port) P+10, rank r on P+10+r
#   INTERNAL_HOST, ADVERTISE_HOST, HTTP_HOST   see Addresses above
#   API_KEY        bearer token for the HTTP API (router and nodes)
#   LOG_ROOT       FD_LOG_DIR is LOG_ROOT/log_<role>_<INSTANCE> (router: LOG_ROOT/log_router)
#                  (default: ./logs)
#   PDSERVE        the pdserve executable (default: pdserve from PATH)
#   EXTRA_ARGS     more flags, split on spaces (e.g. "--max-model-len 32768 --max-num-seqs 128")
#   DRY_RUN=1      print the environment and command, run nothing
set -euo pipefail

usage() {
    sed -n '2,/^set -euo/p' "${BASH_SOURCE[0]}" | sed '$d; s/^# \{0,1\}//' >&2
    exit 2
}
die() {
    echo "multi_host.sh: error: $*" >&2
    exit 1
}

ROLE=${1:-}
case $ROLE in
router | prefill | decode) ;;
-h | --help | help | "") usage ;;
*) die "unknown role '$ROLE': use router, prefill or decode" ;;
esac
INSTANCE=${2:-${INSTANCE:-0}}
[[ $INSTANCE =~ ^[0-9]+$ ]] || die "INSTANCE must be 0, 1, ..., got '$INSTANCE'"

DRY_RUN=${DRY_RUN:-0}
MODEL=${MODEL:-tiny}
TP=${TP:-1}
QUANT=${QUANT:-none}
ROUTER_PORT=${ROUTER_PORT:-8000}
ROUTER_GRPC_PORT=${ROUTER_GRPC_PORT:-8010}
BASE_PORT=${BASE_PORT:-8180}
LOG_ROOT=${LOG_ROOT:-./logs}
PDSERVE=${PDSERVE:-pdserve}

# This host's cluster address. A dry run shows placeholders for what it cannot find out.
if [[ -z ${NODE_IP:-} ]]; then
    NODE_IP=$(hostname -I 2>/dev/null | awk '{print $1}') || true
    if [[ -z $NODE_IP ]]; then
        [[ $DRY_RUN == 1 ]] || die "cannot tell this host's address: set NODE_IP"
        NODE_IP=NODE_IP
    fi
fi
INTERNAL_HOST=${INTERNAL_HOST:-$NODE_IP}
ADVERTISE_HOST=${ADVERTISE_HOST:-$NODE_IP}
[[ $ADVERTISE_HOST != 0.0.0.0 ]] || die "ADVERTISE_HOST must be an address peers can reach"

ENV=()  # NAME=value pairs for the process
CMD=()  # the command line
if [[ $ROLE == router ]]; then
    ENV+=(FD_LOG_DIR="$LOG_ROOT/log_router")
    CMD=("$PDSERVE" router
        --model "$MODEL"
        --host "${HTTP_HOST:-0.0.0.0}" --port "$ROUTER_PORT"
        --internal-host "$INTERNAL_HOST" --pd-comm-port "$ROUTER_GRPC_PORT")
    [[ -z ${ROUTER_METRICS_PORT:-} ]] || CMD+=(--metrics-port "$ROUTER_METRICS_PORT")
    [[ -z ${PREFILL_NODES:-} ]] || CMD+=(--prefill-nodes "$PREFILL_NODES")
    [[ -z ${DECODE_NODES:-} ]] || CMD+=(--decode-nodes "$DECODE_NODES")
else
    if [[ -z ${ROUTER_HOST:-} ]]; then
        [[ $DRY_RUN == 1 ]] || die "set ROUTER_HOST to the router's address"
        ROUTER_HOST=ROUTER_HOST
    fi
    P=$((BASE_PORT + 20 * INSTANCE))
    # GPUs: the INSTANCE-th group of TP devices, e.g. TP=4 INSTANCE=1 -> 4,5,6,7
    if [[ -z ${GPUS:-} ]]; then
        GPUS=$(seq -s, $((INSTANCE * TP)) $((INSTANCE * TP + TP - 1)))
    fi
    ENV+=(FD_LOG_DIR="$LOG_ROOT/log_${ROLE}_$INSTANCE"
        CUDA_VISIBLE_DEVICES="$GPUS"
        INFERENCE_MSG_QUEUE_ID="${INFERENCE_MSG_QUEUE_ID:-$((P + 2))}")
    CMD=("$PDSERVE" serve
        --model "$MODEL"
        --splitwise-role "$ROLE"
        --tensor-parallel-size "$TP"
        --host "${HTTP_HOST:-127.0.0.1}" --port "$P" --metrics-port $((P + 1))
        --engine-worker-queue-port $((P + 2))
        --pd-comm-port $((P + 3))
        --cache-queue-port $((P + 10))
        --internal-host "$INTERNAL_HOST" --advertise-host "$ADVERTISE_HOST"
        --router "$ROUTER_HOST:$ROUTER_GRPC_PORT")
    [[ $QUANT == none ]] || CMD+=(--quantization "$QUANT")
fi
# The API key: nodes read it from FD_API_KEY, which keeps it out of `ps`; the router takes only
# --api-key. Printed commands show "$API_KEY" in its place.
if [[ -n ${API_KEY:-} ]]; then
    if [[ $ROLE == router ]]; then
        CMD+=(--api-key "$API_KEY")
    else
        ENV+=(FD_API_KEY="$API_KEY")
    fi
fi
# shellcheck disable=SC2206 # EXTRA_ARGS is split on spaces on purpose
[[ -z ${EXTRA_ARGS:-} ]] || CMD+=(${EXTRA_ARGS})

# show WORD: WORD as the shell would need it typed: bare when safe, else quoted; the API key as
# "$API_KEY", so printed commands never carry it.
show() {
    if [[ -n ${API_KEY:-} && $1 == "$API_KEY" ]]; then
        # shellcheck disable=SC2016 # the literal text "$API_KEY" is what is meant
        printf '"$API_KEY"'
    elif [[ $1 =~ ^[A-Za-z0-9_./:,=@+-]+$ ]]; then
        printf '%s' "$1"
    else
        printf '%q' "$1"
    fi
}
# printed: the environment as exports, then the command on one line, ready to paste
printed() {
    local kv word sep=""
    for kv in "${ENV[@]}"; do
        printf 'export %s=%s\n' "${kv%%=*}" "$(show "${kv#*=}")"
    done
    for word in "${CMD[@]}"; do
        printf '%s%s' "$sep" "$(show "$word")"
        sep=" "
    done
    echo
}

if [[ $DRY_RUN == 1 ]]; then
    printed
    exit 0
fi

command -v "$PDSERVE" >/dev/null 2>&1 ||
    die "$PDSERVE not found: activate the venv with pdserve installed, or set PDSERVE=/path/to/pdserve"
if [[ $ROLE == router && ${HTTP_HOST:-0.0.0.0} != 127.0.0.1 && -z ${API_KEY:-} ]]; then
    echo "multi_host.sh: note: the router's API on ${HTTP_HOST:-0.0.0.0}:$ROUTER_PORT needs no key" \
        "(set API_KEY to require one)" >&2
fi
mkdir -p "${ENV[0]#FD_LOG_DIR=}"
printed | sed 's/^/multi_host.sh: /' >&2
# exec: this script's PID becomes the process's, so SIGTERM from a supervisor or Ctrl-C reaches
# it directly and it drains (nodes finish or abort in-flight requests, then exit 0).
exec env "${ENV[@]}" "${CMD[@]}"
