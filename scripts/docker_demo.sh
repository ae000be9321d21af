#!/usr/bin/env bash
# End-to-end run of the Docker deployment (docker/compose.yml) on a machine that has no image
# registry, as root, leaving nothing behind (a fresh Debian machine will do: missing tools are
# installed with apt and stay installed):
#
#   1. starts a private Docker engine (own data root, exec root and socket in a temp folder; no
#      default bridge, no iptables/ip_forward changes), stopped by its pid at the end;
#   2. builds stand-ins for flwr/superlink, flwr/supernode and flwr/superexec 1.42.0 from a
#      debootstrapped Debian bookworm (Python 3.11) with flwr installed
#      (docker/local-base/Dockerfile);
#   3. builds the app image (docker/Dockerfile) on the stand-in, passing BASE_IMAGE;
#      pip inside the builds reads wheels that the host downloads from PyPI and serves on
#      127.0.0.1 (TORCH_VARIANT=cuda: PyTorch's CPU wheel index is not reachable here);
#   4. runs the documented one command (`up ... --exit-code-from submit submit`) with a short
#      run config, bounded in time, and checks the results in the mounted folder;
#   5. with --tls, does the same again with docker/with-tls.yml (certificates from
#      docker/generate-certs.sh, in the temp folder);
#   6. `docker-compose down -v`, removes the images, stops the engine, deletes the temp folder,
#      and checks that the host's iptables rules, ip_forward and interfaces are as before
#      (a difference fails the demo).
# Never silent: a failing command ends the demo with "FAILED ... at line N (function): command",
# and the cleanup of step 6 runs after a failure, Ctrl-C or TERM (timeout) as after success.
# With --grpc every run adds docker/with-grpc.yml: FedTAN's BN sync channel (transport = "grpc")
# between the ServerApp's and the ClientApps' containers, over TLS too with --tls; the checks
# then also want transport "grpc" in config.json and one round trip (the train message) per round
# with no BN statistics in Flower messages, and, while the ServerApp runs, a probe from a
# ClientApp container dials superexec-serverapp:9095 as the clients do (under TLS: verified
# against the CA and the name, and a plaintext channel must be refused).
#
# Usage: sudo scripts/docker_demo.sh [--tls] [--grpc] [--no-plain] [--log FILE]
#   log: docs/results/docker_demo.log, or docs/results/docker_demo_grpc.log with --grpc
# Environment:
#   FEDTAN_DEMO_RUN_CONFIG   run config overrides for the plain run           [num-rounds=2]
#   FEDTAN_DEMO_TLS_RUN_CONFIG  the same for the TLS run                      [num-rounds=1]
#   FEDTAN_DEMO_TIMEOUT_S    time limit of each compose run, seconds          [1500]
#   FEDTAN_DEMO_CACHE        folder to keep the Debian root filesystem and the wheels in
#                            between runs (default: none, everything in the temp folder)
#   FEDTAN_DEMO_STORAGE_DRIVER  overlay2 | vfs                  [overlay2 if it works]
#   FEDTAN_DEMO_MIRROR       Debian mirror for debootstrap    [http://deb.debian.org/debian]
#   FEDTAN_DEMO_RUNS_AFTER   a file: the compose runs wait, once the images are built, until it
#                            exists (CI builds beside its tests and runs on a quieter machine)
#   TMPDIR                   where the temp folder goes (needs ~12 GB with overlay2)
# Traffic: the host's package clients (apt/debootstrap, pip download), the builds to the
# wheelhouse on 127.0.0.1, and the containers among themselves on their compose network
# (the SuperLink's port is published on 127.0.0.1 only).
set -Eeuo pipefail

# ================================================================== checks and cleanup
# Functions only, down to the `return` below: tests/test_docker_demo.py sources this file and
# runs them against stubbed commands (empty firewall, nothing found). Every check here must
# print a result, not fail, when what it looks for is absent: under `set -o pipefail` a grep
# that finds nothing ends the script.

say() { printf '[docker_demo +%4ss] %s\n' "$(( $(date +%s) - ${T0:-$(date +%s)} ))" "$*"; }

