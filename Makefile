# The two set-up commands of the README:  make demo  and  make test  (each creates .venv if missing).
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# The torch build to install first (these machines carry 2.14.1 on disk; elsewhere pick yours).
TORCH_SPEC ?= torch==2.14.1 torchvision==0.29.1
PYTEST_MARKERS ?= not slow and not gpu
export MUJOCO_GL ?= egl

.PHONY: install demo test lint format clean

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q $(TORCH_SPEC)
	$(BIN)/pip install -q -e '.[all,dev]'
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
