# Two commands for a fresh machine: `make study` and `make test` (see README).
PYTHON ?= python3
VENV ?= .venv
PROFILE ?= quick
BIN := $(VENV)/bin
COMMA := ,
# a profile with an `nnunet:` section (aasce) also installs the nnunet extra: nnU-Net v2, the study's peer
EXTRAS ?= $(shell grep -qs '^nnunet:' params/$(PROFILE).yaml && echo ",nnunet")
STAMP := $(VENV)/.spineseg-installed$(subst $(COMMA),-,$(EXTRAS))

.PHONY: install study smoke test check sigint-check lint report bench lab clean-runs

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --progress-bar on -e ".[dev$(EXTRAS)]"
	touch $(STAMP)

install: $(STAMP)

study: install  ## run every stage notebook for PROFILE (default: quick) with papermill
	$(BIN)/spineseg run --profile $(PROFILE)

smoke: install
	$(BIN)/spineseg run --profile smoke

test: install  ## every test, the smoke study end to end included (what CI runs)
	$(BIN)/python -m pytest

check: install  ## the tests a developer runs while editing: all but the slow ones (smoke study, Dask, bench)
	$(BIN)/python -m pytest -m "not slow"

sigint-check: install  ## twenty single Ctrl-Cs at varied moments of the smoke run: each must exit 130 within 10 s (~6 min)
	$(BIN)/python scripts/sigint_check.py

lint: install  ## ruff, and the import contract (the library never imports spineseg.study)
	$(BIN)/ruff check src tests scripts
	$(BIN)/lint-imports --no-cache

report: install  ## the rendered notebooks of PROFILE as HTML without code: runs/PROFILE/report/
	$(BIN)/spineseg report --profile $(PROFILE)

bench: install
	$(BIN)/spineseg bench --profile $(PROFILE)

lab: install
	$(BIN)/jupyter lab notebooks/

clean-runs:
	rm -rf runs figures/*/