# The host's firewall rules (packet counters aside), forwarding switches and network interfaces,
# compared at the end: the engine must leave them as they were. A fresh host has no rules (or
# no iptables at all): that is an empty section, not an error.
host_net_state() {
    local rules
    rules="$( { iptables-save 2>/dev/null || true; ip6tables-save 2>/dev/null || true; } \
        | sed -E -e '/^#/d' -e 's/ ?\[[0-9]+:[0-9]+\]//')"
    [ -z "$rules" ] || printf '%s\n' "$rules"
    echo "net.ipv4.ip_forward=$(sysctl -n net.ipv4.ip_forward 2>/dev/null || true)"
    echo "net.ipv6.conf.all.forwarding=$(sysctl -n net.ipv6.conf.all.forwarding 2>/dev/null || true)"
    { ip -o link show 2>/dev/null || true; } | awk -F': ' '{sub(/@.*/, "", $2); print "link " $2}' \
        | sort
}

# One line about a host_net_state file: forwarding switches and how many interfaces.
host_net_summary() {  # host_net_summary FILE
    local forwarding links
    forwarding="$(sed -n '/_forward\|forwarding/p' "$1" | tr '\n' ' ')"
    links="$(awk '/^link / {n++} END {print n + 0}' "$1")"
    echo "iptables/ip6tables rules ($(awk '/^[-:*]/ {n++} END {print n + 0}' "$1") lines)," \
        "ip_forward (${forwarding% }), network interfaces ($links)"
}

# Whether the FORWARD chain drops bridged packets (br_netfilter on, policy DROP): containers
# might then not reach each other. Absent sysctl or iptables means no.
forward_drops_bridged() {
    [ "$(sysctl -n net.bridge.bridge-nf-call-iptables 2>/dev/null || true)" = 1 ] || return 1
    { iptables -S FORWARD 2>/dev/null || true; } | awk '$0 == "-P FORWARD DROP" {f = 1} END {exit !f}'
}

# Whether /proc/net/tcp* text on stdin has a socket listening (state 0A) on PORT.
listening_on() {  # listening_on PORT < /proc/net/tcp
    awk -v p="$(printf ':%04X' "$1")" '$2 ~ p"$" && $4 == "0A" {f = 1} END {exit !f}'
}

# The images of this demo with their sizes; "none" when there are none.
list_images() {  # list_images PREFIX
    local lines
    lines="$({ docker images --format '{{.Repository}}:{{.Tag}}  {{.Size}}' || true; } \
        | awk -v p="$1/" 'index($0, p) == 1')"
    printf '%s\n' "${lines:-none}" | sed 's/^/    /'
}

# The probe's verdict: its last line is OK. A missing or empty file is a failed probe.
probe_passed() {  # probe_passed FILE
    [ -s "$1" ] && [ "$(tail -n 1 "$1")" = OK ]
}

# Unmount what the engine left under its roots (netns, overlay), deepest first.
unmount_under() {  # unmount_under DIR
    { findmnt -rn -o TARGET 2>/dev/null || true; } | awk -v d="$1/" 'index($0, d) == 1' \
        | sort -r | while read -r m; do umount -l "$m" 2>/dev/null || true; done
}

# How many lines COMMAND prints, or why that is unknown (it failed: the engine is not answering).
count_lines() {  # count_lines COMMAND...
    local out
    out="$("$@" 2>/dev/null)" || { echo "unknown ($1 failed)"; return 0; }
    printf '%s' "$out" | awk 'END {print NR}'
}

# ERR: say where and what failed, then exit with its code; the EXIT trap cleans up.
on_error() {  # on_error LINE COMMAND (from the ERR trap; $? is the failed command's code)
    local rc=$?
    trap - ERR
    say "FAILED with exit code $rc at line $1 (${FUNCNAME[1]:-main}): $2"
    exit "$rc"
}

