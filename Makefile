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

.PHONY: serve test sanitize test-isa setup setup-test bench clean

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

# The C kernels' tests with the library built for another instruction set this CPU can run
# (default x86-64-v3: AVX2 + FMA + F16C without AVX-512), to check those code paths' bits.
ISA ?= x86-64-v3
test-isa: setup-test
	LUMEN_NATIVE_MARCH=$(ISA) $(BIN)/python -m pytest -q -p no:cacheprovider tests/engine/native $(PYTEST_ARGS)

setup: $(VENV)/.runtime
setup-test: $(VENV)/.test

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet $(TORCH)

$(VENV)/.runtime: pyproject.toml setup.py $(PROTO) $(BIN)/python
	$(BIN)/python -m pip install --quiet -e .
	touch $@

$(VENV)/.test: $(VENV)/.runtime
	$(BIN)/python -m pip install --quiet -e '.[test]'
	touch $@

bench: setup
	CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_AVX512=ON -DGGML_AVX512_VNNI=ON -DGGML_AVX512_BF16=ON -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF" \
		$(BIN)/python -m pip install --quiet -e '.[bench]'
	$(BIN)/python bench/baseline.py

clean:
	rm -rf $(VENV) lumen/v1 build *.egg-info
