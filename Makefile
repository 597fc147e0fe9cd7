# attncc: set up, run the demo, run the tests.
#
#   make demo    set up .venv (first time only), list the gallery, check examples/causal.attn
#                (its generated Triton kernel against the reference executor)
#   make test    set up .venv (first time only), run the test suite on the CPU
#   make setup   only the setup
#   make clean   remove .venv and build/test caches
#
# Only Python 3.10+ is needed. torch is installed first and pinned: the CPU build
# of torch 2.13.0 is what pip finds on the project's machines, while an unpinned
# `torch` (asked for directly or by attncc's own `torch>=2.11`) would pull the
# newest release with several GB of CUDA packages.

PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.attncc-setup
TORCH  ?= torch==2.13.0
PYTEST_ARGS ?=

.PHONY: demo test setup clean

setup: $(STAMP)

# The stamp is rebuilt when pyproject.toml changes (new dependencies); otherwise a
# repeated `make` installs nothing.
$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV) || { \
	  echo "error: '$(PYTHON) -m venv' failed; install Python's venv module (Debian: python3-venv)" >&2; \
	  exit 1; }
	$(BIN)/python -m pip install "$(TORCH)"
	$(BIN)/python -m pip install -e ".[test]"
	@touch $@

# `attncc check` runs the generated Triton kernel (in Triton's interpreter on a CPU)
# against the reference executor on random inputs and prints the errors.
demo: $(STAMP)
	$(BIN)/attncc list
	$(BIN)/attncc check examples/causal.attn

# TRITON_INTERPRET=1 runs generated Triton kernels on the CPU (slowly), which is
# how their tests run on machines without a GPU.
test: $(STAMP)
	TRITON_INTERPRET=1 $(BIN)/python -m pytest $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) build dist *.egg-info .pytest_cache
	find . -name __pycache__ -type d -prune -exec rm -rf {} +