# Stop and remove everything this script started or made, check the host, say how it ended.
cleanup() {
    local rc=$?
    set +eEu
    trap - EXIT ERR INT TERM
    say "cleaning up"
    if [ -n "${PROBE_PID:-}" ]; then kill "$PROBE_PID" 2>/dev/null; wait "$PROBE_PID" 2>/dev/null; fi
    if [ -n "${DOCKERD_PID:-}" ] && kill -0 "$DOCKERD_PID" 2>/dev/null; then
        if [ "${#COMPOSE_FILES[@]}" -gt 0 ]; then
            compose down -v --remove-orphans --rmi all >/dev/null 2>&1
        fi
        docker ps -aq | xargs -r docker rm -f >/dev/null 2>&1
        docker system prune -af --volumes >/dev/null 2>&1
        say "containers left: $(count_lines docker ps -aq)," \
            "images left: $(count_lines docker images -qa)," \
            "networks left: $(count_lines docker network ls -q --filter type=custom)"
        kill -TERM "$DOCKERD_PID"
        for _ in $(seq 60); do kill -0 "$DOCKERD_PID" 2>/dev/null || break; sleep 1; done
        if kill -0 "$DOCKERD_PID" 2>/dev/null; then kill -KILL "$DOCKERD_PID"; fi
        say "dockerd (pid $DOCKERD_PID) stopped"
    fi
    if [ -n "${HTTP_PID:-}" ]; then kill "$HTTP_PID" 2>/dev/null; wait "$HTTP_PID" 2>/dev/null; fi
    if [ -n "${WORK:-}" ] && [ -d "$WORK" ]; then
        if [ -f "$WORK/host-net.before" ]; then
            if host_net_state | diff "$WORK/host-net.before" - > "$WORK/host-net.diff"; then
                say "host unchanged: $(host_net_summary "$WORK/host-net.before")"
            else
                rc=$(( rc == 0 ? 1 : rc ))
                say "the host's firewall, forwarding or interfaces differ from the start" \
                    "(another program, or this engine):"
                sed 's/^/    /' "$WORK/host-net.diff"
            fi
        fi
        unmount_under "$WORK"
        rm -rf "$WORK"
        say "removed $WORK"
    fi
    if [ "$rc" -eq 0 ]; then say "exit code 0"; else say "exit code $rc (see the lines above)"; fi
    exit "$rc"
}

install_traps() {
    trap 'on_error "$LINENO" "$BASH_COMMAND"' ERR
    trap cleanup EXIT
    trap 'say "interrupted"; exit 130' INT
    trap 'say "terminated"; exit 143' TERM
}

compose() { docker-compose -p "$PROJECT" "${COMPOSE_FILES[@]}" "$@"; }

# Sourced (by the tests): functions only.
if [ "${BASH_SOURCE[0]}" != "$0" ]; then return 0; fi

# ================================================================== main
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
ARGS="$*"
RUN_PLAIN=1
RUN_TLS=0
RUN_GRPC=0
LOG=""
while [ "$#" -gt 0 ]; do
    case "$1" in
        --tls) RUN_TLS=1; shift ;;
        --grpc) RUN_GRPC=1; shift ;;
        --no-plain) RUN_PLAIN=0; shift ;;
        --log) [ "$#" -ge 2 ] || { echo "--log needs a file" >&2; exit 2; }; LOG="$2"; shift 2 ;;
        -h|--help) sed -n '2,/^set -Eeuo/p' "$0" | sed '$d'; exit 0 ;;
        *) echo "unknown argument: $1 (see --help)" >&2; exit 2 ;;
    esac
done
if [ -z "$LOG" ]; then
    LOG="$ROOT/docs/results/docker_demo.log"
    [ "$RUN_GRPC" -eq 0 ] || LOG="$ROOT/docs/results/docker_demo_grpc.log"
