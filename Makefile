# Two commands a learner needs:  make pipeline   and   make test
# Both create .venv and install the course into it on first use.
VENV   ?= .venv
PY     := $(VENV)/bin/python
# torch first: this pin is the CPU wheel CI tests with. On a CUDA machine use the build for your driver.
TORCH  ?= torch==2.13.0
PROFILE ?= tiny

.PHONY: install pipeline test unit notebooks course bench clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml constraints.txt
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet "$(TORCH)"
	$(PY) -m pip install --quiet -c constraints.txt -e ".[test]"
	touch $@

# The main job: tiny world -> tokenizer -> pretraining -> SFT -> reward model -> evaluation -> report (runs/<profile>/report)
pipeline: install
	$(VENV)/bin/llm-course --profile $(PROFILE) pipeline

# Whole test suite: unit tests and every notebook under nbval in the smoke profile, on TEST_JOBS processes
# (pytest-xdist; a notebook's cells and a test file's tests stay together on one process)
TEST_JOBS ?= 2
test: install
	LLM_COURSE_PROFILE=smoke WANDB_MODE=offline OMP_NUM_THREADS=1 $(PY) -m pytest tests notebooks exercises solutions \
		--nbval-lax -n $(TEST_JOBS) --dist loadfile --durations=15 -q

unit: install
	LLM_COURSE_PROFILE=smoke $(PY) -m pytest tests -q

# Re-execute notebooks in place with the tiny profile (the committed outputs)
notebooks: install
	$(VENV)/bin/llm-course --profile tiny notebooks

# The whole course from nothing: the pipeline and every notebook, two processes at a time (about 30 min on 2 cores)
course: install
	$(VENV)/bin/llm-course --profile $(PROFILE) course --clean

bench: install
	$(PY) benchmarks/bench_train_loop.py

clean:
	rm -rf runs
