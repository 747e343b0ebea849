#!/usr/bin/env bash
# Issues 5 and 6 on the GPU machine: eval_sim arms on the simulated suite, >= 50 episodes per task, the
# same seeds in every arm, W environment workers on the machine's cores, the policy and critic on the GPU.
#     POLICY=<train_policy run or checkpoint> CRITIC=<train_value run or checkpoint> \
#         bash benchmarks/run_gpu_suite.sh OUT_DIR [ARM ...]
# Arms (default: base steered random): base (the policy alone), steered (V-GPS with CRITIC, K, BETA),
# random (the same steering with an untrained critic: the sanity check), qsft (QSFT=<train_qsft run>,
# QSFT_BETA). POLICY_NAME (vla), TASKS (suite: every task; or e.g. lift+stack), EPISODES (50 per task),
# SEED (1000), IMAGE_SIZE (64), WORKERS (16), K (10), BETA (0: the argmax), EXTRA (more eval_sim
# overrides for every arm). Carry .whl_sim, .gl (benchmarks/prepare_gpu_sim.sh), .whl (robosteer's pure-Python
# needs: hydra-core, omegaconf, antlr4, simplejpeg, lz4, google-crc32c) and the checkpoints; with more than
# 64 MiB in all, carry the wheels in a first call that only sources benchmarks/gpu_sim_env.sh, then the
# checkpoints in a second call while the machine is warm. Writes OUT_DIR/suite_runs.tar.gz (every arm's
# eval_sim directory, videos off) and OUT_DIR/compare.md (python -m sim.report: per task, paired tests).
set -u
out=${1:?usage: POLICY=... CRITIC=... benchmarks/run_gpu_suite.sh OUT_DIR [ARM ...]}
shift
arms=("$@")
((${#arms[@]})) || arms=(base steered random)
py=${PYTHON:-python3}
mkdir -p "$out"
source benchmarks/gpu_sim_env.sh || exit $?
runs=$(mktemp -d)
common=(sim=suite "sim.task=${TASKS:-suite}" "sim.image_size=${IMAGE_SIZE:-64}" "episodes=${EPISODES:-50}"
        "seed=${SEED:-1000}" "runner.workers=${WORKERS:-16}" videos=0 "run_root=$runs" ${EXTRA:-})
base=(policy="${POLICY_NAME:-vla}" "policy.checkpoint=${POLICY:-}")  # checked below, for the arms that run it
steer=(steer=true "steering.k=${K:-10}" "steering.beta=${BETA:-0}")
start=$(date +%s)
done_arms=()
for arm in "${arms[@]}"; do
    if [[ $arm != qsft && -z ${POLICY:-} ]]; then
        echo "run_gpu_suite: the $arm arm needs POLICY=<train_policy run dir>" >&2
        exit 2
    fi
    case $arm in
        base) args=("${base[@]}") ;;
        steered) args=("${base[@]}" "${steer[@]}" "steering.critic=${CRITIC:?CRITIC=<train_value run dir>}") ;;
        random) args=("${base[@]}" "${steer[@]}" steering.critic=random) ;;
        qsft) args=(policy=qsft "policy.checkpoint=${QSFT:?QSFT=<train_qsft run dir>}" "policy.beta=${QSFT_BETA:-100}") ;;
        *) echo "run_gpu_suite: unknown arm $arm (base, steered, random, qsft)" >&2; exit 2 ;;
    esac
    echo "=== $arm (at $(($(date +%s) - start)) s)"
    $py eval_sim.py "${args[@]}" "${common[@]}" "name=$arm" 2>&1 | grep -v -E "WARNING|SyntaxWarning|__logo__" | tail -n 12
    [[ -f $runs/eval_sim/$arm/summary.json ]] && done_arms+=("$runs/eval_sim/$arm")
done
echo "=== done at $(($(date +%s) - start)) s"
if ((${#done_arms[@]} > 1)); then
    $py -m sim.report "${done_arms[@]}" --out "$runs/compare" && cp "$runs/compare/"*.md "$out/" 2>/dev/null
fi
tar -czf "$out/suite_runs.tar.gz" -C "$runs" eval_sim $( [[ -d $runs/compare ]] && echo compare )
ls -la "$out"
