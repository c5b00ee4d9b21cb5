# The two commands of the README: `make demo` and `make test`. Both build .venv on first use.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
export COMPRESS_DATA_DIR ?= $(if $(wildcard $(CURDIR)/../shared/data),$(abspath $(CURDIR)/../shared/data),)

.PHONY: demo test venv clean

$(BIN)/compress: setup.cfg constraints.txt pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -c constraints.txt -e '.[test]'
	@touch $@

venv: $(BIN)/compress

demo: venv
	$(BIN)/compress run recipes/quickstart.yaml

test: venv
	$(BIN)/python -m pytest tests

clean:
	rm -rf $(VENV) runs build *.egg-info
