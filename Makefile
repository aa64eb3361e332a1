# The README's two commands: `make serve` and `make test`.
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: setup serve test model bench

setup:
	bash scripts/setup.sh

model: setup
	$(BIN)/pdserve prepare-default-model

serve: model
	$(BIN)/pdserve serve $(ARGS)

test: model
	bash scripts/test.sh

bench: model
	$(BIN)/python benchmarks/engine_cpu.py
