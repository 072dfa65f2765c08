"""bench.py run for real on tiny synthetic data: every mode measured, the ratios and the JSON line
printed (the figures themselves are the machine's, so only their presence and sign are checked)."""
import json

import pytest

import bench

TINY_BENCH = ["--quick", "--device", "cpu", "--image-size", "32", "--batch-size", "4", "--steps", "1",
              "--warmup", "0", "--workers", "0", "--gallery-size", "2"]
MODES = {"model", "e2e", "cached_e2e", "two_pass", "embed_once", "eval_pairs", "gallery", "external", "bootstrap"}


@pytest.mark.parametrize("backbone", ["resnet18", "efficientnet_lite0"])
def test_bench_measures_every_mode_and_prints_its_ratios(backbone, capsys):
    bench.main([*TINY_BENCH, "--backbone", backbone])
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert set(report["modes"]) == MODES and backbone in report["machine"]
    for ratio in ("e2e_over_model", "cached_e2e_over_model", "embed_once_over_two_pass", "eval_pairs_speedup",
                  "gallery_speedup", "external_speedup", "bootstrap_speedup"):
        assert report[ratio] > 0
    assert report["modes"]["gallery"]["gallery_images"] == 4
    assert report["modes"]["external"]["validation_images"] == 64  # --quick: as many as the test split
    assert report["modes"]["bootstrap"]["resamples"] == 200
