#!/usr/bin/env bash
# Sourced by benchmarks/run_gpu_sim.sh and run_gpu_suite.sh on the GPU machine: NVIDIA's EGL for MuJoCo
# (the debs in .gl), the carried wheels installed under /tmp/simsite (WHEELS, default .whl_sim, plus
# .whl where present: robosteer's pure-Python needs), and the environment for rendering. A second call
# on the same (warm) machine finds both done and only sets the environment. SKIP_GL=1 leaves / alone
# (a dry run elsewhere). Prepare the carried folders here with benchmarks/prepare_gpu_sim.sh.
wheels=${WHEELS:-.whl_sim}
if [[ ! -f /tmp/simsite/.installed ]]; then
    if ! ls "$wheels"/robosuite-*.whl >/dev/null 2>&1 || { [[ -z "${SKIP_GL:-}" ]] && ! ls .gl/*.deb >/dev/null 2>&1; }; then
        echo "gpu_sim_env: no $wheels/robosuite-*.whl or .gl/*.deb: run benchmarks/prepare_gpu_sim.sh where PyPI" \
             "is reachable and carry .whl_sim and .gl to this machine" >&2
        return 2 2>/dev/null || exit 2
    fi
    if [[ -z "${SKIP_GL:-}" ]]; then
        for f in .gl/*.deb; do dpkg -x "$f" /; done
        ldconfig
    fi
    declare -A seen=()
    files=()
    for f in "$wheels"/*.whl .whl/*.whl; do  # one of each wheel: the same one in both folders stops pip
        [[ -f $f && -z ${seen[$(basename "$f")]:-} ]] || continue
        seen[$(basename "$f")]=1
        files+=("$f")
    done
    ${PYTHON:-python3} -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/simsite \
        "${files[@]}" || { return 1 2>/dev/null || exit 1; }
    touch /tmp/simsite/.installed
fi
vendor=/usr/local/nvidia/share/glvnd/egl_vendor.d/10_nvidia.json
[[ -z "${SKIP_GL:-}" && -f $vendor ]] && export __EGL_VENDOR_LIBRARY_FILENAMES=$vendor
export PYTHONPATH=/tmp/simsite:$PWD${PYTHONPATH:+:$PYTHONPATH} MUJOCO_GL=egl PYOPENGL_PLATFORM=egl PYTHONUNBUFFERED=1
