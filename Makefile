# Two entry points (README): `make demo` and `make test`. Both create .venv on first use and
# reinstall only when setup.py or this Makefile change.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.guide-fast-installed
# The torch/torchvision pair for this project's CPU machines (see docs/environment.md §1);
# the package itself does not pin torch.
TORCH_PINS := torch==2.14.1 torchvision==0.29.1

.PHONY: demo test setup clean

setup: $(STAMP)

$(STAMP): setup.py Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip "setuptools>=64" wheel
	$(BIN)/pip install -q $(TORCH_PINS)
	$(BIN)/pip install -q -e '.[test]'
	# facenet-pytorch 2.6.0 pins torch<2.3: install without its pins (it needs only
	# pillow, requests, tqdm and numpy, all installed above).
	$(BIN)/pip install -q --no-deps facenet-pytorch==2.6.0
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/guide-fast demo --out demo_out

test: $(STAMP)
	$(BIN)/python -m pytest -q tests

clean:
	rm -rf $(VENV) demo_out *.egg-info
