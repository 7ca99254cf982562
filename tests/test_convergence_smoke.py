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
            "--optimizers", "flora:rank=8:kappa=10:lr=0.1,adamw:lr=0.01,flora:rank=8:kappa=10:lr=0.1:q8=1",
            "--seeds", "0",
            "--model-size", "tiny", "--steps", "40", "--batch-size", "8",
            "--eval-every", "20", "--ckpt-every", "20", "--eval-windows", "32",
            "--device", "cpu", "--no-progress"]
    torch.manual_seed(0)
    logs = convergence.main(argv)
    assert [lg["optimizer"]["name"] for lg in logs] == ["flora", "adamw", "flora"]
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
    # q8=1 (quantization=True): less state again, and a loss close to float32 state's
    assert logs[2]["run"].endswith("-q8-lr0.1-s0")
    assert logs[2]["optimizer_state_bytes"] < logs[0]["optimizer_state_bytes"]
    assert abs(logs[2]["final_val_loss"] - logs[0]["final_val_loss"]) < 0.05
    capsys.readouterr()
    again = convergence.main(argv)
    out = capsys.readouterr().out
    assert out.count("[skip]") == 3
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


def tiny_flora_run(tmp_path, ckpt_every):
    """argv(run_dir) of a 30-step tiny Flora part-1 run on CPU over freshly prepared data."""
    src = tmp_path / "src"
    make_corpus(src)
    ddir = data.prepare(src, tmp_path / "cache", [".txt"])

    def argv(run_dir):
        return ["--data", str(ddir), "--run-dir", str(tmp_path / run_dir), "--optimizers",
                "flora:rank=8:kappa=7:lr=0.1", "--model-size", "tiny", "--steps", "30",
                "--batch-size", "4", "--eval-every", "10", "--ckpt-every", str(ckpt_every),
                "--eval-windows", "8", "--device", "cpu", "--no-progress"]
    return argv


def test_part1_resume_after_interrupt_is_exact(tmp_path, monkeypatch):
    argv = tiny_flora_run(tmp_path, ckpt_every=10)
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


@pytest.fixture
def restore_threads():
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


def test_sweep_parallel_lr_choice_part2_best_and_report(tmp_path, capsys, restore_threads):
    """The pipeline of tools/gpu_convergence.sh in small: an lr sweep in 2 worker processes,
    part 1 at the chosen lr, part 2 from the best part-1 run, then the report."""
    src = tmp_path / "src"
    make_corpus(src)
    ddir = data.prepare(src, tmp_path / "cache", [".txt"])
    runs = tmp_path / "runs"
    common = ["--data", str(ddir), "--model-size", "tiny", "--batch-size", "8",
              "--eval-windows", "16", "--device", "cpu", "--no-progress", "--threads", "1"]
    p1 = ["--part", "1", "--run-dir", str(runs / "part1"), "--steps", "20", "--eval-every", "10",
          "--optimizers", "adamw,flora:rank=8:kappa=7"] + common
    sweep = convergence.main(p1 + ["--lr-sweep", "--seeds", "0", "--jobs", "2"])
    assert len(sweep) == 6 and all(lg["finished"] for lg in sweep)
    assert [lg["optimizer"]["lr"] for lg in sweep[:3]] == convergence.LR_GRIDS["adamw"]
    for lg in sweep:  # each run's output went to its own file; timing and clock are logged
        assert (runs / "part1" / lg["run"] / "output.txt").is_file()
        assert lg["steady_tokens_per_s"] > 0 and lg["clock"][-1][0] == 20
    best = {name: min((lg for lg in sweep if lg["optimizer"]["name"] == name),
                      key=lambda lg: lg["final_val_loss"])["optimizer"]["lr"]
            for name in ("adamw", "flora")}
    capsys.readouterr()
    part1 = convergence.main(p1 + ["--lr-from", str(runs / "part1"), "--seeds", "0,1",
                                   "--optimizers", "adamw,flora:rank=8:kappa=7,flora:rank=8:kappa=1000",
                                   "--jobs", "2"])
    assert [lg["optimizer"]["lr"] for lg in part1] == [best["adamw"]] * 2 + [best["flora"]] * 4
    choice = json.loads((runs / "part1" / "lr_choice.json").read_text())
    assert choice["adamw"]["lr"] == best["adamw"] and choice["adamw"]["match"] == "strict"
    assert choice["flora:rank=8:kappa=1000"]["match"] == "name"  # takes flora's lr
    seed0 = [lg for lg in part1 if lg["seed"] == 0 and lg["optimizer"]["kappa"] != 1000]
    assert all(lg["run"] in {s["run"] for s in sweep} for lg in seed0)  # reused, not rerun

    logs2 = convergence.main(["--part", "2", "--run-dir", str(runs / "part2"),
                              "--init-from", f"best:{runs / 'part1'}", "--rank", "4",
                              "--accum", "2", "--micro-batch-size", "4", "--steps", "4",
                              "--eval-every", "2", "--seeds", "0,1", "--lr", "0.03"] + common)
    best_run = min((lg for lg in part1 + sweep if lg["finished"]),
                   key=lambda lg: lg["final_val_loss"])
    assert all(lg["init_from"] == str(runs / "part1" / best_run["run"]) for lg in logs2)
    assert all(lg["finished"] and lg["steady_tokens_per_s"] > 0 for lg in logs2)

    import convergence_report

    convergence_report.main([str(runs), "--out", str(tmp_path / "report")])
    md = (tmp_path / "report" / "convergence.md").read_text()
    assert "## Claim check" in md and "**Verdict:" in md
    assert "learning-rate sweep" in md and "Part 2" in md
    assert f"| AdamW (betas=(0.9, 0.95)) | **{best['adamw']:g}** |" in md


