# The two set-up commands of the README:  make demo  and  make test  (each creates .venv if missing).
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# The torch build to install first. Without an NVIDIA GPU: torch 2.13.0 (these machines carry its CPU
# build on disk, 0.9 GB installed, against 5.5 GB for the CUDA build with its NVIDIA libraries) and
# the torchvision made for it. With one: the CUDA build of 2.14.1. Override: make TORCH_SPEC="...".
# NEED_GB: the free disk the install wants (environment plus pip's downloads; README "Installation").
ifeq ($(shell command -v nvidia-smi 2>/dev/null),)
TORCH_SPEC ?= torch==2.13.0 torchvision==0.28.0
NEED_GB ?= 6
else
TORCH_SPEC ?= torch==2.14.1 torchvision==0.29.1
NEED_GB ?= 11
endif
PYTEST_MARKERS ?= not slow and not gpu
export MUJOCO_GL ?= egl

.PHONY: install demo test lint format clean

# No wheel cache and no byte-compiling of every installed module: together about 1.5 GB less
# disk at the install's peak (modules still compile on first import).
PIP_INSTALL := $(BIN)/pip install -q --no-cache-dir --no-compile
# A full install takes about 4 GB with the CPU torch (TensorFlow 1.3, torch 0.9, robosuite 0.5) and
# about 8.5 GB with the CUDA one, plus the downloads while pip runs; say so (NEED_GB above) before
# pip fails half-way with ENOSPC.

$(BIN)/python:
	@free=$$(df -Pk "$$(dirname "$(VENV)")" | awk 'NR == 2 {print int($$4 / 1048576)}'); \
	echo "install: $$free GB free on this disk; a full install needs about $(NEED_GB) GB"; \
	if [ "$$free" -lt $(NEED_GB) ]; then \
	  echo "install: warning: less than $(NEED_GB) GB free, pip may stop with 'No space left on device';" \
	       "free some space or put the environment on a larger disk (make VENV=/path/to/venv ...)" >&2; \
	fi
	$(PY) -m venv $(VENV)
	$(PIP_INSTALL) --upgrade pip

# With a CPU torch, PyPI's torchvision (built against CUDA torch) cannot load its C++ ops and then
# fails to import at all; .ci/site/_robosteer_cpu_torchvision.py, loaded by a .pth file, lets it
# import with those ops reported unavailable (robosteer uses none of them). Nothing is written for
# a CUDA torch.
$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(PIP_INSTALL) $(TORCH_SPEC)
	@site=$$($(BIN)/python -c "import sysconfig; print(sysconfig.get_paths()['purelib'])"); \
	rm -f "$$site/robosteer-cpu-torchvision.pth"; \
	if $(BIN)/python -c "import sys, torch; sys.exit(torch.version.cuda is not None)"; then \
	  printf '%s\nimport _robosteer_cpu_torchvision; _robosteer_cpu_torchvision.install()\n' "$(CURDIR)/.ci/site" \
	    > "$$site/robosteer-cpu-torchvision.pth"; \
	  echo "install: CPU torch: wrote $$site/robosteer-cpu-torchvision.pth"; \
	fi
	$(PIP_INSTALL) -e '.[all,dev]'
	$(BIN)/python -c "import torch, torchvision, timm; print('install: torch', torch.__version__, \
	  'torchvision', torchvision.__version__, 'timm', timm.__version__)"
	touch $@

install: $(VENV)/.installed

# The main job on the embedded default, no download (docs/sim.md): a small mixed-quality sim
# collection (4 tasks x 8 episodes, 64 px), a short value-learning run on it, and an evaluation of
# the scripted experts. Idempotent: a written dataset is kept (an interrupted collection resumes),
# training resumes from its checkpoint, evaluation runs only missing episodes.
DEMO_DATA ?= datasets/demo
demo: install
	test -f $(DEMO_DATA)/robosteer_sim_suite/1.0.0/dataset_info.json || \
		$(BIN)/python collect_sim.py task=suite episodes=8 sim.image_size=64 data_dir=$(DEMO_DATA)
	$(BIN)/python train_value.py +experiment=cpu_small data.data_dir=$(DEMO_DATA) data.datasets.sim.val_fraction=0.15 \
		steps=200 log_every=50 val_every=200 ckpt_every=200 name=demo
	$(BIN)/python eval_sim.py policy=scripted sim=suite sim.image_size=64 episodes=3 videos=1 name=demo

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

test: lint
	$(BIN)/python -m pytest -m "$(PYTEST_MARKERS)" -q

format: install
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

clean:
	rm -rf $(VENV) runs datasets .pytest_cache .ruff_cache
