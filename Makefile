# make        -> .venv with the pinned stack
# make test      -> the CPU test suite but the slow end-to-end pipelines (about 13.5 min from a fresh
#                   clone on 2 cores, install included: 576 tests in 11m49s at commit 39df316)
# make test-slow -> those pipelines (21 tests, 3m58s); CI runs both (.ci/run: 17m35s in all)
# make test-unit -> tests/unit only (one process each, about a minute)
# make demo   -> the tiny-world pipeline on 2 CPU processes
PY := .venv/bin/python
PIP := .venv/bin/pip
WORLD := assets/world

.PHONY: venv test test-slow test-unit demo world clean llama-cpp
venv: .venv/.installed

# torch first (the local CPU wheel here, a CUDA build on clusters), then everything else under
# constraints.txt so that no dependency can replace it. ExecuTorch (convert --formats pte) last and
# without its declared dependencies (pyproject.toml, extra executorch: why); about 20 s more.
.venv/.installed: pyproject.toml constraints.txt
	python3 -m venv .venv
	$(PIP) install -q --upgrade pip
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q -c constraints.txt -e ".[test,executorch]"
	$(PIP) install -q --no-deps executorch==1.5.1
	@# llama.cpp's Python binding builds llama.cpp from source (8 min on 2 idle cores, more when
	@# loaded); pip caches the built wheel, so this takes seconds once it was built on the machine
	@# (`make llama-cpp`). Without it the tests that load a .gguf in llama.cpp skip and say why.
	timeout 180 $(PIP) install -q -c constraints.txt "llama-cpp-python==0.3.36" \
		|| echo "llama-cpp-python not installed in 180 s (no built wheel cached): run 'make llama-cpp' once"
	touch $@

llama-cpp: venv
	$(PIP) install -c constraints.txt "llama-cpp-python==0.3.36"

world: venv
	$(PY) -m qat.synthetic.build --out $(WORLD)

test: venv
	OMP_NUM_THREADS=1 WANDB_MODE=disabled $(PY) -m pytest -q -rs --durations=15 -m "not slow" tests

test-slow: venv
	OMP_NUM_THREADS=1 WANDB_MODE=disabled $(PY) -m pytest -q -rs --durations=15 -m slow tests

test-unit: venv
	OMP_NUM_THREADS=1 WANDB_MODE=disabled $(PY) -m pytest -q -rs tests/unit

demo: venv
	bash recipes/demo.sh

clean:
	rm -rf .venv runs assets
