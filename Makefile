# Quick start:  make demo   (set-up + the default experiment, offline)
#               make test   (set-up + the test suite)
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
FASHION_MNIST := /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz

.PHONY: setup setup-onnx data demo test clean-venv

setup: $(VENV)/.installed

# The package itself, editable (scripts and tests import gpfq from this checkout), with the test tools.
$(VENV)/.installed: requirements.txt pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade pip -q
	$(PY) -m pip install -e ".[dev]"
	touch $@

# The optional ONNX extra (export and ONNX Runtime): `make test` installs it, so its tests run.
setup-onnx: $(VENV)/.installed-onnx

$(VENV)/.installed-onnx: $(VENV)/.installed
	$(PY) -m pip install -e ".[dev,onnx]"
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

test: setup setup-onnx data
	$(PY) -m pytest -q tests

clean-venv:
	rm -rf $(VENV)
