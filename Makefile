# Quickstart: `make demo` runs the main job, `make test` runs the tests. Each builds .venv first.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: venv demo test drill fuzz protos bench bench-checkpoint gpu-check clean

$(STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	@# A pinned CPU build of torch first: an unpinned one pulls gigabytes of CUDA packages.
	$(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -e '.[dev]'
	touch $(STAMP)

venv: $(STAMP)

demo: venv
	$(BIN)/stated demo

test: venv
	$(BIN)/python -m pytest -q

# The long form of the drills in tests/drills, 5 to 10 minutes: 150 kill -9s of daemons with a bigger
# paged job, and the torn-checkpoint, disk-full and EIO drills (those that mount a tmpfs or a loop
# device need root and skip without it), and the FSDP1 run of tests/distributed 20 times over (one run in
# 8 once hung). DRILL_SEED=N repeats a run.
DRILL_KILLS ?= 150
drill: venv
	STATED_DRILL_KILLS=$(DRILL_KILLS) STATED_DRILL_WIDTH=1024 STATED_DRILL_SEED=$(DRILL_SEED) STATED_FSDP1_RUNS=20 \
		$(BIN)/python -m pytest -q -s tests/drills tests/distributed/test_ddp_and_zero.py

# The fuzz suite of tests/security/test_fuzz.py as a soak: ten times the requests and frames, a random
# seed (printed; FUZZ_SEED=N repeats a run), up to 20 minutes.
FUZZ_SEED ?= $(shell od -An -N4 -tu4 /dev/urandom | tr -d ' ')
fuzz: venv
	STATED_FUZZ_SEED=$(FUZZ_SEED) STATED_FUZZ_REQUESTS=50000 STATED_FUZZ_FRAMES=10000 STATED_FUZZ_SECONDS=1200 \
		STATED_FUZZ_TRACE=1 $(BIN)/python -m pytest -q -s tests/security/test_fuzz.py

# Regenerates stated/v1 from protos/ with the pinned generator (grpcio-tools 1.66.2, see pyproject.toml).
protos: venv
	$(BIN)/python -m stated.tools.protogen

bench: venv
	$(BIN)/python bench/cpu_step.py

# Checkpoint time of a 200M AdamW job against torch.save and the disk's write bandwidth (BENCHMARKS.md).
bench-checkpoint: venv
	$(BIN)/python bench/checkpoint.py

# On a GPU machine: every GPU test (tests/gpu, tests/kernels/test_cuda_parity.py, and with two GPUs
# tests/distributed/test_on_gpus.py) and a short
# bench/gpu_step.py, one summary at the end, in under 10 minutes. It runs from source with the machine's
# python3 (torch with CUDA and CuPy installed there; PYTHON=... picks another). OUT=DIR keeps the logs.
gpu-check:
	PYTHON=$(PYTHON) bash tools/gpu_check.sh

clean:
	rm -rf $(VENV) build *.egg-info
