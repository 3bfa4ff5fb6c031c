# The whole set-up: `make demo` runs the main job on the embedded default, `make test` runs the checks.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

DEMO_SUBSET ?= 20000
DEMO_EPOCHS ?= 5

.PHONY: test demo fashion-mnist lint clean gpu-carry

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[dev]'
	touch $(STAMP)

# Debian's dataset-fashion-mnist is the embedded default dataset; without root, the loader falls back
# to torchvision's download.
fashion-mnist:
	@test -d /usr/share/datasets/fashion-mnist || \
	  { command -v apt-get >/dev/null && \
	    { [ "$$(id -u)" = 0 ] && SUDO= || SUDO="sudo -n"; \
	      $$SUDO apt-get install -y -q dataset-fashion-mnist >/dev/null 2>&1 || \
	      { $$SUDO apt-get update -q >/dev/null 2>&1 && $$SUDO apt-get install -y -q dataset-fashion-mnist >/dev/null; }; }; } || \
	  echo "dataset-fashion-mnist not installed; the loader will try torchvision's download"

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

test: $(STAMP) fashion-mnist lint
	$(BIN)/python -m pytest -q

# A 2-member peer-Gutout ensemble on Fashion-MNIST, on the CPU, in under 5 minutes; everything lands in runs/demo.
demo: $(STAMP) fashion-mnist
	rm -rf runs/demo
	$(BIN)/gutout train fashion-mnist --ensemble 2 --subset $(DEMO_SUBSET) --epochs $(DEMO_EPOCHS) --device cpu \
	  --name demo --out runs --wandb offline

# What bench/gpu_check.sh needs on a GPU machine that can install nothing: Fashion-MNIST's files and the
# pytorch-grad-cam wheels, in git-ignored folders to carry along (.data, .whl).
gpu-carry: $(STAMP) fashion-mnist
	mkdir -p .data/fashion-mnist .whl
	cp /usr/share/datasets/fashion-mnist/*.gz .data/fashion-mnist/
	$(BIN)/python -m pip wheel -q --no-deps grad-cam==1.5.7 ttach==0.0.3 -w .whl

clean:
	rm -rf $(VENV) runs .pytest_cache .ruff_cache
