# make demo  -> the whole tiny pipeline (synthetic data, 3 stages, baselines, evaluation, report)
# make test  -> unit tests + every notebook under nbval
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin

.PHONY: demo test venv clean

venv: $(VENV)/.installed

$(VENV)/.installed: requirements.txt pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --no-compile -r requirements.txt
	$(BIN)/pip install -q --no-compile --no-deps -e .
	$(BIN)/pip install -q --no-compile "diffusers==0.42.1"
	touch $@

demo: venv
	$(BIN)/python -m minidiffprompt demo

test: venv
	MDP_QUIET=1 $(BIN)/python -m pytest -q --durations=15 tests --nbval-lax notebooks

clean:
	rm -rf runs data/synthref
