"""benchmarks/bench_largest.py: its grid parsing, the largest-model search (on a made-up
memory limit, no child processes), its MFU formula, and one tiny trial on the CPU with
--profile."""
import argparse
import json
import pathlib
import subprocess
import sys

import pytest

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "benchmarks"))
import bench_largest as bl  # noqa: E402


class FakeTrials:
    """Trials whose model fits up to ``limit`` layers; records the layers probed."""

    def __init__(self, limit, budget=10**6):
        self.limit, self.budget, self.probed = limit, budget, []

    def left(self):
        return self.budget

    def run(self, optimizer, layers, mbs, checkpointing, purpose):
        self.probed.append(layers)
        return {"status": "ok" if layers <= self.limit else "OOM"}


def search_args(**kw):
    base = dict(start_layers=96, layer_step=32, max_layers=400, resolution=4, min_trial_s=1)
    base.update(kw)
    return argparse.Namespace(**base)


@pytest.mark.parametrize("limit", [1, 40, 95, 96, 97, 150, 157, 158, 300])
def test_largest_search_brackets_the_limit(limit):
    trials = FakeTrials(limit)
    lo, hi = bl.search_largest(trials, "flora_accum_q8", search_args())
    assert lo is not None and lo <= limit < hi
    assert hi - lo <= 4
    assert len(trials.probed) == len(set(trials.probed))  # no layer count probed twice


def test_largest_search_reports_nothing_when_nothing_fits():
    lo, hi = bl.search_largest(FakeTrials(0), "adamw", search_args(start_layers=3,
                                                                    layer_step=1))
    assert lo is None and hi == 1


def test_largest_search_stops_at_max_layers():
    trials = FakeTrials(10**6)
    lo, hi = bl.search_largest(trials, "adamw", search_args(max_layers=200))
    assert hi is None and lo == max(trials.probed) <= 200


def test_largest_search_stops_when_the_budget_is_spent():
    trials = FakeTrials(150, budget=0)
    assert bl.search_largest(trials, "adamw", search_args()) == (None, None)
    assert trials.probed == []


def test_grid_parsing():
    assert bl.parse_grid("1:on 2:off") == [(1, True), (2, False)]
    for bad in ("0:on", "2:maybe", "x:on", "2"):
        with pytest.raises(argparse.ArgumentTypeError, match="MICRO_BATCH_SIZE"):
            bl.parse_grid(bad)


def test_mfu_counts_model_flops_only():
    trial = {"status": "ok", "params": 7e9, "layers": 32, "tokens_per_s": 1000.0}
    want = 1000.0 * (6 * 7e9 + 12 * 32 * 4096 * 2048) / 1e15
    assert bl.mfu(trial, 1000.0, 4096, 2048) == pytest.approx(want)
    assert bl.mfu(dict(trial, status="OOM"), 1000.0, 4096, 2048) is None


def test_profile_goes_to_a_directory_per_trial(tmp_path):
    pytest.importorskip("transformers")
    out = tmp_path / "largest.md"
    prof = tmp_path / "prof"
    proc = subprocess.run(
        [sys.executable, str(pathlib.Path(bl.__file__)), "--tiny", "--device", "cpu",
         "--optimizers", "flora_accum", "--searches", "best", "--grid", "1:off 2:off",
         "--quiet", "--profile", str(prof), "--out", str(out)],
        capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    trials = json.loads(out.with_suffix(".json").read_text())["trials"]
    assert [t["micro_batch_size"] for t in trials] == [1, 2]
    for t in trials:
        assert t["status"] == "ok"
        assert t["profile"]["wall_s"] > 0
        where = prof / f"flora_accum_L{t['layers']}_mbs{t['micro_batch_size']}_nockpt"
        assert (where / "flora_accum.txt").read_text().startswith("flora_accum: one optimizer step")


def test_plain_flora_steps_after_the_backward(tmp_path):
    """The `flora` arm (no accumulator: one step of every gradient after the backward)."""
    pytest.importorskip("transformers")
    out = tmp_path / "largest.md"
    proc = subprocess.run(
        [sys.executable, str(pathlib.Path(bl.__file__)), "--tiny", "--device", "cpu",
         "--optimizers", "flora", "--searches", "best", "--grid", "2:off", "--quiet",
         "--out", str(out)],
        capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    (trial,) = json.loads(out.with_suffix(".json").read_text())["trials"]
    assert trial["optimizer"] == "flora" and trial["status"] == "ok"
    assert trial["micro_batches"] == 2 and trial["tokens_per_s"] > 0
