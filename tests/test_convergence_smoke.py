"""CPU smoke test of benchmarks/data.py and benchmarks/convergence.py (issue 5).

A tiny model on a tiny generated corpus: checks the data split and cache, that
flora and adamw lower the loss (part 1), that every part-2 mode lowers the
fine-tuning loss, and that finished runs are skipped on a rerun.
"""
import json
import pathlib
import random
import sys

import pytest
import torch

BENCH = pathlib.Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCH))
import convergence  # noqa: E402
import data  # noqa: E402

WORDS = ("the optimizer keeps a compressed momentum of every weight matrix and "
         "resamples its random projection so that the updates are not low rank "
         "python documentation describes modules functions classes and examples").split()


def make_corpus(root: pathlib.Path, n_files=80):
    rng = random.Random(0)
    for i in range(n_files):
        sub = root / ("sub" if i % 3 == 0 else "")
        sub.mkdir(parents=True, exist_ok=True)
        lines = [" ".join(rng.choice(WORDS) for _ in range(12)).capitalize() + "."
                 for _ in range(20)]
        (sub / f"doc{i:03d}.txt").write_text("\n".join(lines) + "\n")
    (root / ".hidden.txt").write_text("skipped")
    (root / "blob.bin").write_bytes(b"\0\1\2")


def test_data_split_and_cache(tmp_path):
    src, out = tmp_path / "src", tmp_path / "cache"
    make_corpus(src)
    d1 = data.prepare(src, out, [".txt"])
    meta = data.read_meta(d1)
    files = [rel for rel, _ in data.list_files(src, [".txt"])]
    assert ".hidden.txt" not in files and len(files) == 80
    for split in data.SPLITS:
        assert meta["files"][split], split
        assert all(data.split_of(f) == split for f in meta["files"][split])
    splits = data.load_splits(d1)
    total = sum((src / f).stat().st_size + 1 for f in files)
    assert sum(t.numel() for t in splits.values()) == total
    assert all(t.dtype == torch.uint8 for t in splits.values())
    assert data.prepare(src, out, [".txt"]) == d1  # cache hit: same directory
    (src / "doc001.txt").write_text("changed size\n")
    assert data.prepare(src, out, [".txt"]) != d1  # new key
    # binary files are skipped when no extension filter is given
    d3 = data.prepare(src, tmp_path / "cache_all")
    assert data.read_meta(d3)["skipped_binary"] == ["blob.bin"]


def test_part1_smoke_and_resume(tmp_path, capsys):
    src = tmp_path / "src"
    make_corpus(src)
    ddir = data.prepare(src, tmp_path / "cache", [".txt"])
    run_dir = tmp_path / "runs"
    argv = ["--part", "1", "--data", str(ddir), "--run-dir", str(run_dir),
            "--optimizers", "flora:rank=8:kappa=10:lr=0.1,adamw:lr=0.01", "--seeds", "0",
            "--model-size", "tiny", "--steps", "40", "--batch-size", "8",
            "--eval-every", "20", "--ckpt-every", "20", "--eval-windows", "32",
            "--device", "cpu", "--no-progress"]
    torch.manual_seed(0)
    logs = convergence.main(argv)
    assert [lg["optimizer"]["name"] for lg in logs] == ["flora", "adamw"]
    for lg in logs:
        assert lg["finished"]
        first, last = lg["val"][0][1], lg["final_val_loss"]
        assert last < first - 0.3, (lg["run"], first, last)
        assert lg["train_loss"][-1][1] < lg["train_loss"][0][1]
        assert lg["optimizer_state_bytes"] > 0 and lg["tokens_per_s"] > 0
        saved = json.loads((run_dir / lg["run"] / "log.json").read_text())
        assert saved["finished"] and saved["final_val_loss"] == last
        assert (run_dir / lg["run"] / "ckpt.pt").is_file()
    # Flora's compressed momentum holds less state than AdamW's two moments
    assert logs[0]["optimizer_state_bytes"] < logs[1]["optimizer_state_bytes"]
    capsys.readouterr()
    again = convergence.main(argv)
    out = capsys.readouterr().out
    assert out.count("[skip]") == 2
    assert [lg["final_val_loss"] for lg in again] == [lg["final_val_loss"] for lg in logs]


