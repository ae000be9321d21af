#!/usr/bin/env bash
# Run the FedTAN app in Flower's Ray simulation, offline, and stop the local SuperLink after.
# Usage: scripts/run_simulation.sh [run-config.toml] [num-supernodes] [extra federation config]
set -euo pipefail
cd "$(dirname "$0")/.."
RUN_CONFIG=${1:-configs/digits.toml}
NODES=${2:-5}
EXTRA=${3:-}
export FLWR_HOME=${FLWR_HOME:-$PWD/.flwr}
# Use the installed environment; Flower would otherwise `uv sync` one per run (needs internet).
export FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1
PORT=${FLWR_LOCAL_SUPERLINK_HTTP_API_PORT:-39091}
mkdir -p "$FLWR_HOME"
[ -f "$FLWR_HOME/config.toml" ] || cat > "$FLWR_HOME/config.toml" <<'TOML'
[superlink]
default = "local"

[superlink.local]
address = ":local-in-memory:"
TOML
stop_superlink() { pkill -INT -f "flower-superlink .*--port $PORT" 2>/dev/null || true; }
trap stop_superlink EXIT
flwr run . local --run-config "$RUN_CONFIG" --stream \
    --federation-config "num-supernodes=$NODES client-resources-num-cpus=1 $EXTRA"
