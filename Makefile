# Two commands set everything up: `make demo` and `make test`.
PY ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test test-slow clean peers peers-moe peers-asym peers-moe-asym peers-moefied peers-moefied-asym peer-llamacpp peer-llamacpp-default \
	peer-llamacpp-all

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

# The peer's W8A8 checkpoints, calibrated on exactly our calibration tokens (128 x 512, wikitext2:valid,
# seed 0), one rule per (model, preset): the stock symmetric W8A8 preset, and --asym, the peer configured
# as close to ours as its schemes allow (asymmetric int8 weights per output channel, asymmetric dynamic
# per-token activations). MoE experts are unfused by llm-compressor's load_quantizable_moe; its two passes
# take ~20 and ~35 min for the upcycled MoE on 2 cores alone, ~10 min in all for SmolLM2 or the MoEfied
# model; --stage-dir keeps the smoothed weights, so a rerun (or the other preset) resumes after the first.
# Then: .venv/bin/python bench/haq.py --model MODEL --windows all --resume --peer OUT [--peer OUT-asym]
# $(call llmc_peer,OUT,MODEL,CALIB,EXTRA-FLAGS)
define llmc_peer
$(1)/peer_meta.json: $(PEER_VENV)/.installed $(STAMP) bench/peers/llmcompressor_w8a8.py
	$(BIN)/python bench/peers/make_calib.py --model $(2) --out $(3)
	$(PEER_VENV)/bin/python bench/peers/llmcompressor_w8a8.py $$$$($(BIN)/python -c \
		"from haqmoe.models.embedded import ensure_embedded; print(ensure_embedded('$(2)'))") \
		$(3) $(1) $(4)
endef
PEERS := bench/peers/out
$(eval $(call llmc_peer,$(PEERS)/smollm2-llmc-w8a8,smollm2-135m,$(PEERS)/calib.pt,))
$(eval $(call llmc_peer,$(PEERS)/smollm2-llmc-w8a8-asym,smollm2-135m,$(PEERS)/calib.pt,--asym))
$(eval $(call llmc_peer,$(PEERS)/smollm2-moe-llmc-w8a8,smollm2-moe,$(PEERS)/calib-moe.pt,\
	--stage-dir $(PEERS)/smollm2-moe-smoothquant))
$(eval $(call llmc_peer,$(PEERS)/smollm2-moe-llmc-w8a8-asym,smollm2-moe,$(PEERS)/calib-moe.pt,\
	--asym --stage-dir $(PEERS)/smollm2-moe-smoothquant))
$(eval $(call llmc_peer,$(PEERS)/smollm2-moefied-llmc-w8a8,smollm2-moefied,$(PEERS)/calib-moefied.pt,\
	--stage-dir $(PEERS)/smollm2-moefied-smoothquant))
$(eval $(call llmc_peer,$(PEERS)/smollm2-moefied-llmc-w8a8-asym,smollm2-moefied,$(PEERS)/calib-moefied.pt,\
	--asym --stage-dir $(PEERS)/smollm2-moefied-smoothquant))

peers: $(PEERS)/smollm2-llmc-w8a8/peer_meta.json
peers-asym: $(PEERS)/smollm2-llmc-w8a8-asym/peer_meta.json
peers-moe: $(PEERS)/smollm2-moe-llmc-w8a8/peer_meta.json
peers-moe-asym: $(PEERS)/smollm2-moe-llmc-w8a8-asym/peer_meta.json
peers-moefied: $(PEERS)/smollm2-moefied-llmc-w8a8/peer_meta.json
peers-moefied-asym: $(PEERS)/smollm2-moefied-llmc-w8a8-asym/peer_meta.json

# llama.cpp, the decode peer of bench/int8.py (llama-cpp-python, built from source into our venv, ~6 min):
# AVX512 + VNNI kernels; its AMX build crashed in the first decode on this machine's VM, so AMX is off.
LLAMA_CMAKE := -DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_AVX512=ON \
	-DGGML_AVX512_VNNI=ON -DGGML_AVX512_VBMI=ON -DGGML_AVX512_BF16=ON -DGGML_AVX_VNNI=ON -DGGML_AMX_INT8=OFF
peer-llamacpp: $(STAMP)
	CMAKE_ARGS="$(LLAMA_CMAKE)" $(BIN)/pip install --no-cache-dir llama-cpp-python==0.3.36

# llama.cpp as its users install it: plain `pip install`, no CMAKE_ARGS (PyPI has only the source, so
# this builds it, ~6-10 min on 2 cores), in a venv of its own so it never replaces the flagged build
# above. Built this way ggml compiles for the build machine (GGML_NATIVE defaults to ON unless
# cross-compiling: -march=native), so this is also the GGML_NATIVE=ON build.
# bench/int8_interleaved.py --llama-python LABEL=VENV/bin/python runs each build as a child process
# beside our decode (two builds cannot be imported into one process).
LLAMA_DEFAULT_VENV := bench/peers/llama-default/.venv
$(LLAMA_DEFAULT_VENV)/.installed:
	$(PY) -m venv $(LLAMA_DEFAULT_VENV) || python3 -m venv $(LLAMA_DEFAULT_VENV)
	env -u CMAKE_ARGS $(LLAMA_DEFAULT_VENV)/bin/pip install --no-cache-dir --no-binary llama-cpp-python \
		llama-cpp-python==0.3.36
	touch $@
peer-llamacpp-default: $(LLAMA_DEFAULT_VENV)/.installed
peer-llamacpp-all: peer-llamacpp peer-llamacpp-default
