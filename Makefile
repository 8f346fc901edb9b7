# Every target installs what it needs first, into .venv in the checkout (a second run reuses it).
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
export RAY_USAGE_STATS_ENABLED := 0
export PREFECT_SERVER_ANALYTICS_ENABLED := false
export HF_HUB_OFFLINE := 1

.PHONY: install test demo cluster-demo up down status screenshots train-tokenizers tokenize pretrain verify bench-download bench-label bench-tokenize bench-pretrain bench-transfer bench-generate bench-gpu bench-storage bench-planning bench-quality clean

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e ".[test]"
	touch $(STAMP)

# Two test processes (pytest-xdist), each running whole modules, the longest first (tests/conftest.py);
# TEST_PROCESSES=0 runs everything in one process.
TEST_PROCESSES ?= 2

test: $(STAMP)
	$(BIN)/python -m pytest -n $(TEST_PROCESSES) --dist loadscope --no-loadscope-reorder

demo: $(STAMP)
	$(BIN)/python -m pipeline demo --profile demo $(if $(DATA),--output $(DATA),)

# The demo across a Ray cluster started on this machine (a head and two worker nodes), one worker node killed in
# the middle of labelling; it stops its nodes when it ends (`make down` stops one left running).
cluster-demo: $(STAMP)
	$(BIN)/python -m pipeline demo --profile demo --cluster 2 --output $(or $(DATA),data/cluster-demo)

# The local services (Prefect API + UI, Ray head + dashboard, the deployment server), in the background.
up: $(STAMP)
	$(BIN)/python -m pipeline up

down: $(STAMP)
	$(BIN)/python -m pipeline down

status: $(STAMP)
	$(BIN)/python -m pipeline services

# The dashboards while a demo stage runs, in headless Chromium (docs/screenshots/*.png); its own services on other
# ports, stopped at the end. Needs Chromium: `apt-get install chromium` (Debian) or CHROMIUM=/path/to/chrome.
screenshots: $(STAMP)
	$(BIN)/python -m pip install --quiet -e ".[screenshots]"
	$(BIN)/python docs/screenshots.py

# The dataset stages, with the paper's settings on data/cc12m unless told otherwise:
#   make tokenize                          PROFILE=demo make tokenize (the demo dataset)
PROFILE ?= paper
DATA_ARG = $(if $(DATA),--data $(DATA),)

train-tokenizers: $(STAMP)
	$(BIN)/python -m pipeline train-tokenizer --profile $(PROFILE) $(DATA_ARG) --modality all

tokenize: $(STAMP)
	$(BIN)/python -m pipeline tokenize --profile $(PROFILE) $(DATA_ARG)

pretrain: $(STAMP)
	$(BIN)/python -m pipeline pretrain --profile $(PROFILE) $(DATA_ARG)

verify: $(STAMP)
	$(BIN)/python -m pipeline verify --data $(or $(DATA),$(if $(filter demo,$(PROFILE)),data/demo,data/cc12m))

bench-download: $(STAMP)
	$(BIN)/python bench/bench_download.py

clean:
	rm -rf $(VENV) data bench/_work bench/.venv-img2dataset

# The paper's model sizes where there is a GPU; tiny models (a check that the path runs) elsewhere.
BENCH_LABEL_ARGS ?= $(if $(shell command -v nvidia-smi),--size paper --images 1024 --shard-size 512,--size tiny --images 64)

bench-label: $(STAMP)
	$(BIN)/python bench/bench_label.py $(BENCH_LABEL_ARGS)

# 4M-B where there is a GPU; a tiny run that checks the path elsewhere (BENCH_PRETRAIN_ARGS overrides).
BENCH_PRETRAIN_ARGS ?= $(if $(shell command -v nvidia-smi),--size B --batch 128 --steps 20,--size Ti --batch 8 --steps 5 --loader-samples 256)

bench-pretrain: $(STAMP)
	$(BIN)/python bench/bench_pretrain.py $(BENCH_PRETRAIN_ARGS)

bench-transfer: $(STAMP)
	$(BIN)/python bench/bench_transfer.py $(BENCH_TRANSFER_ARGS)

bench-generate: $(STAMP)
	$(BIN)/python bench/bench_generate.py $(BENCH_GENERATE_ARGS)

bench-tokenize: $(STAMP)
	$(BIN)/python bench/bench_tokenize.py --size paper --images 16 --crops 2

# Every benchmark at the paper's sizes on one GPU (about 8 minutes); the tiny CPU versions elsewhere.
bench-gpu: $(STAMP)
	$(BIN)/python bench/bench_gpu.py $(BENCH_GPU_ARGS)

# Object storage against a local disk: download, the 4M loader, scratch space (moto's S3 server on loopback).
bench-storage: $(STAMP)
	$(BIN)/python bench/bench_storage.py $(BENCH_STORAGE_ARGS)

# The quality stage's scoring (tiny networks here; BENCH_QUALITY_ARGS=--size paper for the paper's sizes) and the
# near-duplicate search over 1M synthetic embeddings: time and peak memory.
bench-quality: $(STAMP)
	$(BIN)/python bench/bench_quality.py $(BENCH_QUALITY_ARGS)

# The download driver planning a 100M-row URL list (written on the fly): time and peak memory.
bench-planning: $(STAMP)
	$(BIN)/python bench/bench_planning.py $(BENCH_PLANNING_ARGS)
