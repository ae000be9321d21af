#!/usr/bin/env bash
# Kept for old commands; use `fedtan run` (see README). Runs CONFIG in Flower's Ray simulation
# through the command, which validates the config, stops every process it started and exits
# non-zero unless every round completed.
# Usage: scripts/run_simulation.sh [run-config.toml] [num-supernodes] [extra federation config]
set -euo pipefail
cd "$(dirname "$0")/.."
RUN_CONFIG=${1:-configs/digits.toml}
NODES=${2:-}
EXTRA=${3:-}
FEDERATION="${NODES:+num-supernodes=$NODES }$EXTRA"
exec .venv/bin/fedtan run "$RUN_CONFIG" --federation-config "$FEDERATION"