def test_deadline_stops_and_resumes_exactly(tmp_path, monkeypatch):
    argv = tiny_flora_run(tmp_path, ckpt_every=100)
    (whole,) = convergence.main(argv("a"))
    calls = [0]

    def past(args):
        calls[0] += 1
        return calls[0] > 13  # the deadline passes during step 13
    monkeypatch.setattr(convergence, "past_deadline", past)
    (stopped,) = convergence.main(argv("b"))
    assert not stopped["finished"] and stopped["stopped_early"] == "deadline"
    assert stopped["val"][-1][0] == 13 * 4 * 32  # evaluated where it stopped
    assert (tmp_path / "b" / stopped["run"] / "ckpt.pt").is_file()
    # past the deadline, a new run is not even started
    (skipped,) = convergence.main(argv("c"))
    assert skipped.get("skipped") == "deadline" and not (tmp_path / "c").exists()
    monkeypatch.undo()
    (resumed,) = convergence.main(argv("b"))
    assert resumed["finished"] and "stopped_early" not in resumed
    assert resumed["final_test_loss"] == whole["final_test_loss"]
    assert resumed["final_val_loss"] == whole["final_val_loss"]


def test_galore_import_stubs_bitsandbytes(tmp_path, monkeypatch):
    """galore-torch imports bitsandbytes (absent on the device) for its 8-bit AdamW only."""
    pkg = tmp_path / "galore_torch"
    pkg.mkdir()
    (pkg / "__init__.py").write_text(
        "from bitsandbytes.optim.optimizer import Optimizer2State\n"
        "class AdamW8bit(Optimizer2State):\n    pass\n"
        "GaLoreAdamW = 'stand-in'\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    keys = ("bitsandbytes", "bitsandbytes.optim", "bitsandbytes.optim.optimizer",
            "bitsandbytes.functional", "galore_torch")
    saved = {k: sys.modules.pop(k) for k in keys if k in sys.modules}
    try:
        from flora_ext.testing import import_flora_opt  # its bitsandbytes stub first

        import_flora_opt()
        galore = convergence.import_galore()
        assert galore.GaLoreAdamW == "stand-in"
        with pytest.raises(RuntimeError, match="bitsandbytes stub"):
            galore.AdamW8bit([torch.zeros(1, requires_grad=True)])
        assert hasattr(sys.modules["bitsandbytes"], "functional")  # flora-opt's stub kept
    finally:
        for k in keys:
            sys.modules.pop(k, None)
        sys.modules.update(saved)
