# Two entry points for a fresh clone; both create .venv on first use.
#   make demo   run the whole pipeline once against the local RabbitMQ
#   make test   lint, type-check and run the test suite
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: demo test lint install

$(BIN)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $@

install: $(BIN)/.installed

demo: $(BIN)/.installed
	$(BIN)/rohrpost demo

lint: $(BIN)/.installed
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

# Three test processes: most tests wait on the broker, SMTP or a timer, not the CPU.
test: lint
	$(BIN)/pytest -n 3 --dist loadgroup