fi
RUN_CONFIG="${FEDTAN_DEMO_RUN_CONFIG:-num-rounds=2}"
TLS_RUN_CONFIG="${FEDTAN_DEMO_TLS_RUN_CONFIG:-num-rounds=1}"
TIMEOUT_S="${FEDTAN_DEMO_TIMEOUT_S:-1500}"
MIRROR="${FEDTAN_DEMO_MIRROR:-http://deb.debian.org/debian}"
FLWR_VERSION=1.42.0
PREFIX=fedtan-demo
PROJECT="fedtan-demo-$$"
WORK=""
DOCKERD_PID=""
HTTP_PID=""
PROBE_PID=""
COMPOSE_FILES=()

mkdir -p "$(dirname "$LOG")"
: > "$LOG"
# tee ignores INT and TERM: a Ctrl-C or `timeout` signals the whole process group, and the
# cleanup that follows must still be able to write (a dead tee would end it with SIGPIPE).
exec > >(trap '' INT TERM; exec tee -a "$LOG") 2>&1
T0=$(date +%s)
install_traps
say "scripts/docker_demo.sh $ARGS (runs: plain $RUN_PLAIN, tls $RUN_TLS; grpc $RUN_GRPC)"

[ "$(id -u)" -eq 0 ] || { say "needs root (it starts its own dockerd)"; exit 1; }

# ------------------------------------------------------------------ tools
missing=()
for tool in dockerd docker docker-compose debootstrap openssl ssh-keygen findmnt; do
    command -v "$tool" >/dev/null || missing+=("$tool")
done
if [ "${#missing[@]}" -gt 0 ]; then
    say "installing Debian packages for: ${missing[*]}"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
        docker.io docker-compose debootstrap openssl openssh-client util-linux >/dev/null
fi
HOST_PY="$ROOT/.venv/bin/python"
[ -x "$HOST_PY" ] || HOST_PY="$(command -v python3)"
"$HOST_PY" -c 'import sys; assert sys.version_info[:2] == (3, 11), sys.version' || {
    say "the wheels are downloaded for the image's Python 3.11: run this with a Python 3.11 host"
    exit 1
}
say "docker-compose: $(docker-compose version --short), dockerd: $(dockerd --version)"

# ------------------------------------------------------------------ temp folder
WORK="$(mktemp -d "${TMPDIR:-/tmp}/fedtan-docker-demo.XXXXXX")"
host_net_state > "$WORK/host-net.before"
say "host before: $(host_net_summary "$WORK/host-net.before")"
CACHE="${FEDTAN_DEMO_CACHE:-$WORK/cache}"
mkdir -p "$CACHE"
D="$WORK/engine"
mkdir -p "$D"
export DOCKER_HOST="unix://$D/docker.sock"

# ------------------------------------------------------------------ the engine
DRIVER="${FEDTAN_DEMO_STORAGE_DRIVER:-}"
if [ -z "$DRIVER" ]; then
    mkdir -p "$WORK/ovl/l" "$WORK/ovl/u" "$WORK/ovl/w" "$WORK/ovl/m"
    if mount -t overlay overlay -o "lowerdir=$WORK/ovl/l,upperdir=$WORK/ovl/u,workdir=$WORK/ovl/w" \
        "$WORK/ovl/m" 2>/dev/null; then
        umount "$WORK/ovl/m"
        DRIVER=overlay2
    else
        DRIVER=vfs
        say "overlay mounts do not work here: vfs (every layer and container is a full copy;" \
            "the CUDA app image then needs about 60 GB)"
    fi
    rm -rf "$WORK/ovl"
fi
if forward_drops_bridged; then
    say "note: FORWARD policy is DROP with br_netfilter on; containers may not reach each other" \
        "(this engine runs with --iptables=false and adds no rules)"
fi
say "starting dockerd ($DRIVER) in $D"
# In its own session: a Ctrl-C or `timeout` signals this script's process group, and the engine
# must stay up until the cleanup has taken the compose project down and removed its networks.
setsid dockerd --data-root "$D/root" --exec-root "$D/exec" --pidfile "$D/dockerd.pid" \
    -H "$DOCKER_HOST" --storage-driver "$DRIVER" \
    --bridge none --iptables=false --ip-forward=false --ip-masq=false \
    > "$WORK/dockerd.log" 2>&1 &
