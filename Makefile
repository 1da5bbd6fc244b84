# Two entry points for a new user: `make serve` and `make test`.
# Both create .venv (torch==2.13.0 first, so nothing pulls a CUDA build) and
# install the project with its `lumen` script; the install generates the gRPC
# stubs (lumen/v1) from proto/ (setup.py).
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
TORCH  ?= torch==2.13.0
PROTO  := proto/lumen/v1/inference.proto
HOST   ?= 127.0.0.1
PORT   ?= 50051
MODEL_ARGS ?=
PYTEST_ARGS ?=

.PHONY: serve test sanitize test-isa test-aarch64 setup setup-test bench clean

serve: setup
	$(BIN)/lumen serve --host $(HOST) --port $(PORT) $(MODEL_ARGS)

test: setup-test
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)

# The C kernels' tests once more, with the library built under AddressSanitizer and UBSan
# (a separate build, cached apart; the first takes a few minutes).
SANITIZERS = $(shell $${CC:-cc} -print-file-name=libasan.so) $(shell $${CC:-cc} -print-file-name=libubsan.so)
sanitize: setup-test
	LUMEN_NATIVE_SANITIZE=1 LD_PRELOAD="$(SANITIZERS)" ASAN_OPTIONS=detect_leaks=0:abort_on_error=1 \
		UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1 \
		$(BIN)/python -m pytest -q -p no:cacheprovider tests/engine/native $(PYTEST_ARGS)

# The C kernels' tests with one installed variant (default x86-64-v3: AVX2 + FMA + F16C without
# AVX-512) that this CPU can run. `make test` already runs them for every such variant.
ISA ?= x86-64-v3
test-isa: setup-test
	LUMEN_NATIVE_VARIANT=$(ISA) $(BIN)/python -m pytest -q -p no:cacheprovider tests/engine/native $(PYTEST_ARGS)

# The kernels cross-compiled for aarch64 (the armv8-a variant's flags) must reproduce this machine's
# bits under qemu-user. Needs `apt-get install gcc-aarch64-linux-gnu qemu-user-static`; `make test`
# runs this too where they are installed, and skips it, saying why, where they are not.
test-aarch64: setup-test
	$(BIN)/python -m pytest -q -p no:cacheprovider -rs tests/engine/native/test_cross_arch.py $(PYTEST_ARGS)

setup: $(VENV)/.runtime
setup-test: $(VENV)/.test

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet $(TORCH)

# The install compiles the C kernels (setup.py, engine/native/build.py), so it is redone when they change.
CSRC := $(wildcard engine/native/csrc/*.c engine/native/csrc/*.h) engine/native/build.py

$(VENV)/.runtime: pyproject.toml setup.py $(PROTO) $(CSRC) $(BIN)/python
	$(BIN)/python -m pip install --quiet -e .
	touch $@

# The test install includes the runtime one (one kernel build, not two).
$(VENV)/.test: pyproject.toml setup.py $(PROTO) $(CSRC) $(BIN)/python
	$(BIN)/python -m pip install --quiet -e '.[test]'
	touch $@ $(VENV)/.runtime

bench: setup
	CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_AVX512=ON -DGGML_AVX512_VNNI=ON -DGGML_AVX512_BF16=ON -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF" \
		$(BIN)/python -m pip install --quiet -e '.[bench]'
	$(BIN)/python bench/baseline.py

clean:
	rm -rf $(VENV) lumen/v1 build *.egg-info
