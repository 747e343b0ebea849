#!/usr/bin/env bash
# Issue 3's GPU figure: benchmarks/sim_throughput.py on the GPU machine, rendering with NVIDIA's EGL.
# Carry .whl_sim and .gl (made here by benchmarks/prepare_gpu_sim.sh), then there:
#     bash benchmarks/run_gpu_sim.sh OUT_DIR [LABEL]
# SKIP_GL=1 leaves the debs alone (a dry run on a machine whose / must not change); PYTHON picks the
# interpreter and WHEELS the wheel folder (default .whl_sim); WORKERS, SIZES and SECONDS_PER the
# measurements (default 1 4 8 16 workers, 0 and 128 px, 8 s each), SIM_SECONDS_LIMIT their time limit;
# SIM_ARGS more options of sim_throughput.py (e.g. --pin-cpus).
set -u
out=${1:?usage: benchmarks/run_gpu_sim.sh OUT_DIR [LABEL]}
label=${2:-GPU machine, NVIDIA EGL}
py=${PYTHON:-python3}
mkdir -p "$out"
source benchmarks/gpu_sim_env.sh || exit $?
$py -c "import mujoco, robosuite; print('mujoco', mujoco.__version__, 'robosuite', robosuite.__version__)" || exit 1
nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null
timeout -k 5 "${SIM_SECONDS_LIMIT:-420}" $py benchmarks/sim_throughput.py --workers ${WORKERS:-1 4 8 16} \
    --sizes ${SIZES:-0 128} --seconds "${SECONDS_PER:-8}" --repeats 1 ${SIM_ARGS:-} --label "$label" \
    --out "$out/sim_throughput.json"
