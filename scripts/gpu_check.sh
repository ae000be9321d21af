#!/usr/bin/env bash
# The GPU check: one script, under 8 minutes on one GPU, that prints what a GPU run needs known.
#
#   1. versions (torch, CUDA, cuDNN) and the TF32 flags;
#   2. the CUDA-marked tests (pytest -m cuda): the in-process engine on CUDA equal to
#      centralized SGD on CUDA (float64 and float32), federated BN on CUDA, the grpc transport
#      with its clients on CUDA;
#   3. seconds per round, ResNet-20, 5 clients x 128 CIFAR-shaped generated images, E = 1 and
#      E = 5: the in-process engine and the Ray simulation over grpc with 1/5 GPU per client
#      (scripts/bench_flower.py), the peak GPU memory of each, and the projected wall time of
#      the reference's 10,000 rounds;
#   4. the same with E = 1 in blocks of rounds (run config rounds-per-message: half the rounds,
#      at least 2), the fast path whose projected 10,000 rounds issue 17 wants under 1 hour,
#      with the BN sync service's calls over gRPC and over sockets (bn-sync-protocol).
#
# Everything also runs on the CPU (only the device differs): "auto" (default) uses the GPU when
# torch sees one; --cpu forces the CPU, with 5 rounds and the CPU parameters of the same tests.
#
#   scripts/gpu_check.sh                   # on a GPU machine: the full check
#   scripts/gpu_check.sh --cpu             # the same on the CPU, fewer rounds
#   scripts/gpu_check.sh --cpu --quick --rounds 3 --batch 4   # in-process rows only (a test)
#
# Options: --rounds N, --batch B (per client), --clients K, --quick (no tests, no simulation).
# Exits non-zero when any step fails; every process it starts is stopped when it ends.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-.venv/bin/python}
[ -x "$PYTHON" ] || PYTHON=python
# Flower's commands (flwr, flower-superlink) from the same environment as that Python.
PATH="$(dirname "$(command -v "$PYTHON")"):$PATH"

MODE=auto ROUNDS="" BATCH=128 CLIENTS=5 QUICK=0
while [ $# -gt 0 ]; do
    case "$1" in
        --cpu) MODE=cpu ;;
        --gpu) MODE=gpu ;;
        --quick) QUICK=1 ;;
        --rounds) ROUNDS=$2; shift ;;
        --batch) BATCH=$2; shift ;;
        --clients) CLIENTS=$2; shift ;;
        -h|--help) sed -n '2,23p' "$0"; exit 0 ;;
        *) echo "gpu_check.sh: unknown option $1 (see --help)" >&2; exit 2 ;;
    esac
    shift
done

HAS_CUDA=$("$PYTHON" -c 'import torch; print(int(torch.cuda.is_available()))')
if [ "$MODE" = auto ]; then
    MODE=$([ "$HAS_CUDA" = 1 ] && echo gpu || echo cpu)
elif [ "$MODE" = gpu ] && [ "$HAS_CUDA" != 1 ]; then
    echo "gpu_check.sh: --gpu asked for, but torch sees no CUDA device" >&2
    exit 1
fi
if [ -z "$ROUNDS" ]; then
    ROUNDS=$([ "$MODE" = gpu ] && echo 50 || echo 5)
fi
# 1/K of the GPU per client, so that all K clients of a round run at once (the grpc transport
# needs them together); none on the CPU.
GPU_SHARE=$([ "$MODE" = gpu ] && "$PYTHON" -c "print(1 / $CLIENTS)" || echo 0)

SAMPLER=""
PEAK_FILE=$(mktemp)
cleanup() {
    if [ -n "$SAMPLER" ]; then kill "$SAMPLER" 2>/dev/null || true; wait "$SAMPLER" 2>/dev/null || true; fi
    rm -f "$PEAK_FILE"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

section() { printf '\n=== %s ===\n' "$*"; }
STARTED=$(date +%s)

section "1. versions and TF32 ($MODE mode)"
"$PYTHON" - <<'PY'
import torch
print(f"torch {torch.__version__}, CUDA {torch.version.cuda}, cuDNN {torch.backends.cudnn.version()}")
if torch.cuda.is_available():
    for i in range(torch.cuda.device_count()):
        p = torch.cuda.get_device_properties(i)
        print(f"cuda:{i}: {p.name}, {p.total_memory / 2**30:.0f} GiB")
else:
    print("no CUDA device: CPU mode")
print(f"TF32: matmul {torch.backends.cuda.matmul.allow_tf32}, cuDNN {torch.backends.cudnn.allow_tf32}")
PY

if [ "$QUICK" = 0 ]; then
    section "2. the CUDA-marked tests"
    if [ "$MODE" = gpu ]; then
        timeout 300 "$PYTHON" -m pytest -q -m cuda -p no:cacheprovider
    else
        # The same tests' CPU parameters: each node id of pytest -m cuda with cuda -> cpu.
        mapfile -t CPU_IDS < <("$PYTHON" -m pytest -q --collect-only -m cuda -p no:cacheprovider \
            | grep '::' | sed -E 's/([[-])cuda([]-])/\1cpu\2/')
        echo "${#CPU_IDS[@]} tests: the CPU parameters of the CUDA-marked ones"
        timeout 900 "$PYTHON" -m pytest -q -p no:cacheprovider "${CPU_IDS[@]}"
    fi
fi

if [ "$MODE" = gpu ]; then
    # Peak memory of the whole GPU (every Ray actor together), sampled twice a second.
    ( while true; do
        nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits 2>/dev/null \
            | head -1 >> "$PEAK_FILE" || true
        sleep 0.5
    done ) &
    SAMPLER=$!
fi

TRANSPORTS=(--transports grpc)
[ "$QUICK" = 1 ] && TRANSPORTS=(--transports)
for E in 1 5; do
    section "3. seconds per round: ResNet-20, $CLIENTS x $BATCH generated CIFAR-shaped images, E = $E, $ROUNDS rounds"
    : > "$PEAK_FILE"
    "$PYTHON" scripts/bench_flower.py --clients "$CLIENTS" --rounds "$ROUNDS" --model resnet20 \
        --dataset synthetic --batch "$BATCH" --local-steps "$E" "${TRANSPORTS[@]}" \
        --gpus-per-client "$GPU_SHARE" --project 10000
    if [ "$MODE" = gpu ]; then
        echo "peak GPU memory in use (nvidia-smi, all processes): $(sort -n "$PEAK_FILE" | tail -1) MiB"
    fi
done

if [ "$QUICK" = 0 ]; then
    BLOCK=$(( ROUNDS / 2 > 2 ? ROUNDS / 2 : 2 ))
    section "4. blocks of rounds: ResNet-20, $CLIENTS x $BATCH, E = 1, $ROUNDS rounds, $BLOCK per Flower message"
    : > "$PEAK_FILE"
    "$PYTHON" scripts/bench_flower.py --clients "$CLIENTS" --rounds "$ROUNDS" --model resnet20 \
        --dataset synthetic --batch "$BATCH" --local-steps 1 --transports grpc \
        --rounds-per-message "$BLOCK" --bn-sync-protocols grpc socket \
        --gpus-per-client "$GPU_SHARE" --project 10000
    if [ "$MODE" = gpu ]; then
        echo "peak GPU memory in use (nvidia-smi, all processes): $(sort -n "$PEAK_FILE" | tail -1) MiB"
    fi
fi
section "done in $(( $(date +%s) - STARTED )) s ($MODE mode)"
