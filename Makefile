# Quick start:  make demo   (set-up + the default experiment, offline)
#               make test   (set-up + the whole test suite, the slow end-to-end runs included)
#               make test-fast (the edit-test loop: everything not marked slow)
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
FASHION_MNIST := /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz

.PHONY: setup data demo test test-fast clean-venv

setup: $(VENV)/.installed

# The package itself, editable (scripts and tests import gpfq from this checkout), with what the tests need
# (the dev extra: pytest, scikit-image, timm, onnx, onnxruntime, onnxscript).
$(VENV)/.installed: requirements.txt pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade pip -q
	$(PY) -m pip install -e ".[dev]"
	touch $@

# Fashion-MNIST from Debian's package where the machine allows (root or sudo);
# otherwise the code falls back to torchvision's download into data/.
data:
	@if [ ! -f $(FASHION_MNIST) ]; then \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  ( $$SUDO apt-get update -qq && $$SUDO apt-get install -y -qq dataset-fashion-mnist ) \
	  || echo "note: could not install dataset-fashion-mnist; Fashion-MNIST will be downloaded into data/"; \
	fi

demo: setup data
	$(PY) quantization_scripts/quantize.py

# TEST_WORKERS: pytest-xdist processes (one torch thread each); 0 runs the suite in one process.
TEST_WORKERS ?= 2
test: setup data
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile tests

test-fast: setup data
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile -m "not slow" tests

clean-venv:
	rm -rf $(VENV)
