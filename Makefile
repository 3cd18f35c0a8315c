# The two set-up-and-go commands (README.md): `make test` and `make bench`.
# Each creates .venv at the repository root if absent, installs the dependencies, builds the extension, and runs.

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# Build, test and report dependencies (scikit-learn: the digits of the degradation experiment; tqdm: its progress
# bar). pip resolves torch to the newest release this machine's index allows; triton
# comes with it on Linux.
DEPS := torch torchvision triton pybind11 ninja setuptools wheel pytest pytest-benchmark hypothesis matplotlib \
        scikit-learn tqdm timm
INSTALLED := $(VENV)/.installed
# Arguments for the benchmark run, e.g. `make bench BENCH_ARGS="--size full"`.
BENCH_ARGS ?=
# The one-shot GPU check (benchmarks/gpu_check.py) writes its summary, report, chart and log into OUT.
OUT ?= benchmarks/out/gpu-check
REHEARSAL ?=
GPU_CHECK_ARGS ?=
REHEARSAL_OUT := benchmarks/out/gpu-check-rehearsal

.PHONY: test bench build clean gpu-check gpu-check-rehearsal

$(PY):
	$(PYTHON) -m venv $(VENV)

$(INSTALLED): $(PY) Makefile
	$(PY) -m pip install $(DEPS)
	touch $@

# The extension is built in place (fused_resnet/_C*.so) with its objects kept in build/, so that ninja recompiles only
# the translation units whose source, headers or flags changed: with nothing changed this takes seconds (pip's
# editable install compiles in a fresh temporary directory each time: the whole extension, ~4 minutes on 2 cores).
# A path file in the environment then imports this checkout's fused_resnet from any directory, as an editable
# install does. MAX_JOBS bounds parallel compiles (default 2).
build: $(INSTALLED)
	MAX_JOBS=$${MAX_JOBS:-2} $(PY) setup.py build_ext --inplace
	$(PY) -c "import pathlib, sysconfig; \
	          pathlib.Path(sysconfig.get_path('purelib'), 'fused_resnet.pth').write_text('$(CURDIR)\n')"

test: build
	$(PY) -m pytest tests
	# The benchmark suite must run too (its CPU timings are not judged here), and so must the GPU check's steps: all
	# of them here, and its head (versions to headline) after a simulated 150 s build in tests/test_gpu_check.py,
	# above. Each fails if the headline writes no rows.
	$(PY) -m pytest benchmarks --size smoke -q -p no:cacheprovider
	$(PY) -m benchmarks.gpu_check --rehearsal --out $(REHEARSAL_OUT)

bench: build
	$(PY) -m pytest benchmarks $(BENCH_ARGS)

# On a CUDA machine without network: the python on PATH (PYTHON) builds and runs everything, no virtual
# environment, nothing downloaded (benchmarks/results/README.md). REHEARSAL=1 runs the same steps on the CPU at the
# smoke size; GPU_CHECK_ARGS passes more, e.g. "--deadline 300" or "--simulate-build-seconds 150".
gpu-check:
	$(PYTHON) -m benchmarks.gpu_check --out $(OUT) $(if $(REHEARSAL),--rehearsal) $(GPU_CHECK_ARGS)

# The rehearsal in the virtual environment, after its build.
gpu-check-rehearsal: build
	$(PY) -m benchmarks.gpu_check --rehearsal --out $(REHEARSAL_OUT)

clean:
	rm -rf build fused_resnet/*.so *.egg-info benchmarks/out .pytest_cache .benchmarks
