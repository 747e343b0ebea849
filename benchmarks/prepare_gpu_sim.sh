#!/usr/bin/env bash
# What the GPU scripts carry to the GPU machine, fetched here once (PyPI and Debian are reachable from
# here, nothing is from there): wheels for its Python 3.12 in .whl_sim (MuJoCo, robosuite) and .whl
# (robosteer's small pure-Python needs the image lacks, for run_gpu.sh and run_gpu_suite.sh), and the
# EGL loader debs in .gl (docs/sim.md, "GPU machine"). robosuite's wheel is 157 MB, over the 64 MiB a
# device call may carry, almost all robot meshes: the copy here keeps the Panda, its gripper and mount,
# the textures and every non-mesh file (~33 MB). Run from the repository root:
#     bash benchmarks/prepare_gpu_sim.sh
set -euo pipefail
mkdir -p .git/info
for dir in /.whl_sim/ /.whl/ /.gl/; do
    grep -qsx "$dir" .git/info/exclude || echo "$dir" >>.git/info/exclude
done
rm -rf .whl_sim .whl
mkdir -p .whl_sim .whl .gl
plat=(--platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64
      --platform manylinux2014_x86_64 --platform manylinux1_x86_64)
# the device image has numpy, scipy, numba, opencv, pillow, pyyaml and torch; sim_throughput needs these too
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp "${plat[@]}" \
    -d .whl_sim mujoco==3.3.7 robosuite==1.5.2 glfw termcolor omegaconf==2.3.1 PyOpenGL==3.1.10
python3 -m pip wheel -q --no-deps -w .whl_sim antlr4-python3-runtime==4.9.3  # omegaconf's; PyPI has its sdist only
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp "${plat[@]}" \
    -d .whl hydra-core==1.3.8 omegaconf==2.3.1 simplejpeg==1.9.0 lz4==4.4.5 google-crc32c==1.9.0
cp .whl_sim/antlr4_python3_runtime-*.whl .whl/
python3 - <<'PY'
import pathlib
import zipfile

keep_robots, keep_grippers, keep_bases = {"panda"}, {"panda_gripper"}, {"rethink_mount", "rethink_minimal_mount"}
assets = "robosuite/models/assets/"


def dropped(name: str) -> bool:
    """Meshes of robots, grippers and bases the sim tasks do not use, and pybullet's data."""
    if name.startswith(assets + "bullet_data/"):
        return True
    parts = name[len(assets):].split("/") if name.startswith(assets) else []
    if len(parts) > 2 and parts[0] == "robots" and parts[2] in ("meshes", "obj_meshes"):
        return parts[1] not in keep_robots
    if len(parts) > 2 and parts[0] in ("grippers", "bases") and parts[1] in ("meshes", "obj_meshes"):
        return parts[2] not in (keep_grippers if parts[0] == "grippers" else keep_bases)
    return False


wheel = next(pathlib.Path(".whl_sim").glob("robosuite-*.whl"))
trimmed = wheel.with_suffix(".tmp")
with zipfile.ZipFile(wheel) as src, zipfile.ZipFile(trimmed, "w", zipfile.ZIP_DEFLATED) as dst:
    for info in src.infolist():
        if not dropped(info.filename):
            dst.writestr(info, src.read(info))
trimmed.replace(wheel)
print(f"trimmed {wheel.name}: {wheel.stat().st_size / 1e6:.1f} MB")
PY
lists=$(mktemp -d)
mkdir -p "$lists/partial"
o=(-oAPT::Architecture=amd64 -oAPT::Architectures=amd64 "-oDir::State::Lists=$lists")
apt-get "${o[@]}" update -qq
(cd .gl && apt-get "${o[@]}" download libvulkan1 libegl1 libglvnd0 libopengl0 libgl1 libglx0 libgles2)
du -sh .whl_sim .whl .gl
