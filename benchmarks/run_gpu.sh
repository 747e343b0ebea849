#!/usr/bin/env bash
# Every GPU figure of the benchmarks, in priority order, inside a time budget (a borrowed GPU machine):
#     benchmarks/run_gpu.sh OUT_DIR [SECONDS] [LABEL]
#     ONLY="value_train steer_latency" benchmarks/run_gpu.sh OUT_DIR     # some steps only
# Each benchmark appends its JSON to OUT_DIR/<name>.json and its output to OUT_DIR/log.txt; one that
# fails or runs out of time does not stop the rest, and steps that no longer fit the budget are skipped.
# The value benchmark reads the synthetic bridge_dataset under .bench/value/<EPISODES>ep (default 60), written
# beforehand where TensorFlow is installed (`python benchmarks/value_train.py --cache .bench/value --episodes 60
# --data-only`),
# so nothing here needs TensorFlow or MuJoCo: python3 with a CUDA torch, timm, transformers, and
# robosteer's small dependencies (hydra-core, omegaconf, simplejpeg, lz4, google-crc32c), carried as
# wheels in .whl (benchmarks/prepare_gpu_sim.sh) and installed under /tmp/site here.
set -u
out=${1:?usage: benchmarks/run_gpu.sh OUT_DIR [SECONDS] [LABEL]}
budget=${2:-540}
label=${3:-GPU machine}
py=${PYTHON:-python3}
mkdir -p "$out"
source benchmarks/gpu_wheels.sh  # robosteer's pure-Python needs, carried in .whl
install_wheels /tmp/site .whl || exit 1
export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
log="$out/log.txt"
start=$(date +%s)
export PYTHONUNBUFFERED=1

step() {  # step NAME LIMIT_SECONDS COMMAND...
    local name=$1 limit=$2 left rc lines
    shift 2
    if [[ -n "${ONLY:-}" && " $ONLY " != *" $name "* ]]; then
        return
    fi
    left=$((budget - ($(date +%s) - start)))
    if ((left < 30)); then
        echo "=== $name: skipped, ${left}s of the budget left" | tee -a "$log"
        return
    fi
    ((limit > left)) && limit=$left
    echo "=== $name (limit ${limit}s, at $(($(date +%s) - start))s)" | tee -a "$log"
    lines=$(wc -l <"$log")
    timeout -k 5 "$limit" "$@" >>"$log" 2>&1
    rc=$?
    # a short summary of this step's own output (the whole of it is in the log)
    tail -n +"$((lines + 1))" "$log" | grep -E '"(end_to_end|model|data|kv_over_greedy|met)"|ms  |passed|failed|Error' |
        tail -n 12
    echo "=== $name: rc=$rc, done at $(($(date +%s) - start))s" | tee -a "$log"
}

{
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
    $py -c "import sys, torch, transformers, timm; print(sys.version.split()[0], torch.__version__, transformers.__version__, timm.__version__)"
    nproc
} 2>&1 | tee -a "$log"

vt="$py benchmarks/value_train.py --cache .bench/value --episodes ${EPISODES:-60} --workers 12"
# most needed first (the budget skips what no longer fits): issue 4's end-to-end figure as train_value runs
# by default on CUDA (encoders compiled; V-GPS's separate encoders, then actor_encoder=critic), the eager
# reference, the CUDA tests, issue 6's step / selection, issue 5's latency, then where the update's time goes
step value_train 160 $vt --steps 30 --warmup 5 --label "$label, compiled (default)" --out "$out/value_train.json"
step value_train_shared 130 $vt --steps 30 --warmup 5 --actor-encoder critic --label "$label, compiled, actor_encoder=critic" \
    --out "$out/value_train.json"
step value_train_eager 100 $vt --steps 30 --warmup 5 --no-compile --label "$label, eager" --out "$out/value_train.json"
step gpu_tests 150 $py -m pytest -q -m gpu tests/gpu -p no:cacheprovider
step qsft_step 120 $py benchmarks/qsft_step.py --iters 10 --label "$label" --out "$out/qsft_step.json"
step steer_latency_graphs 100 $py benchmarks/steer_latency.py --cuda-graphs --iters 30 --ks 1 10 50 100 \
    --label "$label, CUDA graphs" --out "$out/steer_latency_graphs.json"
# agent.update alone: where the compiled default's time goes
step value_variants 150 $vt --model-only --steps 15 --warmup 5 --profile 3 --label "$label, compiled, profile" \
    --out "$out/value_variants.json"
step openvla_sampling 180 $py benchmarks/openvla_sampling.py --size real --iters 10 --label "$label, OpenVLA-7B shape" \
    --out "$out/openvla_sampling.json"
step openvla_sampling_hf 120 $py benchmarks/openvla_sampling.py --size real --iters 5 --ks 10 --decoder transformers \
    --label "$label, OpenVLA-7B shape, transformers decoder" --out "$out/openvla_sampling_hf.json"
step steer_latency 100 $py benchmarks/steer_latency.py --label "$label" --out "$out/steer_latency.json"
echo "=== all done at $(($(date +%s) - start))s" | tee -a "$log"
