# The whole set-up: `make demo` runs the main job on the embedded default, `make test` runs the checks.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: test demo fashion-mnist lint clean

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

demo: $(STAMP) fashion-mnist
	$(BIN)/python -m gutout.train.saliency_demo

clean:
	rm -rf $(VENV) runs .pytest_cache .ruff_cache
