# bridged developer tasks (GNU make).
#
#   make run     start the daemon on a pseudo-terminal ($(PTY)) with $(PROFILE)
#   make test    run the test suite, then again under Python 3.13 when pyenv has it,
#                then make test-floors
#                (PYTEST_JOBS=0: in one process instead of six xdist workers)
#   make test-floors  a fast subset with the oldest dependency versions pyproject.toml allows
#   make bench   run the benchmarks (bench/)
#   make clean   remove caches and build artefacts (the virtualenvs are kept)

PYTHON  ?= python3
VENV    ?= .venv
PTY     ?= /tmp/ttyBRIDGED
PROFILE ?= esp32
PYTEST_ARGS ?=
# Each suite run is spread over PYTEST_JOBS pytest-xdist workers (0: one
# process, no xdist), whole files to a worker (--dist loadfile), so a module's
# fixtures -- the OTA keys, the DNS/SNTP test servers on fixed loopback
# addresses, module-wide daemons -- are made once and never twice at a time;
# the longest files first (tests/schedule.py; on a fresh clone by
# tests/file_seconds.json), so that no long one is left for the end while the
# other workers idle.  Six workers on the 2-core CI machine: nearly every test
# starts a daemon (forked from a process that imported bridged once:
# tests/forkserver.py, as are most of the `bridged status/fault/pki/check/ota`
# command lines the tests run; BRIDGED_TEST_FORKSERVER=0 execs each) and then
# mostly waits -- on the daemon's timers, on a peer, on the pty: a run's tests
# spend about 1,000 s of wall time for about 230 s of CPU (theirs, their
# daemons' and the workers' together), so four workers kept the two cores
# less than half busy on a quiet machine (4:30 a run for 3.11, about 0.85 of a
# core).  Measured on this machine, each run sharing both cores with other
# helpers' suites (load 7 to 17), in alternation (4, 6, 8, 4, 6, 8 workers,
# 3.11): four took 5:22 and 4:53, six 4:19 and 3:21, eight 4:16 and 4:27;
# eight cost 10% more CPU than four (each worker's start, collection and fork
# server; more contention) for no gain over six.  Under that load the
# timing-bound tests (an in-process link worker timed to the millisecond, the
# pty's pacing, a fault's latency, +++'s guard times) failed now and then at
# any count: 0 and 2 a run at four, 2 and 1 at six, 3 and 3 at eight, a
# different few each time.  Both
# interpreters' runs go one after the other, not at once: test_dns,
# test_sntp, test_hosts and tests/net bind fixed loopback addresses
# (127.0.0.x:53/123) that two runs at a time would fight over.  The second
# interpreter runs the whole suite too (not only what differs under 3.13:
# ssl's TLS-PSK, asyncio/uvloop, mmap).  BRIDGED_TEST_CPU=FILE writes each
# test's CPU seconds, its daemons' included (tests/cpuclock.py).  See
# bench/RESULTS.md, "Test suite".
PYTEST_JOBS ?= 6
# pytest keeps the test modules it rewrote for assert messages (and Python the
# modules it compiled) in __pycache__ (ignored by git) unless
# PYTHONDONTWRITEBYTECODE is set, as in some CI shells; then every xdist worker
# rewrote all ~240 test modules again at each start: 15-20 s of both cores per
# run, over half of the collection (tests/conftest.py does the same for the
# daemons the tests start).
unexport PYTHONDONTWRITEBYTECODE
XDIST = $(if $(filter 0,$(PYTEST_JOBS)),,-n $(PYTEST_JOBS) --dist loadfile)

# Second interpreter for `make test`; empty when it is not installed.
PY313_VENV := .venv-3.13

# The dependency floors: each ">=X" of pyproject.toml as "==X.*" (the floor's
# newest patch release), in a virtualenv of their own.
FLOORS_VENV := .venv-floors
# The tests of the code that calls each dependency, and the daemon end to end
# (uvloop under all of them; TLS links, one mDNS advertisement, the serial
# port): about a minute.
FLOORS_TESTS ?= tests/test_log.py tests/test_pki.py tests/net tests/uart \
	tests/integration/test_tls.py \
	tests/integration/test_mdns.py::test_service_and_host_are_advertised_then_withdrawn \
	tests/integration/test_service.py::test_serial_port_mode

