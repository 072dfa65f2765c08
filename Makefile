# make demo: set up .venv and fine-tune the ImageNet EfficientNet-Lite0 Siamese model on 600 real
#            ISIC 2017 lesions shipped in assets/ (CPU, a few minutes, no download)
# make test: the test suite (CPU, no network)
# make app: the local page (app.py) on the demo model, http://127.0.0.1:7860
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
DEMO_DATA := assets/isic2017_demo
DEMO_FLAGS := --backbone efficientnet_lite0 --weights imagenet --recipe transfer --image-size 128 --epochs 5 --batch-size 32 --benign-limit 0
# Synthetic lesions (synthetic.py --out) for make compare: every loss in a few minutes
SYNTHETIC_DATA := data/synthetic
SYNTHETIC_FLAGS := --weights none --image-size 64 --epochs 10 --batch-size 16 --lr 5e-4

# The real-data benchmarks (docs/results.md): same budget and seed for every row, CPU-sized.
# Make data/ham10000 and data/isic2017 first with to_subdirectories.py (README, "Data").
# Pretrained (the regime users run): ImageNet EfficientNet-Lite0, 128 px, 2 epochs.
PRETRAINED_FLAGS := --backbone efficientnet_lite0 --weights imagenet --image-size 128 --epochs 2 --batch-size 32 --cache cache --workers 1
# From random weights (the earlier tables): ResNet18, 96 px.
SCRATCH_FLAGS := --weights none --image-size 96 --batch-size 64 --benign-limit 0 --cache cache --save-every 500

.PHONY: install demo test app bench compare bench-ham bench-isic2017 bench-frozen bench-ham-scratch bench-isic2017-scratch \
	bench-ham-seeds bench-ham-long bench-ham-long-160 bench-ham-levers bench-ham-losses bench-ham-ensemble \
	bench-isic2017-extra bench-isic2017-long bench-isic2017-ensemble bench-isic2017-extra-long bench-new-clinic \
	figure clean

install: $(VENV)/installed

$(VENV)/installed: requirements.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade pip
	$(PY) -m pip install -r requirements.txt
	touch $@

$(SYNTHETIC_DATA): | install
	$(PY) synthetic.py --out $(SYNTHETIC_DATA)

demo: install
	$(PY) train.py --project runs/demo --data $(DEMO_DATA) $(DEMO_FLAGS) --force

test: install
	$(PY) -m pytest -q -n auto tests

$(VENV)/app-installed: requirements-app.txt requirements.txt | install
	$(PY) -m pip install -r requirements-app.txt
	touch $@

runs/demo/outputs/best.pth:
	@echo "no demo model yet: run make demo first"; exit 1

app: runs/demo/outputs/best.pth $(VENV)/app-installed
	$(PY) app.py --project runs/demo

bench: install
	$(PY) bench.py --quick

compare: install $(SYNTHETIC_DATA)
	$(PY) compare.py --project runs/compare --data $(SYNTHETIC_DATA) $(SYNTHETIC_FLAGS)

bench-ham: install
	$(PY) compare.py --project runs/ham --data data/ham10000 $(PRETRAINED_FLAGS) --benign-limit 1500 0 0 \
		--save-every 100000 --runs bce:transfer ce:transfer triplet:transfer contrastive:transfer bce:study

bench-isic2017: install
	$(PY) compare.py --project runs/isic2017 --data data/isic2017 $(PRETRAINED_FLAGS) --benign-limit 0 \
		--seeds 0 1 2 --runs bce:transfer ce:transfer triplet:transfer bce:study

# More training data: ISIC 2017 train + HAM10000 (train and validation), each run paired with its twin
# trained on ISIC 2017 alone (make bench-isic2017 first)
bench-isic2017-extra: install
	$(PY) compare.py --project runs/isic2017-extra --data data/isic2017 $(PRETRAINED_FLAGS) --benign-limit 0 \
		--extra-train data/ham10000 --seeds 0 1 2 --runs bce:transfer ce:transfer --against runs/isic2017

# The longer recipe HAM10000 chose (bench-ham-long), on ISIC 2017, paired with the 2-epoch runs
bench-isic2017-long: install
	$(PY) compare.py --project runs/isic2017-long --data data/isic2017 $(PRETRAINED_FLAGS) --benign-limit 0 \
		--epochs 6 --augment dermoscopy --tta --seeds 0 1 2 --runs bce:transfer ce:transfer triplet:transfer \
		contrastive:transfer --against runs/isic2017

# The ensemble HAM10000 chose (bench-ham-ensemble) on ISIC 2017 test: 3 runs of --recipe long for the
# Siamese model and for the classifier, each run and each ensemble paired with the classifier's
bench-isic2017-ensemble: install
	$(PY) compare.py --project runs/isic2017-ensemble --data data/isic2017 --backbone efficientnet_lite0 \
		--weights imagenet --image-size 128 --batch-size 32 --cache cache --workers 1 --benign-limit 0 \
		--seeds 0 1 2 --runs bce:long ce:long --ensemble 3

