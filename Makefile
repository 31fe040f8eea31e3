# Two commands on a fresh machine: `make demo` (the default federation) and `make test`.
# Both set up what they need (.venv, packages, the Fashion-MNIST Debian package) and are idempotent.

PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.fedprune-installed
FMNIST := /usr/share/datasets/fashion-mnist

.PHONY: demo test data venv bench leaderboard-quick plots stop clean

venv: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch first, pinned: this version is on the local disk (other versions download gigabytes)
	$(PY) -m pip install -q torch==2.14.1 torchvision==0.29.1
	$(PY) -m pip install -q -e '.[test]'
	touch $(STAMP)

# Fashion-MNIST from Debian's dataset-fashion-mnist, when apt is usable; otherwise say how to get it.
data:
	@if [ -d $(FMNIST) ]; then exit 0; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
		DEBIAN_FRONTEND=noninteractive apt-get install -y -q dataset-fashion-mnist >/dev/null \
		|| (apt-get update -q >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -q dataset-fashion-mnist >/dev/null); \
	elif command -v sudo >/dev/null && sudo -n true 2>/dev/null; then \
		sudo DEBIAN_FRONTEND=noninteractive apt-get install -y -q dataset-fashion-mnist >/dev/null; \
	else \
		echo "Fashion-MNIST not found in $(FMNIST) and apt is not usable here: install the Debian"; \
		echo "package dataset-fashion-mnist, or put the four IDX files in ~/.cache/fedprune/data"; \
	fi

demo: venv data
	$(PY) -m fedprune.simulate --experiment configs/fedavg.yaml --num-supernodes 10

test: venv data
	$(PY) -m pytest -q

# Reruns the benchmarks (each sweep, 3 seeds, about an hour or more on 2 cores) and regenerates the
# README tables. benchmarks.demo and benchmarks.deployment run separately (python -m ...).
bench: venv data
	$(PY) benchmarks/codec_bits.py
	$(PY) -m benchmarks.baselines
	$(PY) -m benchmarks.fedlp
	$(PY) -m benchmarks.fedtiny
	$(PY) -m benchmarks.feddp
	$(PY) -m benchmarks.autoflip --sweep-seeds 0
	$(PY) -m benchmarks.ntk_zo
	$(PY) -m benchmarks.zo_lr
	$(PY) -m benchmarks.leaderboard
	$(PY) -m benchmarks.scale
	$(PY) -m benchmarks.cpu_paths
	$(PY) -m benchmarks.report

# The leaderboard in its quick setting (under 20 minutes), and its plots from the results file.
leaderboard-quick: venv data
	$(PY) -m benchmarks.leaderboard --quick

plots: venv
	$(PY) -m benchmarks.plots

# Stop a managed local SuperLink left running by `python -m fedprune.simulate --keep-superlink`.
stop:
	-pkill -f "flower-superlink.*$(CURDIR)/.flwr-home/local-superlink"

clean:
	rm -rf outputs .flwr-home .pytest_cache
