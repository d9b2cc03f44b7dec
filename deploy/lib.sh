# shellcheck shell=bash
# Helpers shared by deploy/local_1p1d.sh and deploy/guide_8gpu_1p1d.sh; sourced, never run.
#
# They keep the launch scripts down to the guide's shape (export the node's environment, start
# it) and do the bookkeeping around it: find the Python that has pdserve, wait for /health, send
# one chat request, and stop every node with SIGTERM on any exit (normal end, error, Ctrl-C).
# Progress goes to stderr; stdout carries only the chat response, so callers can parse it.

# PIDs of the nodes started with start_node, stopped in that order's reverse by stop_nodes.
NODE_PIDS=()
NODE_NAMES=()
NODE_LOGS=()

log() { printf '[%s] %s\n' "${0##*/}" "$*" >&2; }
die() {
    log "error: $*"
    exit 1
}

# resolve_python: set PYTHON to an interpreter that can import pdserve: PYTHON from the
# environment, else python or python3 from PATH (an activated venv puts its own first), else the
# interpreter of the `pdserve` command on PATH. Checked from / so that a checkout in the current
# directory does not pass for an installation.
resolve_python() {
    local candidate candidates=()
    if [[ -n ${PYTHON:-} ]]; then
        candidates=("$PYTHON")
    else
        candidates=(python python3)
        if command -v pdserve >/dev/null 2>&1; then
            candidate=$(head -n 1 "$(command -v pdserve)")
            [[ $candidate != '#!'* ]] || candidates+=("${candidate#'#!'}")
        fi
    fi
    for candidate in "${candidates[@]}"; do
        if command -v "$candidate" >/dev/null 2>&1 &&
            (cd / && "$candidate" -c 'import pdserve.cli') 2>/dev/null; then
            PYTHON=$candidate
            return
        fi
    done
    if [[ -n ${PYTHON:-} ]]; then
        die "PYTHON=$PYTHON cannot import pdserve"
    fi
    die "no python on PATH can import pdserve: activate the venv you ran 'pip install -e .' in," \
        "or set PYTHON=/path/to/venv/bin/python"
}

