# reconciler: every target installs what it needs itself (idempotently).
SHELL := /bin/bash
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
DEMO_CONFIG := hostconfig/demo.yaml
DEMO_STATE := /var/lib/reconciler/demo
DEMO_MEMORY_CONFIG := hostconfig/demo-memory.yaml

.PHONY: setup services test test-fast lint-imports schemas docs demo demo-clean demo-memory demo-memory-clean bench reliability reliability-ci clean

setup: $(STAMP)

$(STAMP): pyproject.toml scripts/setup.sh scripts/setup-libvirt.sh scripts/setup-network.sh scripts/setup-storage.sh scripts/setup-swift.sh scripts/build-test-image.sh $(wildcard guest/*)
	bash scripts/setup.sh "$(PYTHON)" "$(VENV)"
	touch $(STAMP)

## Host services must run on every test run (a machine reboot stops them); idempotent.
services: setup
	@if [ "$$(id -u)" = 0 ]; then bash scripts/setup-libvirt.sh && bash scripts/setup-network.sh && bash scripts/setup-storage.sh && bash scripts/setup-swift.sh && bash scripts/build-test-image.sh; fi

## The whole test suite (what CI runs).
test: setup services
	$(VENV)/bin/lint-imports --config .importlinter
	RECONCILER_REQUIRE_HOST=$$( [ "$$(id -u)" = 0 ] && echo 1 ) $(PY) -m pytest -q -n 2 --dist loadfile -m "not serial" tests
	RECONCILER_REQUIRE_HOST=$$( [ "$$(id -u)" = 0 ] && echo 1 ) $(PY) -m pytest -q -m serial tests

## The reliability suites (crash points, faults, generated bad input, ownership,
## isolation, secrets; root, `make services`) at release counts: 100 kill points each for
## apply and destroy, 20,000 generated manifests, ... (CI runs them at reduced counts as
## part of `make test`). Their figures go to docs/reliability.md.
RELIABILITY_FIGURES := $(CURDIR)/.reliability
reliability: services
	@$(MAKE) --no-print-directory _reliability LEVEL=release
reliability-ci: services
	@$(MAKE) --no-print-directory _reliability LEVEL=ci
_reliability:
	rm -rf $(RELIABILITY_FIGURES)
	start=$$(date +%s); \
	RECONCILER_RELIABILITY=$(LEVEL) RECONCILER_FIGURES=$(RELIABILITY_FIGURES) RECONCILER_REQUIRE_HOST=1 $(PY) -m pytest -q -n 2 --dist loadfile -m "reliability and not serial" tests && \
	RECONCILER_RELIABILITY=$(LEVEL) RECONCILER_FIGURES=$(RELIABILITY_FIGURES) RECONCILER_REQUIRE_HOST=1 $(PY) -m pytest -q -m "reliability and serial" tests && \
	$(PY) scripts/reliability_report.py $(RELIABILITY_FIGURES) docs/reliability.md --duration $$(( $$(date +%s) - start ))

test-fast: setup
	$(PY) -m pytest -q -x tests/unit

lint-imports: setup
	$(VENV)/bin/lint-imports --config .importlinter

## Regenerate the checked-in JSON Schemas and the manifest reference from the models.
schemas: setup
	$(VENV)/bin/reconciler schema --out schemas
docs: schemas
	$(PY) -m reconciler.docgen docs/manifests.md

## The example cloud of manifests/ on this host's real drivers (root): installs and starts
## what it needs (`services`), applies, proves every guest got its address and answers,
## and prints the status. A second run changes nothing. `make demo-clean` removes it all.
demo: services
	@if [ "$$(id -u)" != 0 ]; then echo "make demo drives libvirt, netlink and nftables: run it as root (or try 'make demo-memory')"; exit 1; fi
	@mkdir -p -m 0755 $(DEMO_STATE) $(DEMO_STATE)/volumes
	RECONCILER_HOST_CONFIG=$(DEMO_CONFIG) $(VENV)/bin/reconciler validate manifests
	RECONCILER_HOST_CONFIG=$(DEMO_CONFIG) $(VENV)/bin/reconciler plan manifests
	RECONCILER_HOST_CONFIG=$(DEMO_CONFIG) $(VENV)/bin/reconciler apply manifests --yes
	@echo; echo "Waiting for the guests to boot, lease their addresses and answer..."
	$(PY) scripts/demo_check.py $(DEMO_CONFIG)
	@echo
	RECONCILER_HOST_CONFIG=$(DEMO_CONFIG) $(VENV)/bin/reconciler status
	@echo
	@echo "Try next:"
	@echo "  export RECONCILER_HOST_CONFIG=$(DEMO_CONFIG)"
	@echo "  edit manifests/globex/cloud.yaml (e.g. mtu: 1300), then: $(VENV)/bin/reconciler plan manifests"
	@echo "  $(VENV)/bin/reconciler daemon --source manifests     (then: virsh destroy <a domain above>, and watch it come back)"
	@echo "  $(VENV)/bin/reconciler graph manifests --format mermaid"
	@echo "  make demo-clean     (removes everything the demo made, volumes and buckets included)"

demo-clean: setup
	$(PY) scripts/demo_clean.py $(DEMO_CONFIG) manifests

## The same on the in-memory drivers (no root, nothing on the host; state in .demo-state/).
demo-memory: setup
	RECONCILER_HOST_CONFIG=$(DEMO_MEMORY_CONFIG) $(VENV)/bin/reconciler apply manifests --yes
	RECONCILER_HOST_CONFIG=$(DEMO_MEMORY_CONFIG) $(VENV)/bin/reconciler status

demo-memory-clean: setup
	RECONCILER_HOST_CONFIG=$(DEMO_MEMORY_CONFIG) $(VENV)/bin/reconciler destroy manifests --yes
	rm -rf .demo-state

## Benchmarks (measurements, never tests), each rewriting only its own section of
## docs/benchmarks.md: the planner on generated clouds; then on the real drivers (root,
## `make services`): instances, networks, volumes, buckets, the daemon, and the same
## cloud created and deleted with kcli side by side (about an hour in all).
bench: services
	$(PY) -m benchmarks.plan --sizes 1000 10000 --repeat 5 --write docs/benchmarks.md
	$(PY) -m benchmarks.instances --repeat 3 --write docs/benchmarks.md
	$(PY) -m benchmarks.networks --write docs/benchmarks.md
	$(PY) -m benchmarks.volumes --write docs/benchmarks.md
	$(PY) -m benchmarks.buckets --write docs/benchmarks.md
	$(PY) -m benchmarks.daemon --repeat 5 --write docs/benchmarks.md
	$(PY) -m benchmarks.kcli --repeat 3 --write docs/benchmarks.md

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis
