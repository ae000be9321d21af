#!/bin/sh
# Flower CLI steps of the compose demo, run inside the app image (installed as /app/bin/fedtan-cli).
#
#   fedtan-cli run                 wait for the SuperNodes, submit the FedTAN run with
#                                  `flwr run --stream`, print the run's logs as they come, and exit
#                                  0 only if the run finished as completed.
#   fedtan-cli register KEY.pub... register SuperNode public keys with the SuperLink
#                                  (`flwr supernode register`; TLS + SuperNode auth only).
#
# Environment (defaults in brackets):
#   SUPERLINK_ADDRESS       the SuperLink's host:port                      [superlink:9093]
#   FLWR_ROOT_CERTIFICATES  CA certificate to trust; empty means plaintext (insecure)     []
#   FEDTAN_NUM_SUPERNODES   SuperNodes to wait for; also passed as run config num-clients [3]
#   FEDTAN_WAIT_S           how long to wait for the SuperLink and the SuperNodes       [300]
#   FEDTAN_PROJECT_DIR      the Flower app to submit                          [/app/project]
#   FEDTAN_RUN_CONFIG_FILE  run config TOML, relative to the project    [configs/digits.toml]
#   FEDTAN_OUTPUT_DIR       output-dir as the ServerApp's container sees it (the mounted
#                           results folder)                       [/app/outputs/digits-fedtan]
#   FEDTAN_GRPC_RUN_CONFIG  run config of the grpc transport (set by docker/with-grpc.yml)     []
#   FEDTAN_TLS_RUN_CONFIG   TLS run config of that transport (set by docker/with-tls.yml)      []
#   FEDTAN_RUN_CONFIG       extra run config overrides, e.g. 'num-rounds=2 lr=0.05'          []
set -eu

SUPERLINK_ADDRESS="${SUPERLINK_ADDRESS:-superlink:9093}"
FLWR_ROOT_CERTIFICATES="${FLWR_ROOT_CERTIFICATES:-}"
FEDTAN_NUM_SUPERNODES="${FEDTAN_NUM_SUPERNODES:-3}"
FEDTAN_WAIT_S="${FEDTAN_WAIT_S:-300}"
FEDTAN_PROJECT_DIR="${FEDTAN_PROJECT_DIR:-/app/project}"
FEDTAN_RUN_CONFIG_FILE="${FEDTAN_RUN_CONFIG_FILE:-configs/digits.toml}"
FEDTAN_OUTPUT_DIR="${FEDTAN_OUTPUT_DIR:-/app/outputs/digits-fedtan}"
FEDTAN_GRPC_RUN_CONFIG="${FEDTAN_GRPC_RUN_CONFIG:-}"
FEDTAN_TLS_RUN_CONFIG="${FEDTAN_TLS_RUN_CONFIG:-}"
FEDTAN_RUN_CONFIG="${FEDTAN_RUN_CONFIG:-}"
FLWR_HOME="${FLWR_HOME:-$HOME/.flwr}"
export FLWR_HOME

say() { printf '[fedtan-cli] %s\n' "$*"; }

write_flwr_config() {
    # Federations live in $FLWR_HOME/config.toml in Flower 1.42; "docker" is this SuperLink.
    mkdir -p "$FLWR_HOME"
    {
        printf '[superlink]\ndefault = "docker"\n\n[superlink.docker]\n'
        printf 'address = "%s"\n' "$SUPERLINK_ADDRESS"
        if [ -n "$FLWR_ROOT_CERTIFICATES" ]; then
            printf 'root-certificates = "%s"\n' "$FLWR_ROOT_CERTIFICATES"
        else
            printf 'insecure = true\n'
        fi
    } > "$FLWR_HOME/config.toml"
}

# Print how many SuperNodes the SuperLink lists as online; fail if it cannot be asked.
online_supernodes() {
    flwr supernode list docker --format json 2>/dev/null | python -c '
import json, sys
nodes = json.load(sys.stdin).get("nodes", [])
print(sum(1 for n in nodes if n.get("status") == "online"))'
}

