# The two commands of the README: `make demo` (the main job) and `make test` (the test suite).
# Both set up .venv on first use (tools/setup_env.sh) and are quick when it is ready.
VENV ?= .venv
PY := $(VENV)/bin/python
export VENV

SETUP_TEST := bash tools/setup_env.sh requirements-compare.txt
# make demo's config (tools/run_demo.py's default); it builds only the datasets this one uses.
DEMO_CONFIG := configs/bundled/queryinst_vis_MNV2_FPN_ctc_psc.yaml

.PHONY: setup data weights demo test test-slow test-all clean-venv

setup:
	@bash tools/setup_env.sh

data: setup
	@$(PY) tools/prepare_datasets.py

weights: setup
	@$(PY) tools/prepare_weights.py

demo: setup weights
	@$(PY) tools/prepare_datasets.py --config-file $(DEMO_CONFIG)
	@$(PY) tools/run_demo.py --config-file $(DEMO_CONFIG)

test:
	@$(SETUP_TEST)
	@$(PY) -m pytest

test-slow:
	@$(SETUP_TEST)
	@$(PY) -m pytest -m slow

test-all:
	@$(SETUP_TEST)
	@$(PY) -m pytest -m "slow or not slow"

clean-venv:
	rm -rf $(VENV)