# json_escape STRING: STRING as the inside of a JSON string (backslashes, quotes, newlines, tabs).
json_escape() {
    local s=$1
    s=${s//\\/\\\\}
    s=${s//\"/\\\"}
    s=${s//$'\n'/\\n}
    s=${s//$'\t'/\\t}
    printf '%s' "$s"
}

# start_node NAME LOG_FILE COMMAND...: run COMMAND in a background subshell, stdout and stderr to
# LOG_FILE, and remember it for stop_nodes. COMMAND is a function that exports the node's
# environment (inside that subshell only) and execs the server, so $! is the server's own PID
# and SIGTERM reaches it directly.
start_node() {
    local name=$1 log_file=$2
    shift 2
    "$@" >"$log_file" 2>&1 &
    NODE_PIDS+=("$!")
    NODE_NAMES+=("$name")
    NODE_LOGS+=("$log_file")
    log "started $name (pid $!), console output in $log_file"
}

# show_log INDEX: the last lines a node wrote, to explain a failure.
show_log() {
    local i=$1
    log "last lines of ${NODE_NAMES[i]}'s output (${NODE_LOGS[i]}):"
    tail -n 30 "${NODE_LOGS[i]}" >&2 || true
}

# wait_healthy INDEX URL TIMEOUT_S: poll URL/health until it answers 200; fail at once if the
# node exits first (stop_nodes then shows what it wrote), or after TIMEOUT_S.
wait_healthy() {
    local i=$1 url=$2 timeout_s=$3 waited=0
    local pid=${NODE_PIDS[i]} name=${NODE_NAMES[i]}
    while ! curl -sf --max-time 2 -o /dev/null "$url/health"; do
        if ! kill -0 "$pid" 2>/dev/null; then
            die "$name exited before it became healthy" # stop_nodes shows its output
        fi
        if ((waited >= timeout_s * 5)); then
            show_log "$i"
            die "$name was not healthy at $url/health after ${timeout_s}s"
        fi
        sleep 0.2
        waited=$((waited + 1))
    done
    log "$name is healthy at $url"
}

# chat_once URL MODEL PROMPT MAX_TOKENS: POST one non-streamed chat completion, print the
# response body on stdout, fail unless it is HTTP 200 with an assistant message in it.
chat_once() {
    local url=$1 model=$2 prompt=$3 max_tokens=$4 body response status
    body=$(printf '{"model": "%s", "messages": [{"role": "user", "content": "%s"}], "max_tokens": %d, "temperature": 0}' \
        "$(json_escape "$model")" "$(json_escape "$prompt")" "$max_tokens")
    response=$(mktemp)
    log "POST $url/v1/chat/completions: $body"
    # -w prints the status; the body goes to a file, so an error body is shown, not lost.
    status=$(curl -sS --max-time "${REQUEST_TIMEOUT:-120}" -o "$response" -w '%{http_code}' \
        -H 'Content-Type: application/json' -d "$body" "$url/v1/chat/completions") || status=000
    cat "$response"
    echo
    if [[ $status != 200 ]]; then
        rm -f "$response"
        die "chat request failed with HTTP status $status"
    fi
    if ! grep -Eq '"object": *"chat\.completion"' "$response" ||
        ! grep -Eq '"content": *"[^"]' "$response"; then
        rm -f "$response"
        die "the response is not a chat completion with content"
    fi
    rm -f "$response"
}

# stop_nodes: SIGTERM every node still running (newest first: decode before prefill), wait up to
# STOP_TIMEOUT seconds for each to drain and exit, SIGKILL what is left. Returns 1 if a node did
# not exit 0 (a node drains and exits 0 on SIGTERM; anything else is a failure to report).
stop_nodes() {
    local i pid name rc failed=0 waited
    for ((i = ${#NODE_PIDS[@]} - 1; i >= 0; i--)); do
        pid=${NODE_PIDS[i]}
        if kill -TERM "$pid" 2>/dev/null; then
            log "SIGTERM to ${NODE_NAMES[i]} (pid $pid)"
        fi
    done
    for ((i = ${#NODE_PIDS[@]} - 1; i >= 0; i--)); do
        pid=${NODE_PIDS[i]} name=${NODE_NAMES[i]} waited=0
        while kill -0 "$pid" 2>/dev/null && ((waited < ${STOP_TIMEOUT:-30} * 5)); do
            sleep 0.2
            waited=$((waited + 1))
        done
        if kill -0 "$pid" 2>/dev/null; then
            log "$name did not stop in ${STOP_TIMEOUT:-30}s: SIGKILL"
            kill -KILL "$pid" 2>/dev/null || true
        fi
        rc=0
        wait "$pid" 2>/dev/null || rc=$?
        if ((rc == 0)); then
            log "$name stopped (exit code 0)"
        else
            log "$name exited with code $rc"
            # after Ctrl-C a node still starting dies of the signal: its traceback is no news
            [[ -n ${INTERRUPTED:-} ]] || show_log "$i"
            failed=1
        fi
    done
    NODE_PIDS=() NODE_NAMES=() NODE_LOGS=()
    return "$failed"
}

# on_exit: the EXIT trap. Stops the nodes and exits non-zero if the script failed or a node did.
on_exit() {
    local status=$?
    trap - EXIT INT TERM
    set +e
    stop_nodes || { ((status != 0)) || status=1; }
    if ((status == 0)); then
        log "done; node logs under ${LOG_ROOT:-.}"
    else
        log "failed (exit code $status); node logs under ${LOG_ROOT:-.}"
    fi
    exit "$status"
}

# on_signal CODE: Ctrl-C (130) or SIGTERM (143). While serve_until_stopped serves, that is how a
# server is meant to stop: exit 0 if the nodes drain cleanly. Before, it is an interruption.
# Either way the exit runs the EXIT trap, which stops the nodes.
on_signal() {
    INTERRUPTED=1
    if [[ -n ${SERVING:-} ]]; then
        log "stopping"
        exit 0
    fi
    log "interrupted"
    exit "$1"
}

# install_traps: stop the nodes however the script ends (`wait` returns at once on a signal).
install_traps() {
    trap on_exit EXIT
    trap 'on_signal 130' INT
    trap 'on_signal 143' TERM
}

# serve_until_stopped: keep the nodes up until Ctrl-C or SIGTERM (the traps then stop them and
# exit) or until a node exits by itself, which is a failure.
serve_until_stopped() {
    log "serving; Ctrl-C (or SIGTERM to pid $$) stops both nodes"
    local rc=0
    SERVING=1
    wait -n || rc=$? # returns when any node exits; a trapped signal interrupts it at once
    SERVING=
    die "a node exited by itself (exit code $rc)"
}
