# asvp-ray: `make demo` and `make test` do all their own set-up on a fresh machine.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(VENV)/bin/pip
STAMP  := $(VENV)/.installed
OUT    ?= runs/demo

.PHONY: demo test venv data bench clean help

help:  ## list targets
	@grep -E '^[a-z-]+:.*##' Makefile | sed 's/:.*##/\t/'

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q -e '.[test]'
	touch $(STAMP)

venv: $(STAMP)  ## create .venv and install asvp-ray with its dependencies

data: $(STAMP)  ## make sure the Fashion-MNIST files are present (apt, else verified download)
	$(PY) -m asvp_ray.data.fashion_mnist ensure

demo: data  ## install, fetch data, run the main job (ASVP on Fashion-MNIST, local Ray)
	$(VENV)/bin/asvp-ray run examples/fashion_mnist.yaml --out $(OUT)

test: data  ## install, fetch data, run the whole test suite
	$(VENV)/bin/python -m pytest -q tests

bench: data  ## run the benchmarks in bench/
	$(PY) bench/extract.py

clean:  ## remove the virtual environment and local runs
	rm -rf $(VENV) runs