# HAM10000 added to training under --recipe long (30-42 minutes a run), each run and each ensemble
# paired with its twin in runs/isic2017-ensemble
bench-isic2017-extra-long: bench-isic2017-ensemble
	$(PY) compare.py --project runs/isic2017-ensemble-extra --data data/isic2017 --backbone efficientnet_lite0 \
		--weights imagenet --image-size 128 --batch-size 32 --cache cache --workers 1 --benign-limit 0 \
		--extra-train data/ham10000 --seeds 0 1 2 --runs bce:long ce:long --ensemble 3 --against runs/isic2017-ensemble

# HAM10000 validation over 3 seeds, and a longer recipe (6 epochs, dermoscopy augmentation, flip TTA)
# paired with it, run for run
HAM_FLAGS := --backbone efficientnet_lite0 --weights imagenet --image-size 128 --batch-size 32 --cache cache --workers 1 \
	--benign-limit 1500 0 0 --save-every 100000
bench-ham-seeds: install
	$(PY) compare.py --project runs/ham-2ep --data data/ham10000 $(HAM_FLAGS) --epochs 2 --seeds 0 1 2 \
		--runs bce:transfer ce:transfer

bench-ham-long: bench-ham-seeds
	$(PY) compare.py --project runs/ham-6ep --data data/ham10000 $(HAM_FLAGS) --epochs 6 --augment dermoscopy --tta \
		--seeds 0 1 2 --runs bce:transfer --against runs/ham-2ep

# The longer recipe at 160 px, paired with its 128 px twin
bench-ham-long-160: bench-ham-long
	$(PY) compare.py --project runs/ham-6ep-160 --data data/ham10000 $(HAM_FLAGS) --image-size 160 --epochs 6 \
		--augment dermoscopy --tta --seeds 0 1 2 --runs bce:transfer --against runs/ham-6ep

# Levers on top of the longer recipe, each paired with runs/ham-6ep run for run. Screened at seed 0
# (Lite2 and 12 epochs, which cost more minutes, were stopped there); the others over 3 seeds.
LONG_FLAGS := $(HAM_FLAGS) --epochs 6 --augment dermoscopy --tta --runs bce:transfer --against runs/ham-6ep
bench-ham-levers: bench-ham-long
	$(PY) compare.py --project runs/ham-6ep-lite2 --data data/ham10000 $(LONG_FLAGS) --backbone efficientnet_lite2 --seeds 0
	$(PY) compare.py --project runs/ham-12ep --data data/ham10000 $(LONG_FLAGS) --epochs 12 --seeds 0
	$(PY) compare.py --project runs/ham-6ep-pooled --data data/ham10000 $(LONG_FLAGS) --features pooled --seeds 0 1 2
	$(PY) compare.py --project runs/ham-6ep-ema --data data/ham10000 $(LONG_FLAGS) --ema 0.998 --seeds 0 1 2
	$(PY) compare.py --project runs/ham-6ep-probe --data data/ham10000 $(LONG_FLAGS) --probe-epochs 1 --seeds 0 1 2

# Every loss under --recipe long on HAM10000 validation, one seed, each paired with the classifier
# (comparison-every-loss.md); then the Siamese model and the classifier over 3 seeds, and the
# ensemble of each's 3 runs (comparison.md)
bench-ham-losses: install
	$(PY) compare.py --project runs/ham-long-losses --data data/ham10000 $(HAM_FLAGS) --seeds 0 \
		--runs bce:long ce:long triplet:long contrastive:long
	mv runs/ham-long-losses/results/comparison.md runs/ham-long-losses/results/comparison-every-loss.md
	$(PY) compare.py --project runs/ham-long-losses --data data/ham10000 $(HAM_FLAGS) --seeds 0 1 2 \
		--runs bce:long ce:long --ensemble 3

# Ensembles of 3 runs of --recipe long on HAM10000 validation: 9 seeds, 3 ensembles (seeds 0-2, 3-5
# and 6-8), each paired with its members
bench-ham-ensemble: install
	$(PY) compare.py --project runs/ham-ensemble --data data/ham10000 $(HAM_FLAGS) --runs bce:long \
		--seeds 0 1 2 3 4 5 6 7 8 --ensemble 3

# A HAM10000 model meets ISIC 2017 as a new clinic with k labelled images per class
bench-new-clinic: bench-ham-seeds
	$(PY) new_clinic.py --siamese runs/ham-2ep/bce-transfer-seed0 --classifier runs/ham-2ep/ce-transfer-seed0 \
		--clinic data/isic2017 --out runs/new_clinic

bench-frozen: install
	$(PY) frozen.py --data data/isic2017 --image-size 224 --cache cache
	$(PY) frozen.py --data data/isic2017 --image-size 128 --cache cache
	$(PY) frozen.py --data data/ham10000 --image-size 128 --benign-limit 1500 --cache cache

bench-ham-scratch: install
	$(PY) compare.py --project runs/ham-scratch --data data/ham10000 --epochs 8 $(SCRATCH_FLAGS) \
		--runs bce:study bce:tuned contrastive:tuned triplet:tuned ce:tuned

bench-isic2017-scratch: install
	$(PY) compare.py --project runs/isic2017-scratch --data data/isic2017 --epochs 12 --seeds 0 1 2 $(SCRATCH_FLAGS) \
		--runs bce:study bce:tuned triplet:tuned ce:tuned

figure: install
	$(PY) assets/draw_architecture.py

clean:
	rm -rf runs/demo runs/compare $(SYNTHETIC_DATA)