def test_part2_smoke(tmp_path, capsys):
    src = tmp_path / "src"
    make_corpus(src)
    ddir = data.prepare(src, tmp_path / "cache", [".txt"])
    common = ["--data", str(ddir), "--seeds", "0", "--model-size", "tiny", "--batch-size", "8",
              "--eval-windows", "16", "--device", "cpu", "--no-progress"]
    (init,) = convergence.main(["--part", "1", "--run-dir", str(tmp_path / "p1"),
                                "--optimizers", "adamw:lr=0.01", "--steps", "20",
                                "--eval-every", "20"] + common)
    argv = ["--part", "2", "--run-dir", str(tmp_path / "p2"),
            "--init-from", str(tmp_path / "p1" / init["run"]), "--rank", "4", "--accum", "3",
            "--micro-batch-size", "4", "--steps", "12", "--eval-every", "6", "--lr", "0.03",
            "--lora-lr", "0.01"] + common
    logs = convergence.main(argv)
    assert [lg["mode"] for lg in logs] == list(convergence.PART2_MODES)
    for lg in logs:
        assert lg["finished"]
        assert lg["final_val_loss"] < lg["val"][0][1], (lg["run"], lg["val"])
        assert lg["val"][-1][0] == 12 * 3 * 4 * 32  # same tokens for every mode
    by_mode = {lg["mode"]: lg for lg in logs}
    assert by_mode["lora"]["trainable_parameters"] < by_mode["naive"]["trainable_parameters"]
    assert by_mode["small_batch"]["updates"] == 36
    capsys.readouterr()
    convergence.main(argv)
    assert capsys.readouterr().out.count("[skip]") == 4


def test_bad_arguments(tmp_path):
    args = convergence.build_parser().parse_args(["--data", "x", "--run-dir", "y"])
    with pytest.raises(ValueError, match="unknown optimizer"):
        convergence.parse_spec("sgd", args)
    with pytest.raises(ValueError, match="bad optimizer option"):
        convergence.parse_spec("flora:foo=1", args)
    assert convergence.parse_spec("flora:rank=64:kappa=100", args)["rank"] == 64
    with pytest.raises(SystemExit, match="init-from"):
        convergence.main(["--part", "2", "--data", "x", "--run-dir", str(tmp_path)])


def test_part1_resume_after_interrupt_is_exact(tmp_path, monkeypatch):
    src = tmp_path / "src"
    make_corpus(src)
    ddir = data.prepare(src, tmp_path / "cache", [".txt"])

    def argv(run_dir):
        return ["--data", str(ddir), "--run-dir", str(tmp_path / run_dir), "--optimizers",
                "flora:rank=8:kappa=7:lr=0.1", "--model-size", "tiny", "--steps", "30",
                "--batch-size", "4", "--eval-every", "10", "--ckpt-every", "10",
                "--eval-windows", "8", "--device", "cpu", "--no-progress"]

    (whole,) = convergence.main(argv("a"))
    original, calls = convergence.sample_batch, [0]

    def interrupted(*args):
        calls[0] += 1
        if calls[0] == 15:  # after the checkpoint at step 10
            raise KeyboardInterrupt
        return original(*args)

    monkeypatch.setattr(convergence, "sample_batch", interrupted)
    with pytest.raises(KeyboardInterrupt):
        convergence.main(argv("b"))
    monkeypatch.setattr(convergence, "sample_batch", original)
    (resumed,) = convergence.main(argv("b"))
    assert resumed["val"] == whole["val"]
    assert resumed["final_test_loss"] == whole["final_test_loss"]
