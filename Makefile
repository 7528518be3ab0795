# Two commands do all set-up on a fresh machine (Python 3.11+):
#   make demo   - install into .venv, fetch the default model, serve 2 workers and run a short bench
#   make test   - install into .venv (with test extras), fetch the default model, lint,
#                 type-check (mypy --strict), run the tests
VENV ?= .venv
PY := $(VENV)/bin/python
KV := $(VENV)/bin/kvroute

.PHONY: install demo test clean

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test,plot]'
	touch $@

install: $(VENV)/.installed

demo: install
	$(KV) model fetch
	@$(KV) bench --serve 2 --sessions 8 --turns 4 --concurrency 4 --max-tokens 32 --compare-cold; \
	status=$$?; \
	echo; \
	echo "next: . $(VENV)/bin/activate   (puts kvroute on your PATH), then"; \
	echo "      kvroute serve          (terminal 1: a broker and 2 workers on tcp://127.0.0.1:5555)"; \
	echo "      kvroute chat           (terminal 2: talk to it; /help inside)"; \
	exit $$status

test: install
	$(KV) model fetch
	sh scripts/ensure-chromium.sh
	$(VENV)/bin/ruff check kvroute tests benchmarks
	$(VENV)/bin/mypy
	$(PY) -m pytest -q

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