DOCKERD_PID=$!
for _ in $(seq 60); do docker info >/dev/null 2>&1 && break; sleep 1; done
docker info >/dev/null 2>&1 || { tail -20 "$WORK/dockerd.log"; say "dockerd did not start"; exit 1; }
say "engine up: $(docker info --format '{{.ServerVersion}} {{.Driver}}')"

# ------------------------------------------------------------------ base filesystem
ROOTFS_TAR="$CACHE/bookworm-rootfs.tar"
if [ ! -s "$ROOTFS_TAR" ]; then
    say "debootstrap bookworm (minbase + python3, python3-venv, ca-certificates)"
    debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates \
        bookworm "$WORK/rootfs" "$MIRROR" > "$WORK/debootstrap.log" 2>&1 \
        || { tail -20 "$WORK/debootstrap.log"; exit 1; }
    rm -rf "$WORK/rootfs/var/cache/apt/archives/"*.deb "$WORK/rootfs/var/lib/apt/lists/"*
    tar -C "$WORK/rootfs" -cf "$ROOTFS_TAR" .
    rm -rf "$WORK/rootfs"
fi
docker import -c 'CMD ["/bin/bash"]' "$ROOTFS_TAR" "$PREFIX/debian:bookworm" >/dev/null
say "imported $PREFIX/debian:bookworm ($(du -h "$ROOTFS_TAR" | cut -f1))"

# ------------------------------------------------------------------ wheelhouse on loopback
WHEELS="$CACHE/wheels"
mkdir -p "$WHEELS"
say "downloading the locked wheels on the host"
"$HOST_PY" -m pip download --no-deps --only-binary=:all: -d "$WHEELS" \
    -r "$ROOT/docker/requirements.lock" -r "$ROOT/docker/requirements-cuda.lock" \
    > "$WORK/pip-download.log" 2>&1 || { tail -20 "$WORK/pip-download.log"; exit 1; }
PORT="$("$HOST_PY" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')"
"$HOST_PY" -m http.server --bind 127.0.0.1 --directory "$WHEELS" "$PORT" \
    > "$WORK/wheelhouse.log" 2>&1 &
HTTP_PID=$!
for _ in $(seq 20); do
    "$HOST_PY" -c "import urllib.request; urllib.request.urlopen('http://127.0.0.1:$PORT/')" \
        2>/dev/null && break
    sleep 0.5
done
say "wheelhouse: $(ls "$WHEELS" | wc -l) wheels, $(du -sh "$WHEELS" | cut -f1), on 127.0.0.1:$PORT"
PIP_ARGS=(--build-arg "PIP_FIND_LINKS=http://127.0.0.1:$PORT/" --build-arg PIP_NO_INDEX=1)

build() {  # build NAME LOGFILE docker-build-args...
    local name="$1" logf="$2"; shift 2
    local t=$(date +%s)
    docker build --network host "${PIP_ARGS[@]}" "$@" > "$logf" 2>&1 \
        || { tail -30 "$logf"; say "building $name failed"; exit 1; }
    say "built $name in $(( $(date +%s) - t ))s"
}

# ------------------------------------------------------------------ stand-ins for Flower's images
for target in superlink supernode superexec; do
    build "$PREFIX/flwr-$target:$FLWR_VERSION" "$WORK/build-$target.log" \
        -f "$ROOT/docker/local-base/Dockerfile" --target "$target" \
        --build-arg "DEBIAN_IMAGE=$PREFIX/debian:bookworm" \
        -t "$PREFIX/flwr-$target:$FLWR_VERSION" "$ROOT/docker"
done
docker run --rm --network none "$PREFIX/flwr-superlink:$FLWR_VERSION" --version

# ------------------------------------------------------------------ the app image
# The build context is the project's files as git sees them (tracked, plus untracked ones that
# are not ignored): no .venv, data or outputs, whatever the checkout holds.
CTX="$WORK/context"
mkdir -p "$CTX"
git -C "$ROOT" ls-files -co --exclude-standard -z | (cd "$ROOT" && tar --null -T - -cf -) \
    | tar -C "$CTX" -xf -
