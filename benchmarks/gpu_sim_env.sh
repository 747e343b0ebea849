#!/usr/bin/env bash
# Sourced by benchmarks/run_gpu_sim.sh and run_gpu_suite.sh on the GPU machine: NVIDIA's EGL for MuJoCo
# (the debs in .gl, unpacked once per machine), the carried wheels installed under /tmp/simsite (WHEELS,
# default .whl_sim, plus .whl where present: robosteer's pure-Python needs; benchmarks/gpu_wheels.sh), and
# the environment for rendering. A second call on the same (warm) machine only installs what is new, so it
# can carry checkpoints instead of wheels. SKIP_GL=1 leaves / alone (a dry run elsewhere). Prepare the
# carried folders here with benchmarks/prepare_gpu_sim.sh.
wheels=${WHEELS:-.whl_sim}
if [[ ! -d /tmp/simsite/robosuite ]] && ! ls "$wheels"/robosuite-*.whl >/dev/null 2>&1; then  # not carried, not installed
    echo "gpu_sim_env: no $wheels/robosuite-*.whl: run benchmarks/prepare_gpu_sim.sh where PyPI is reachable and" \
         "carry .whl_sim and .gl to this machine" >&2
    return 2 2>/dev/null || exit 2
fi
if [[ -z "${SKIP_GL:-}" && ! -f /tmp/simsite/.gl_unpacked ]]; then
    if ! ls .gl/*.deb >/dev/null 2>&1; then
        echo "gpu_sim_env: no .gl/*.deb: run benchmarks/prepare_gpu_sim.sh and carry .gl (or SKIP_GL=1)" >&2
        return 2 2>/dev/null || exit 2
    fi
    for f in .gl/*.deb; do dpkg -x "$f" /; done
    ldconfig
    mkdir -p /tmp/simsite && touch /tmp/simsite/.gl_unpacked
fi
source benchmarks/gpu_wheels.sh
install_wheels /tmp/simsite "$wheels" .whl || { return 1 2>/dev/null || exit 1; }
vendor=/usr/local/nvidia/share/glvnd/egl_vendor.d/10_nvidia.json
[[ -z "${SKIP_GL:-}" && -f $vendor ]] && export __EGL_VENDOR_LIBRARY_FILENAMES=$vendor
export PYTHONPATH=/tmp/simsite:$PWD${PYTHONPATH:+:$PYTHONPATH} MUJOCO_GL=egl PYOPENGL_PLATFORM=egl PYTHONUNBUFFERED=1
