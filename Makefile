# Both targets bootstrap .venv themselves: a fresh clone needs only `make demo` or `make test`.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.gpt2lab-installed

.PHONY: test test-fast lint clean demo docs

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# The pinned CPU build first: a loose `torch` requirement would pull a multi-GB CUDA build.
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[serve,eval,test,dev,docs]'
	touch $(STAMP)

# Fetch Shakespeare, learn a vocabulary, train a small GPT-2 on 2 cores for 8 minutes, sample, plot.
# Offline: `make demo DATA=PATH` trains on your own text instead.
demo: $(STAMP)
	$(PY) -m gpt2lab demo $(if $(DATA),--data $(DATA))

test: $(STAMP)
	$(PY) -m pytest

test-fast: $(STAMP)
	$(PY) -m pytest -m "not slow"

# The manual (docs/) as a static site in site/, offline; its CLI and API pages are generated from the code.
docs: $(STAMP)
	$(VENV)/bin/mkdocs build --strict --site-dir site

lint: $(STAMP)
	$(VENV)/bin/ruff check src tests benchmarks

clean:
	rm -rf $(VENV) build site *.egg-info src/*.egg-info .pytest_cache
