# The two set-up commands are `make demo` and `make test`; each creates .venv when needed.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test bench lint assets clean

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
# 15 minutes; `slimformer optimize default` without --passes searches it too.
DEMO_PASSES := prune.layers,prune.ffn,prune.heads,quantize.dynamic_int8

demo: assets
	$(BIN)/slimformer optimize default --task embedding --max-drop 1% --trials 12 \
		--time-budget 8m --passes $(DEMO_PASSES) --out runs/demo --overwrite

test: assets
	$(BIN)/ruff check src tests bench
	$(BIN)/python -m pytest -q

bench: assets
	$(BIN)/python bench/default_job.py

lint: $(STAMP)
	$(BIN)/ruff check src tests bench
	$(BIN)/ruff format --check src tests bench

clean:
	rm -rf $(VENV) runs
