# Two commands set everything up: `make demo` and `make test`.
PY ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test test-slow clean peers

$(BIN)/python:
	$(PY) -m venv $(VENV) || python3 -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip

$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/pip install --quiet -e ".[test]"
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/haqmoe demo

test: $(STAMP)
	$(BIN)/python -m pytest -q

test-slow: $(STAMP)
	$(BIN)/python -m pytest -q -m slow

clean:
	rm -rf $(VENV) demo-report

# Peer quantizer (llm-compressor) in its own venv: its pins never touch ours. CPU torch wheel.
PEER_VENV := bench/peers/.venv
$(PEER_VENV)/.installed: bench/peers/requirements.txt
	$(PY) -m venv $(PEER_VENV) || python3 -m venv $(PEER_VENV)
	$(PEER_VENV)/bin/pip install --quiet torch==2.13.0 -r bench/peers/requirements.txt
	touch $@

peers: $(PEER_VENV)/.installed
