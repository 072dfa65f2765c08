# make demo: set up .venv and train + evaluate on synthetic lesions (CPU, a few minutes)
# make test: the test suite (CPU, no network)
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
DEMO_DATA := data/demo
DEMO_FLAGS := --weights none --image-size 64 --epochs 10 --batch-size 16 --lr 5e-4

# The real-data benchmarks (docs/results.md): same budget and seed for every row, CPU-sized.
# Make data/ham10000 and data/isic2017 first with to_subdirectories.py (README, "Data").
BENCH_FLAGS := --weights none --image-size 96 --batch-size 64 --benign-limit 0 --cache cache --save-every 500

.PHONY: install demo test bench compare bench-ham bench-isic2017 figure clean

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

bench-ham: install
	$(PY) compare.py --project runs/ham --data data/ham10000 --epochs 8 $(BENCH_FLAGS) \
		--runs bce:study bce:tuned contrastive:tuned triplet:tuned ce:tuned

bench-isic2017: install
	$(PY) compare.py --project runs/isic2017 --data data/isic2017 --epochs 12 --seeds 0 1 2 $(BENCH_FLAGS) \
		--runs bce:study bce:tuned triplet:tuned ce:tuned

figure: install
	$(PY) assets/draw_architecture.py

clean:
	rm -rf runs/demo $(DEMO_DATA)
