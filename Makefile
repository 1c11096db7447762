# Two entry points (README): `make demo` and `make test`. Both create .venv on first use and
# reinstall only when setup.py or this Makefile change.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.guide-fast-installed
# The torch/torchvision pair for this project's CPU machines (see docs/environment.md §1);
# the package itself does not pin torch.
TORCH_PINS := torch==2.14.1 torchvision==0.29.1
# torch and torchvision with their CUDA libraries are ~6 GB: unpacking them took most of a fresh
# clone's set-up (~75 s). They are installed once per machine and Python version into a shared
# folder and put on each checkout's .venv path by a .pth file; `make clean-cache` removes it.
PYVER := $(shell $(PYTHON) -c 'import sys; print("%d.%d" % sys.version_info[:2])')
TORCH_SITE ?= $(or $(XDG_CACHE_HOME),$(HOME)/.cache)/guide-fast/site-py$(PYVER)-torch2.14.1-torchvision0.29.1

.PHONY: demo test setup clean clean-cache

setup: $(STAMP)

$(STAMP): setup.py Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip "setuptools>=64" wheel
	# the shared torch folder: built under a temporary name, then renamed (a concurrent build
	# that lost the race discards its copy)
	test -d $(TORCH_SITE) || { tmp=$(TORCH_SITE).tmp.$$$$; rm -rf $$tmp; mkdir -p $(dir $(TORCH_SITE)); \
	  if $(BIN)/pip install -q --target $$tmp $(TORCH_PINS); then mv -T $$tmp $(TORCH_SITE) 2>/dev/null || rm -rf $$tmp; \
	  else rm -rf $$tmp; exit 1; fi; }
	echo $(TORCH_SITE) > "$$($(BIN)/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')/guide-fast-torch.pth"
	# torchrun: torch's launcher through guide_fast.launch (a failed rank ends in one line, no traceback)
	printf '#!%s\nimport sys\nfrom guide_fast.launch import main\nsys.exit(main())\n' "$(abspath $(BIN))/python" > $(BIN)/torchrun
	chmod +x $(BIN)/torchrun
	$(BIN)/python -c 'import torch, torchvision; assert torch.__version__.startswith("2.14.1"), torch.__version__'
	# --no-compile: byte-compiling every dependency took half of this install (~15 s); Python
	# compiles what is imported on first use instead
	$(BIN)/pip install -q --no-compile -e '.[test]'
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

clean-cache:
	rm -rf $(TORCH_SITE)