wait_for_supernodes() {
    deadline=$(( $(date +%s) + FEDTAN_WAIT_S ))
    say "waiting for ${FEDTAN_NUM_SUPERNODES} SuperNodes at ${SUPERLINK_ADDRESS} (at most ${FEDTAN_WAIT_S} s)"
    while :; do
        n=$(online_supernodes || echo "?")
        if [ "$n" != "?" ] && [ "$n" -ge "$FEDTAN_NUM_SUPERNODES" ]; then
            say "${n} SuperNodes online"
            return 0
        fi
        if [ "$(date +%s)" -ge "$deadline" ]; then
            say "gave up: ${n} of ${FEDTAN_NUM_SUPERNODES} SuperNodes online after ${FEDTAN_WAIT_S} s"
            return 1
        fi
        sleep 2
    done
}

MERGE_RUN_CONFIG='
import sys
import tomllib

import tomli_w
from flwr.common.config import flatten_dict, parse_config_args

source, merged, *overrides = sys.argv[1:]
with open(source, "rb") as f:
    config = flatten_dict(tomllib.load(f))
for line in overrides:
    config.update(parse_config_args([line]))
with open(merged, "wb") as f:
    tomli_w.dump(config, f)
print("[fedtan-cli] run config:", " ".join(f"{k}={v!r}" for k, v in config.items()))
'

cmd_run() {
    write_flwr_config
    wait_for_supernodes
    tmp=$(mktemp -d)
    # `flwr run` takes either one TOML file or key=value pairs, so merge them into one file: the
    # config file, then num-clients and output-dir, then what the compose override files set
    # (FEDTAN_GRPC_RUN_CONFIG, FEDTAN_TLS_RUN_CONFIG), then FEDTAN_RUN_CONFIG (later ones win).
    python -c "$MERGE_RUN_CONFIG" "${FEDTAN_PROJECT_DIR}/${FEDTAN_RUN_CONFIG_FILE}" \
        "$tmp/run-config.toml" \
        "num-clients=${FEDTAN_NUM_SUPERNODES} output-dir=\"${FEDTAN_OUTPUT_DIR}\"" \
        "$FEDTAN_GRPC_RUN_CONFIG" "$FEDTAN_TLS_RUN_CONFIG" "$FEDTAN_RUN_CONFIG"
    say "submitting ${FEDTAN_PROJECT_DIR} to ${FEDTAN_NUM_SUPERNODES} SuperNodes"
    # `flwr run --stream` follows the run's logs until the run ends.
    rc=0
    flwr run "$FEDTAN_PROJECT_DIR" docker --stream --run-config "$tmp/run-config.toml" 2>&1 \
        | tee "$tmp/flwr-run.log" || rc=$?
    run_id=$(sed -n 's/.*Successfully started run \([0-9][0-9]*\).*/\1/p' "$tmp/flwr-run.log" \
        | head -n 1)
    rm -rf "$tmp"
    if [ -z "$run_id" ]; then
        say "the run was not started (flwr run exit code ${rc})"
        return 1
    fi
    status=$(flwr ls docker --run-id "$run_id" --format json | python -c '
import json, sys
runs = json.load(sys.stdin).get("runs", [])
print(runs[0]["status"] if runs else "unknown")')
    say "run ${run_id}: ${status}"
    [ "$status" = "finished:completed" ]
}

cmd_register() {
    [ "$#" -gt 0 ] || { say "usage: fedtan-cli register KEY.pub..."; return 2; }
    write_flwr_config
    deadline=$(( $(date +%s) + FEDTAN_WAIT_S ))
    until online_supernodes >/dev/null; do
        if [ "$(date +%s)" -ge "$deadline" ]; then
            say "SuperLink ${SUPERLINK_ADDRESS} not reachable after ${FEDTAN_WAIT_S} s"
            return 1
        fi
        sleep 2
    done
    for key in "$@"; do
        say "registering $(basename "$key")"
        flwr supernode register "$key" docker
    done
}

case "${1:-}" in
    run) shift; cmd_run "$@" ;;
    register) shift; cmd_register "$@" ;;
    *) say "usage: fedtan-cli run | fedtan-cli register KEY.pub..."; exit 2 ;;
esac