APP_IMAGE="$PREFIX/app:0.1.0"
build "$APP_IMAGE" "$WORK/build-app.log" -f "$CTX/docker/Dockerfile" \
    --build-arg "BASE_IMAGE=$PREFIX/flwr-superexec:$FLWR_VERSION" \
    --build-arg TORCH_VARIANT=cuda -t "$APP_IMAGE" "$CTX"
awk '/^flwr .*torch/' "$WORK/build-app.log" | sed 's/^/    /'
say "image sizes:"
list_images "$PREFIX"
say "app image layers (newest first):"
docker history --format '{{.Size}}\t{{.CreatedBy}}' "$APP_IMAGE" > "$WORK/history.txt"
head -n 8 "$WORK/history.txt" | cut -c1-110 | sed 's/^/    /'
say "runs as: $(docker run --rm --network none --entrypoint id "$APP_IMAGE")"

# ------------------------------------------------------------------ the runs
export FLWR_SUPERLINK_IMAGE="$PREFIX/flwr-superlink:$FLWR_VERSION"
export FLWR_SUPERNODE_IMAGE="$PREFIX/flwr-supernode:$FLWR_VERSION"
export FLWR_SUPEREXEC_IMAGE="$PREFIX/flwr-superexec:$FLWR_VERSION"
export FEDTAN_IMAGE="$APP_IMAGE"
export SUPERLINK_HOST_PORT="$PORT"  # free a moment ago; the wheelhouse is done with it below
export COMPOSE_HTTP_TIMEOUT=300

demo_run() {  # demo_run NAME RUN_CONFIG compose-files...
    local name="$1" run_config="$2"; shift 2
    export FEDTAN_RUN_CONFIG="$run_config"
    COMPOSE_FILES=(-f "$ROOT/docker/compose.yml")
    for f in "$@"; do COMPOSE_FILES+=(-f "$ROOT/docker/$f"); done
    export FEDTAN_OUTPUTS_DIR="$WORK/outputs-$name"
    mkdir -p "$FEDTAN_OUTPUTS_DIR"   # owned by root: outputs-init must open it up
    say "=== $name: docker-compose ${COMPOSE_FILES[*]} up --no-build" \
        "--abort-on-container-exit --exit-code-from submit submit (run config: $run_config)"
    local t=$(date +%s) rc=0
    if [ "$RUN_GRPC" -eq 1 ]; then
        probe_bn_sync "$WORK/probe-$name.txt" &
        PROBE_PID=$!
    fi
    timeout "$TIMEOUT_S" docker-compose -p "$PROJECT" "${COMPOSE_FILES[@]}" up --no-build \
        --no-color --abort-on-container-exit --exit-code-from submit submit || rc=$?
    say "=== $name: compose exited with $rc after $(( $(date +%s) - t ))s"
    if [ -n "$PROBE_PID" ]; then
        kill "$PROBE_PID" 2>/dev/null; wait "$PROBE_PID" 2>/dev/null; PROBE_PID=""
    fi
    compose ps
    compose logs --no-color > "$WORK/compose-$name.log" 2>&1 || true
    say "last lines of every service's log:"
    for svc in $(compose config --services); do
        { compose logs --no-color "$svc" 2>/dev/null || true; } \
            | awk '!/uvicorn[.]access/' | tail -n 4 | cut -c1-200
    done
    compose down -v --remove-orphans >/dev/null 2>&1 || true
    [ "$rc" -eq 0 ] || { say "$name: the run did not finish as completed"; return 1; }
    check_outputs "$FEDTAN_OUTPUTS_DIR/digits-fedtan" "$name" "$run_config" || return 1
    if [ "$RUN_GRPC" -eq 1 ]; then
        check_grpc "$name" "$WORK/probe-$name.txt" "$FEDTAN_OUTPUTS_DIR/digits-fedtan"
    fi
}

