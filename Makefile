# The two commands a user needs:  make run  (Redis if needed, the training worker, the backend on :9090)
# and  make test.
# Both create the virtualenv in .venv and install what is missing first.

PYTHON  ?= python3
VENV    ?= .venv
PORT    ?= 9090
WORKERS ?= 1
THREADS ?= 4
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed
# Label Studio (and an S3-compatible server) for the integration tests, in their own virtualenv (its pins differ
# from the backend's)
LS_VENV ?= .venv-label-studio
LS_STAMP := $(LS_VENV)/.installed

.PHONY: install run label-studio test lint bench-predict bench-training bench-epoch bench-rescoring bench-fanout bench-gpu bench-page clean

install: $(STAMP)

$(STAMP): requirements.txt requirements-dev.txt constraints.txt
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 10) else "Python >= 3.10 is required (found " + sys.version.split()[0] + ")")'
	@echo "Installing the backend's packages into $(VENV): PyTorch alone is about 2.5 GB, so the first time takes"
	@echo "several minutes (pip prints nothing until it is done)..."
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -r requirements-dev.txt -c constraints.txt
	@echo "Installed into $(VENV)."
	touch $@

run: install
	VENV=$(VENV) PORT=$(PORT) WORKERS=$(WORKERS) THREADS=$(THREADS) scripts/serve

$(LS_STAMP): tests/integration/requirements.txt tests/integration/constraints.txt
	@echo "Installing Label Studio 1.23.2 for the integration tests into $(LS_VENV) (first time: a few minutes) ..."
	test -x $(LS_VENV)/bin/python || $(PYTHON) -m venv $(LS_VENV)
	$(LS_VENV)/bin/python -m pip install --quiet --upgrade pip
	$(LS_VENV)/bin/python -m pip install --quiet -r tests/integration/requirements.txt -c tests/integration/constraints.txt
	touch $@

# Label Studio 1.23.2 to try the backend with (README), in the integration tests' virtualenv
label-studio: $(LS_STAMP)

test: install $(LS_STAMP)
	LABEL_STUDIO_BIN=$(abspath $(LS_VENV))/bin/label-studio $(BIN)/python -m pytest

lint: install
	$(BIN)/ruff check .

bench-predict: install
	$(BIN)/python -m benchmarks.predict_speed

bench-training: install
	$(BIN)/python -m benchmarks.training_speed

bench-epoch: install
	$(BIN)/python -m benchmarks.epoch_speed

bench-rescoring: install $(LS_STAMP)
	LABEL_STUDIO_BIN=$(abspath $(LS_VENV))/bin/label-studio $(BIN)/python -m benchmarks.rescoring_speed

# A pool re-scored in parts by 1, 2 and 4 scoring workers (docs/speed.md)
bench-fanout: install
	$(BIN)/python -m benchmarks.rescoring_fanout

# The project page with 50 versions (docs/speed.md)
bench-page: install
	$(BIN)/python -m benchmarks.page_speed

# On a machine with one GPU: predict (fp32, half) and epoch time, under 5 minutes
bench-gpu: install
	$(BIN)/python -m benchmarks.gpu_speed

clean:
	rm -rf $(VENV) $(LS_VENV) .cache .pytest_cache .ruff_cache
