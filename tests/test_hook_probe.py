"""benchmarks/probes/hook_probe.py: a tiny run on the CPU measures every mode."""
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "benchmarks", "probes"))
import hook_probe  # noqa: E402


def test_hook_probe_times_every_mode(capsys):
    results = hook_probe.main(["--device", "cpu", "--layers", "4", "--width", "32",
                               "--rank", "4", "--passes", "2", "--warmup", "1"])
    assert set(results) == set(hook_probe.MODES)
    assert all(ms > 0 for ms in results.values())
    out = capsys.readouterr().out
    assert "us a parameter over none" in out and out.count("ms host a backward pass") == 4
