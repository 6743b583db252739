# The two commands users need: `make demo` and `make test`. Both set up .venv first.
VENV ?= .venv
PYTHON := $(VENV)/bin/python
STAMP := $(VENV)/.ganpipe-installed
# This machine serves these two from local disk; other torch versions would download gigabytes.
TORCH_PIN := torch==2.14.1 torchvision==0.29.1
PYTEST_ARGS ?=

.PHONY: setup demo test lint clean stack stack-stop

setup: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(PYTHON) || python3 -m venv $(VENV)
	$(PYTHON) -m pip install -q --upgrade pip
	$(PYTHON) -m pip install -q $(TORCH_PIN)
	$(PYTHON) -m pip install -q -e '.[test]'
	touch $(STAMP)

demo: setup
	$(VENV)/bin/ganpipe pipeline configs/digits-dcgan.yaml

lint: setup
	$(VENV)/bin/ruff check .

test: setup lint
	$(PYTHON) -m pytest $(PYTEST_ARGS)

clean:
	rm -rf .ganpipe .pytest_cache

# The servers without Docker (PostgreSQL, prefect server, mlflow server, S3) on 127.0.0.1, state
# in .ganpipe/stack: `eval "$$(infra/local-stack env)"` points a shell at them.
stack: setup
	PYTHON=$(PYTHON) infra/local-stack start

stack-stop:
	infra/local-stack stop