# Dial the BN sync service from superexec-clientapp-1 the way the ClientApps do, once the
# ServerApp listens (checked in /proc/net/tcp*, cheaply, every 2 s); the result goes to FILE.
BN_SYNC_PORT="${FEDTAN_BN_SYNC_PORT:-9095}"
PROBE_PY='
import socket, ssl, sys
import grpc
addr, ca = sys.argv[1], sys.argv[2]
host, port = addr.rsplit(":", 1)

def ready(channel):
    try:
        grpc.channel_ready_future(channel).result(timeout=5)
        return True
    except grpc.FutureTimeoutError:
        return False
    finally:
        channel.close()

if not ca:
    ok = ready(grpc.insecure_channel(addr))
    print(f"plaintext gRPC channel to {addr}:", "ready" if ok else "FAILED")
    sys.exit(0 if ok else 1)
ctx = ssl.create_default_context(cafile=ca)  # checks the chain and the name, as gRPC does
ctx.set_alpn_protocols(["h2"])
with socket.create_connection((host, int(port)), 5) as raw:
    with ctx.wrap_socket(raw, server_hostname=host) as tls:
        cert = tls.getpeercert()
        print(f"TLS handshake with {addr}: {tls.version()}, verified against {ca} for {host!r};",
              "subject", dict(x[0] for x in cert["subject"]).get("commonName"),
              "SANs", ", ".join(f"{k}:{v}" for k, v in cert["subjectAltName"]))
with open(ca, "rb") as f:
    ok_tls = ready(grpc.secure_channel(addr, grpc.ssl_channel_credentials(f.read())))
ok_plain = ready(grpc.insecure_channel(addr))
print(f"TLS gRPC channel to {addr}:", "ready" if ok_tls else "FAILED",
      "| plaintext gRPC channel:", "ready (NOT expected)" if ok_plain else "refused (as expected)")
sys.exit(0 if ok_tls and not ok_plain else 1)
'
probe_bn_sync() {  # probe_bn_sync FILE (in the background)
    local ca="" server client
    [ -z "${FEDTAN_CERTS_DIR:-}" ] || ca=/app/certs/ca.crt
    : > "$1"
    while :; do
        sleep 2
        server=$(docker ps -q --filter "label=com.docker.compose.project=$PROJECT" \
            --filter label=com.docker.compose.service=superexec-serverapp || true)
        client=$(docker ps -q --filter "label=com.docker.compose.project=$PROJECT" \
            --filter label=com.docker.compose.service=superexec-clientapp-1 || true)
        [ -n "$server" ] && [ -n "$client" ] || continue
        # local_address :PORT with state 0A (LISTEN)
        (docker exec "$server" cat /proc/net/tcp /proc/net/tcp6 2>/dev/null || true) \
            | listening_on "$BN_SYNC_PORT" || continue
        if docker exec "$client" python -c "$PROBE_PY" "superexec-serverapp:$BN_SYNC_PORT" \
            "$ca" > "$1.try" 2>&1; then
            mv "$1.try" "$1"
            echo "OK" >> "$1"
            return 0
        fi
        mv "$1.try" "$1"
        sleep 10
    done
}

check_outputs() {  # check_outputs DIR NAME RUN_CONFIG
    say "$2: results in the mounted folder ($1):"
    ls -l "$1" | sed 's/^/    /'
    "$HOST_PY" - "$1" "$3" <<'EOF'
import json, sys
from pathlib import Path
out, run_config = Path(sys.argv[1]), sys.argv[2]
summary = json.loads((out / "summary.json").read_text())
rows = json.loads((out / "metrics.json").read_text())
want = dict(kv.split("=", 1) for kv in run_config.split()).get("num-rounds")
print("    summary:", json.dumps(summary)[:400])
print("    last metrics row:", json.dumps(rows[-1])[:400] if rows else None)
assert (out / "model.pt").stat().st_size > 0, "no model.pt"
assert (out / "metrics.csv").stat().st_size > 0, "no metrics.csv"
assert "completed" in json.dumps(summary), "summary does not say completed"
if want is not None:
    assert len(rows) == int(want), f"{len(rows)} metric rows for {want} rounds"
print("    OK: summary, metrics (json, csv) and model.pt are there")
EOF
}

