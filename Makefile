# One command to set up and run the main job, one to set up and run the tests.
# Installs are pinned by requirements/constraints.txt (regenerate with `make lock`).
VENV       ?= .venv
LETHE_HOME ?= $(CURDIR)/.lethe
PYTHON     ?= python3
export LETHE_HOME

.PHONY: nightly test install services lint lock clean bench bench-ingest

$(VENV)/.installed: pyproject.toml requirements/constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --upgrade pip
	$(VENV)/bin/pip install --quiet -c requirements/constraints.txt -e ".[test]"
	touch $@

install: $(VENV)/.installed

nightly: install
	$(VENV)/bin/lethe sample-log --out $(LETHE_HOME)/landing/sample.jsonl
	$(VENV)/bin/lethe nightly --deletion-log $(LETHE_HOME)/landing/sample.jsonl

# Pytest workers, each taking whole test files (a file's module fixtures stay in one process). Three on two cores:
# the end-to-end files spend most of their time starting Python processes (each step of the DAG is one) and
# waiting on them, so two workers left about half of the machine idle.
TEST_WORKERS ?= 3

# The PostgreSQL server the tests use (127.0.0.1:5432, database test): started if this machine has one stopped.
# Under CI a missing server fails the PostgreSQL tests; elsewhere they skip and say why.
services:
	@pg_isready -q -h 127.0.0.1 -p 5432 || { command -v pg_ctlcluster >/dev/null && \
		pg_ctlcluster --skip-systemctl-redirect $$(ls /etc/postgresql) main start && sleep 2; } || \
		echo "make: no PostgreSQL server at 127.0.0.1:5432: the PostgreSQL tests skip, or fail under CI"

test: install services
	$(VENV)/bin/ruff check .
	$(VENV)/bin/pytest -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder

bench: install
	$(VENV)/bin/lethe bench --out results

bench-ingest: install
	$(VENV)/bin/python -m components.bench_ingest --requests 100000

lock: install
	$(VENV)/bin/pip freeze --exclude-editable | sed 's/^torch==\(.*\)+cpu$$/torch==\1/' > requirements/constraints.txt

clean:
	rm -rf $(VENV) $(LETHE_HOME)
