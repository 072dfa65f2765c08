"""frozen.py run for real on the tiny synthetic split: both baseline rows fitted on train, their
setting chosen on validation, scored on validation and test, written to --out."""
import json
import os
import signal

import pytest

import frozen


def test_frozen_features_give_both_baseline_rows(tiny_data_dir, tmp_path, capsys):
    out = tmp_path / "frozen.json"
    frozen.main(["--data", str(tiny_data_dir), "--weights", "none", "--image-size", "32", "--workers", "0",
                 "--benign-limit", "6", "--out", str(out)])
    results = json.loads(out.read_text())
    assert results["benign_limit"] == 6 and set(results["rows"]) == {"logistic regression", "k-NN"}
    assert results["rows"]["logistic regression"]["C"] in frozen.LOGISTIC_C
    assert results["rows"]["k-NN"]["k"] <= 12  # k above the 12 training images is never tried
    for row in results["rows"].values():
        for split in ("validation", "test"):
            assert 0 <= row[split]["auc_ci_low"] <= row[split]["auc"] <= row[split]["auc_ci_high"] <= 1
    assert "logistic regression" in capsys.readouterr().out


def test_frozen_bad_data_is_one_line(tmp_path):
    with pytest.raises(SystemExit) as exit_:
        frozen.main(["--data", str(tmp_path / "missing")])
    assert str(exit_.value.code).startswith("frozen.py: error: --data")


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_an_interrupt_while_embedding_is_one_line_and_writes_nothing(signum, tiny_data_dir, tmp_path, monkeypatch,
                                                                     capsys):
    def embed_then_interrupted(*args, **kwargs):
        os.kill(os.getpid(), signum)  # Ctrl-C or kill, as the embedding runs
        raise AssertionError("the signal did not stop frozen.py")
    monkeypatch.setattr(frozen, "embed_images", embed_then_interrupted)
    out = tmp_path / "frozen.json"
    before = signal.getsignal(signal.SIGINT)  # SIG_IGN, not Python's handler, when pytest runs in the background
    with pytest.raises(SystemExit) as exit_:
        frozen.main(["--data", str(tiny_data_dir), "--weights", "none", "--image-size", "32", "--workers", "0",
                     "--out", str(out)])
    assert exit_.value.code == 128 + signum
    assert capsys.readouterr().err.strip().splitlines() == [
        f"frozen.py: stopped by {signal.Signals(signum).name}; nothing was written"]
    assert not out.exists() and signal.getsignal(signal.SIGINT) is before
