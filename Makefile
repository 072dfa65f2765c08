# make demo: set up .venv and train + evaluate on synthetic lesions (CPU, a few minutes)
# make test: the test suite (CPU, no network)
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
DEMO_DATA := data/demo
DEMO_FLAGS := --weights none --image-size 64 --epochs 10 --batch-size 16 --lr 5e-4

.PHONY: install demo test bench compare figure clean

install: $(VENV)/installed

$(VENV)/installed: requirements.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade pip
	$(PY) -m pip install -r requirements.txt
	touch $@

$(DEMO_DATA): | install
	$(PY) dataset.py --synthetic $(DEMO_DATA)

demo: install $(DEMO_DATA)
	$(PY) train.py --project runs/demo --data $(DEMO_DATA) $(DEMO_FLAGS) --force

test: install
	$(PY) -m pytest -q tests

bench: install
	$(PY) bench.py --quick

compare: install $(DEMO_DATA)
	$(PY) compare.py --project runs/compare --data $(DEMO_DATA) $(DEMO_FLAGS)

figure: install
	$(PY) assets/draw_architecture.py

clean:
	rm -rf runs/demo $(DEMO_DATA)