check_grpc() {  # check_grpc NAME PROBE_FILE DIR: the run used the BN sync channel
    local want=plain
    [ -z "${FEDTAN_CERTS_DIR:-}" ] || want=TLS
    say "$1: the BN sync channel (transport grpc, $want), probed from superexec-clientapp-1:"
    { cut -c1-300 "$2" 2>/dev/null || echo "(the probe wrote nothing)"; } | sed 's/^/    /'
    probe_passed "$2" || { say "$1: the probe of the BN sync service failed"; return 1; }
    "$HOST_PY" - "$3" "$want" <<'EOF'
import json, sys
from pathlib import Path
out, want = Path(sys.argv[1]), sys.argv[2]
config = json.loads((out / "config.json").read_text())
rows = json.loads((out / "metrics.json").read_text())
flat = {k.replace("-", "_"): v for k, v in config.items()}
keys = ("transport", "bn_sync_host", "bn_sync_port", "bn_sync_address", "bn_sync_timeout",
        "bn_sync_certfile", "bn_sync_ca_certfile")
print("    config:", {k: flat.get(k) for k in keys})
print("    round trips per round:", [r["round_trips"] for r in rows],
      "| BN bytes in Flower messages:", [r["bn_bytes_down"] + r["bn_bytes_up"] for r in rows])
assert flat["transport"] == "grpc", flat["transport"]
assert flat["bn_sync_address"].startswith("superexec-serverapp:"), flat["bn_sync_address"]
assert bool(flat.get("bn_sync_certfile")) == (want == "TLS"), flat.get("bn_sync_certfile")
# One Flower message per client and round (train.fedtan); the 2L exchanges went over the
# channel, so no BN statistics travelled in Flower messages.
assert all(r["round_trips"] == 1 for r in rows), [r["round_trips"] for r in rows]
assert all(r["bn_bytes_down"] + r["bn_bytes_up"] == 0 for r in rows)
print("    OK: the synced steps ran over the BN sync channel")
EOF
}

kill "$HTTP_PID" 2>/dev/null || true; wait "$HTTP_PID" 2>/dev/null || true; HTTP_PID=""

# Flower's containers on a machine loaded by other work can miss their own deadlines (seen: the
# ClientApps' task tokens refused after a slow round), so a caller can hold the runs back.
if [ -n "${FEDTAN_DEMO_RUNS_AFTER:-}" ]; then
    say "images built; the compose runs wait for $FEDTAN_DEMO_RUNS_AFTER"
    while [ ! -e "$FEDTAN_DEMO_RUNS_AFTER" ]; do sleep 2; done
    say "$FEDTAN_DEMO_RUNS_AFTER is there: starting the compose runs"
fi

status=0
GRPC_FILES=()
SUFFIX=""
if [ "$RUN_GRPC" -eq 1 ]; then GRPC_FILES=(with-grpc.yml); SUFFIX="-grpc"; fi
if [ "$RUN_PLAIN" -eq 1 ]; then
    demo_run "plain$SUFFIX" "$RUN_CONFIG" "${GRPC_FILES[@]}" || status=1
fi
if [ "$RUN_TLS" -eq 1 ]; then
    export FEDTAN_CERTS_DIR="$WORK/certs"
    FEDTAN_CERTS_DIR="$FEDTAN_CERTS_DIR" bash "$ROOT/docker/generate-certs.sh" \
        --owner 49999:49999
    openssl x509 -in "$FEDTAN_CERTS_DIR/bn-sync.crt" -noout -subject -ext subjectAltName \
        | sed 's/^/    bn-sync.crt: /'
    demo_run "tls$SUFFIX" "$TLS_RUN_CONFIG" with-tls.yml "${GRPC_FILES[@]}" || status=1
fi
df -h "$WORK" | tail -n 1 | sed 's/^/    disk: /'
docker system df | sed 's/^/    /'
if [ "$status" -eq 0 ]; then say "DEMO PASSED"; else say "DEMO FAILED"; fi
exit "$status"
