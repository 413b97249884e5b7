# Every target installs what it needs, so a fresh machine needs only `make run` or `make test`.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
CONFIG ?= mirror.yaml
SUDO   := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.DEFAULT_GOAL := help

help: ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F ':.*## ' '{printf "  %-8s %s\n", $$1, $$2}'

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test,dev]'
	touch $@

install: $(STAMP) ## create .venv and install pullthrough with its test tools

# The real upstream (docker-registry) and the real clients the end-to-end tests run:
# skopeo, containerd (ctr), podman and dockerd; promtool, systemd-analyze, haproxy and nginx
# check deploy/ (haproxy also fronts the fleet test).
# Each is installed only when missing.
SYSTEM_COMMANDS := docker-registry skopeo containerd ctr podman dockerd promtool systemd-analyze haproxy nginx
SYSTEM_PACKAGES := docker-registry skopeo containerd podman docker.io prometheus systemd haproxy nginx

system-deps: ## install Debian's docker-registry and the real clients when missing
	@missing=0; for c in $(SYSTEM_COMMANDS); do command -v $$c >/dev/null || missing=1; done; \
	if [ $$missing = 1 ]; then \
		$(SUDO) apt-get update -qq && \
		DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq --no-install-recommends \
			$(SYSTEM_PACKAGES); \
	fi

run: $(STAMP) ## serve mirror.yaml on 0.0.0.0:5000 with the cache in ./data
	$(VENV)/bin/pullthrough serve --config $(CONFIG)

test: $(STAMP) system-deps ## run the test suite against a real registry
	$(PY) -m pytest

# The benchmark (tests/bench/, ~22 min at the defaults with the fleet phase, ~10 with BENCH_IMAGE_MB=200; never
# part of `make test`). Knobs: BENCH_IMAGE_MB, BENCH_REPS, BENCH_PHASES, BENCH_PROFILES,
# BENCH_WAN_RATE, BENCH_PROFILE ... (tests/bench/settings.py). The WAN profile needs root
# (a network namespace and tc); tests/bench/README.md has the latest table.
BENCH_COMMANDS := nginx wrk curl ip tc
BENCH_PACKAGES := nginx wrk curl iproute2

bench-deps: ## install nginx, wrk, curl and iproute2 (ip, tc) for the benchmark when missing
	@missing=0; for c in $(BENCH_COMMANDS); do \
		command -v $$c >/dev/null || [ -x /usr/sbin/$$c ] || missing=1; done; \
	if [ $$missing = 1 ]; then \
		$(SUDO) apt-get update -qq && \
		DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq --no-install-recommends \
			$(BENCH_PACKAGES); \
	fi

bench: $(STAMP) system-deps bench-deps ## benchmark vs direct pulls, distribution's proxy and nginx
	$(PY) -m tests.bench.run

check: $(STAMP) ## ruff format --check, ruff check, mypy
	$(VENV)/bin/ruff format --check proxy cache tests
	$(VENV)/bin/ruff check proxy cache tests
	$(VENV)/bin/mypy

.PHONY: help install system-deps run test check bench bench-deps
