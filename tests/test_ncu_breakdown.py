"""benchmarks/probes/ncu_breakdown.py on a small CSV in ncu's format: kernel names
shortened, launches split into steps at the stats launches, one step's per-kernel sums."""
import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "benchmarks", "probes"))
import ncu_breakdown  # noqa: E402

HEADER = ('"ID","Process ID","Process Name","Host Name","Kernel Name","Context","Stream",'
          '"Block Size","Grid Size","Device","CC","Section Name","Metric Name","Metric Unit",'
          '"Metric Value"')


def rows(launch_id, kernel, ns, read, write):
    head = (f'"{launch_id}","1","python3","h","{kernel}","1","7","(256, 1, 1)","(8, 1, 1)",'
            '"0","9.0","m"')
    return [f'{head},"gpu__time_duration.sum","ns","{ns:,}"',
            f'{head},"dram__bytes_read.sum","byte","{read:,}"',
            f'{head},"dram__bytes_write.sum","Mbyte","{write}"']


STATS = "void (anonymous namespace)::stats_kernel<1>(TaskTable, GroupArgs, int)"
APPLY = ("void flora::cuda_detail::(anonymous namespace)::fused_apply_kernel<1>(TaskTable, "
         "GroupArgs)")
GEMM = "void cutlass::Kernel2<cutlass_80_tensorop_s1688gemm_64x64_32x6_nn_align4>(T1::Params)"


def csv_lines(step_count):
    lines = ["==PROF== Connected to process 1", HEADER]
    launch = 0
    for step in range(step_count):
        for kernel, ns in [(STATS, 4_000_000), (STATS, 3_000_000), (APPLY, 6_000_000),
                           (GEMM, 100_000), (APPLY, 5_000_000 + step)]:
            lines += rows(launch, kernel, ns, 2_000_000_000, 1.5)
            launch += 1
    return lines


def test_short_names():
    assert ncu_breakdown.short_name(STATS) == "stats_kernel<1>"
    assert ncu_breakdown.short_name(APPLY) == "fused_apply_kernel<1>"
    assert ncu_breakdown.short_name(GEMM) == (
        "Kernel2<cutlass_80_tensorop_s1688gemm_64x64_32x6_nn_align4>")
    assert ncu_breakdown.short_name("unnamed>::finalize_kernel(TaskTable)") == "finalize_kernel"


def test_steps_start_at_stats_launches_and_sum_per_kernel():
    found = ncu_breakdown.steps(ncu_breakdown.launches(csv_lines(3)))
    assert [len(s) for s in found] == [5, 5, 5]
    table = ncu_breakdown.breakdown(found[2])
    names = [r[0] for r in table]
    assert names == ["fused_apply_kernel<1>", "stats_kernel<1>",
                     "Kernel2<cutlass_80_tensorop_s1688gemm_64x64_32x6_nn_align4>"]
    apply_ms, apply_launches, apply_gb = table[0][1:4]
    assert abs(apply_ms - 11.000002) < 1e-9 and apply_launches == 2
    assert abs(apply_gb - 2 * (2.0 + 1.5e-3)) < 1e-9  # Mbyte scaled


def test_an_unknown_unit_is_refused_naming_it():
    lines = csv_lines(1)
    lines[-1] = lines[-1].replace('"Mbyte"', '"Pbyte"')
    with pytest.raises(ValueError, match="unit 'Pbyte' of dram__bytes_write.sum"):
        ncu_breakdown.launches(lines)


def test_main_reports_the_last_complete_step(tmp_path, capsys):
    path = tmp_path / "ncu.csv"
    path.write_text("\n".join(csv_lines(3)[:-9]) + "\n")  # the third step cut short
    ncu_breakdown.main(str(path))
    out = capsys.readouterr().out
    assert out.startswith("3 steps; step 2: 5 launches, 18.10 ms of kernel time")
    assert "| fused_apply_kernel<1> | 11.000 | 2 |" in out
