# The two commands of the README: `make up` runs the local pipeline, `make test` runs every test.
# Everything kotel downloads or writes stays under .venv/ and .kotel/ in this folder.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
TOPOLOGY ?= topologies/dev.yaml

.PHONY: install up down status test servers lint clean

$(VENV)/.installed: pyproject.toml setup.py kotel/otlp/_spanscan.c kotel/otlp/_wire.h streams/stages/_tailwire.c
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[test]'
	touch $@

install: $(VENV)/.installed

up: install
	$(BIN)/kotel up --topology $(TOPOLOGY)

down:
	-$(BIN)/kotel kafka stop

status:
	-$(BIN)/kotel status
	$(BIN)/kotel kafka status

lint: install
	$(BIN)/ruff check .

test: install servers
	$(BIN)/kotel kafka fetch
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -ra

# Real backends for the sink tests: Prometheus from Debian, Jaeger v2 and VictoriaLogs built with Go
# (cached under $(KOTEL_CACHE) or .kotel/cache; the first Go build takes minutes, later runs seconds).
servers: install
	command -v prometheus >/dev/null || { apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q prometheus; }
	$(BIN)/python -m loadtest.servers.build

clean: down
	rm -rf .kotel