.PHONY: all run test test-one test-floors bench clean distclean

# The install stamps are named by pyproject.toml's content (its SHA-256), not
# its time: a fresh clone's pyproject.toml is newer than a kept virtualenv's
# stamp though nothing changed, and pip then installed again (three
# virtualenvs, each time).  A changed pyproject.toml (new dependency, new entry
# point) has no stamp yet: installed again; bridged itself is installed
# editable, so its code needs no install.
PYPROJECT_HASH := $(shell sha256sum pyproject.toml | cut -c1-16)
INSTALLED = $(VENV)/.installed-$(PYPROJECT_HASH)

all: $(INSTALLED)

# An existing virtualenv is reused, never recreated.
$(INSTALLED):
	test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/python -m pip install -e '.[test]'
	rm -f $(VENV)/.installed $(VENV)/.installed-*
	touch $@

run: $(INSTALLED)
	$(VENV)/bin/bridged run --profile $(PROFILE) --pty $(PTY)

# One suite run with $(VENV); then, from the top-level invocation only, the same
# suite with Python 3.13 in its own virtualenv.
test: test-one
	@if [ "$(VENV)" = "$(PY313_VENV)" ]; then exit 0; fi; \
	py=""; \
	if [ -x "$$HOME/.pyenv/versions/3.13.0/bin/python" ]; then \
		py="$$HOME/.pyenv/versions/3.13.0/bin/python"; \
	elif command -v pyenv >/dev/null 2>&1 && \
	     prefix=$$(pyenv prefix 3.13.0 2>/dev/null) && \
	     [ -x "$$prefix/bin/python" ]; then \
		py="$$prefix/bin/python"; \
	fi; \
	if [ -n "$$py" ]; then \
		echo "== again under $$py =="; \
		$(MAKE) --no-print-directory test-one PYTHON="$$py" VENV=$(PY313_VENV) PYTEST_ARGS='$(PYTEST_ARGS)'; \
	else \
		echo "== Python 3.13.0 not found (pyenv); skipping the second run =="; \
	fi
	@echo "== the dependency floors (make test-floors) =="
	@$(MAKE) --no-print-directory test-floors PYTEST_ARGS='$(PYTEST_ARGS)'

test-one: $(INSTALLED)
	$(VENV)/bin/python -m pytest $(XDIST) $(PYTEST_ARGS)

# Stamped by pyproject.toml's content as $(INSTALLED) is.
FLOORS_INSTALLED = $(FLOORS_VENV)/.installed-$(PYPROJECT_HASH)

$(FLOORS_INSTALLED):
	test -x $(FLOORS_VENV)/bin/python || $(PYTHON) -m venv $(FLOORS_VENV)
	$(PYTHON) -c 'import re, tomllib; \
	deps = tomllib.load(open("pyproject.toml", "rb"))["project"]["dependencies"]; \
	print("\n".join(re.sub(r">=\s*([0-9.]+)", r"==\1.*", d) for d in deps))' > $(FLOORS_VENV)/constraints.txt
	$(FLOORS_VENV)/bin/python -m pip install -q -c $(FLOORS_VENV)/constraints.txt -e '.[test]'
	rm -f $(FLOORS_VENV)/.installed-*
	touch $@

test-floors: $(FLOORS_INSTALLED)
	@$(FLOORS_VENV)/bin/python -m pip list --format=freeze 2>/dev/null | \
		grep -iE '^(pyserial|uvloop|cryptography|structlog|dnspython|zeroconf|ifaddr)==' | tr '\n' ' '; echo
	$(FLOORS_VENV)/bin/python -m pytest $(XDIST) $(PYTEST_ARGS) $(FLOORS_TESTS)

bench: $(INSTALLED)
	$(VENV)/bin/python -m bench

clean:
	rm -rf build dist *.egg-info .pytest_cache .hypothesis
	rm -f .venv*/.installed .venv*/.installed-*
	find . -path './.venv*' -prune -o -name __pycache__ -type d -prune -exec rm -rf {} +

distclean: clean
	rm -rf $(VENV) $(PY313_VENV) $(FLOORS_VENV)
