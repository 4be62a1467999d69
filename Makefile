# Two commands on a fresh machine:  make demo   |   make test
# Each bootstraps .venv on first use (torch is pinned to the CPU wheel 2.13.0).
VENV   ?= .venv
PYTHON ?= python3
BIN     = $(VENV)/bin
STAMP   = $(VENV)/.fedal-installed

.PHONY: demo test install clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	FLWR_TELEMETRY_ENABLED=0 $(BIN)/fedal simulate --overwrite --baseline random

test: $(STAMP)
	FLWR_TELEMETRY_ENABLED=0 $(BIN)/python -m pytest

clean:
	rm -rf $(VENV) build *.egg-info runs
