#!/usr/bin/env bash
# Sourced by the GPU scripts: install_wheels TARGET DIR... installs the carried wheels of the DIRs (made here by
# benchmarks/prepare_gpu_sim.sh) under TARGET with no index, one of each file name (the same wheel in two folders
# stops pip), and skips those an earlier call on the same machine already installed there (TARGET/.installed).
install_wheels() {
    local target=$1 dir f name
    shift
    local -A seen=()
    local todo=()
    mkdir -p "$target"
    touch "$target/.installed"
    for dir in "$@"; do
        for f in "$dir"/*.whl; do
            name=$(basename "$f")
            [[ -f $f && -z ${seen[$name]:-} ]] || continue
            seen[$name]=1
            grep -qxF "$name" "$target/.installed" || todo+=("$f")
        done
    done
    ((${#todo[@]})) || return 0
    ${PYTHON:-python3} -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$target" \
        "${todo[@]}" || return 1
    for f in "${todo[@]}"; do basename "$f"; done >>"$target/.installed"
}
