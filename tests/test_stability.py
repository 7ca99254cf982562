"""benchmarks/stability.py (issue 27): its momentum transfers against the float64 reference
(tests/reference.py, ``transfer``), its plain-torch Flora (ProbeFlora) against the extension
and, with orthogonalised projections, against the reference; its spike count and report on
made-up runs."""
import json
import math
import pathlib
import sys

import pytest
import torch

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
BENCH = pathlib.Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCH))
import reference as ref  # noqa: E402
import stability  # noqa: E402

import flora_ext  # noqa: E402
from conftest import rel_err  # noqa: E402


@pytest.mark.parametrize("transfer", stability.TRANSFERS)
@pytest.mark.parametrize("shape", [(12, 40), (40, 12), (24, 24)])
def test_transfer_matches_the_reference(transfer, shape):
    hp = ref.full_hp(lr=0.05, rank=6, kappa=3, beta1=0.9)
    gen = torch.Generator().manual_seed(7)
    p = torch.nn.Parameter(torch.randn(shape, generator=gen) * 0.1)
    opt = flora_ext.Flora([p], **ref.optimizer_kwargs(hp, 11))
    mover = stability.MomentumTransfer(opt, {p: "w"}, transfer)
    ref_p = p.detach().double().clone()
    ref_state = ref.init_state(ref_p, hp, ref.param_seed(11, 1))
    for t in range(1, 11):
        g = torch.randn(shape, generator=gen)
        p.grad = g
        mover.step()
        ref_p = ref.reference_step(ref_p, g.double(), ref_state, hp, transfer=transfer)
        assert opt.state[p]["seed"] == ref_state["seed"], f"step {t}"
        assert rel_err(opt.state[p]["momentum"], ref_state["momentum"]) < 2e-5, f"step {t}"
        assert rel_err(p.detach(), ref_p) < 2e-5, f"step {t}"
    # steps 3, 6 and 9 changed basis: one record each
    assert [r[0] for r in mover.records] == [3, 6, 9]
    for _, _, before, after, c in mover.records:
        want = {"flora_opt": None, "norm_preserving": before, "reset": 0.0,
                "least_squares": None}[transfer]
        if transfer == "flora_opt":
            assert c == 1.0 and after > before  # a Gaussian transfer inflates the norm
        elif transfer == "least_squares":
            assert 0.0 < c < 1.0  # shrinks the moved momentum
        else:
            assert after == pytest.approx(want, rel=1e-5)


def test_norm_preserving_differs_from_flora_opt_only_at_resamples():
    hp = ref.full_hp(lr=0.05, rank=6, kappa=4, beta1=0.9)
    gen = torch.Generator().manual_seed(3)
    p0 = torch.randn(12, 40, generator=gen, dtype=torch.float64)
    grads = [torch.randn(12, 40, generator=gen, dtype=torch.float64) for _ in range(5)]
    out = {}
    for transfer in ("flora_opt", "norm_preserving"):
        p, state, ms = p0.clone(), ref.init_state(p0, hp, 1), []
        for g in grads:
            p = ref.reference_step(p, g, state, hp, transfer=transfer)
            ms.append(state["momentum"].clone())
        out[transfer] = ms
    for t in range(3):
        assert torch.equal(out["flora_opt"][t], out["norm_preserving"][t])
    assert not torch.allclose(out["flora_opt"][3], out["norm_preserving"][3])


def test_reference_rejects_an_unknown_transfer():
    with pytest.raises(ValueError, match="transfer must be one of"):
        ref.transfer_scale("orthogonal", torch.ones(1), torch.ones(1))


SHAPES = [(12, 40), (40, 12), (24, 24), (12, 60)]  # left, right, square, dense momentum


def _probe_pair(projection, seed=11):
    gen = torch.Generator().manual_seed(5)
    params = [torch.nn.Parameter(torch.randn(s, generator=gen) * 0.1) for s in SHAPES]
    params.append(torch.nn.Parameter(torch.randn(12, generator=gen) * 0.1))
    opt = stability.ProbeFlora(params, lr=0.05, rank=6, kappa=3, beta1=0.9, seed=seed,
                               projection=projection)
    return params, opt, gen


def test_probe_gaussian_follows_the_extension():
    params, opt, gen = _probe_pair("gaussian")
    twins = [torch.nn.Parameter(p.detach().clone()) for p in params]
    ext = flora_ext.Flora(twins, lr=0.05, rank=6, kappa=3, beta1=0.9, seed=11)
    for t in range(1, 9):
        for p, q in zip(params, twins):
            p.grad = torch.randn(p.shape, generator=gen)
            q.grad = p.grad.clone()
        opt.step()
        ext.step()
        for p, q in zip(params, twins):
            assert rel_err(p.detach(), q.detach()) < 2e-6, f"step {t}, shape {tuple(p.shape)}"
            if "seed" in ext.state[q]:
                assert opt.state[p]["seed"] == ext.state[q]["seed"]


def _orthogonal_reference_projection(seed, rows, cols, rank):
    left = rows == rank and cols != rank  # projection_matrix's r x n (left) or m x r (right)
    return stability.orthogonalised(ref.ext_projection(seed, rows, cols, rank), left)


def test_probe_orthogonal_matches_the_float64_reference():
    params, opt, gen = _probe_pair("orthogonal")
    hp = ref.full_hp(lr=0.05, rank=6, kappa=3, beta1=0.9)
    refs = [p.detach().double().clone() for p in params]
    states = [ref.init_state(r, hp, ref.param_seed(11, i + 1)) for i, r in enumerate(refs)]
    for t in range(1, 9):
        grads = [torch.randn(p.shape, generator=gen) for p in params]
        for p, g in zip(params, grads):
            p.grad = g
        opt.step()
        for i, g in enumerate(grads):
            refs[i] = ref.reference_step(refs[i], g.double(), states[i], hp,
                                         projection=_orthogonal_reference_projection)
        for p, r in zip(params, refs):
            assert rel_err(p.detach(), r) < 2e-5, f"step {t}, shape {tuple(p.shape)}"


@pytest.mark.parametrize("shape,left", [((12, 40), True), ((40, 12), False)])
def test_orthogonalised_has_equal_singular_values(shape, left):
    P = stability._projection(3, shape, 6, "cpu")
    Q = stability.orthogonalised(P, left)
    assert Q.shape == P.shape
    long = P.shape[1] if left else P.shape[0]
    sv = torch.linalg.svdvals(Q.double())
    assert torch.allclose(sv, torch.full_like(sv, math.sqrt(long / 6)), rtol=1e-5)
    sv_gauss = torch.linalg.svdvals(P.double())
    assert sv_gauss.max() / sv_gauss.min() > 1.5  # the Gaussian's spread that it removes
    assert torch.equal(Q, stability.orthogonalised(stability._projection(3, shape, 6, "cpu"),
                                                   left))
    # the same subspace as the Gaussian P: only the singular values change
    A, B = (P.t(), Q.t()) if left else (P, Q)
    proj = B @ torch.linalg.pinv(B)
    assert torch.allclose(proj @ A, A, atol=1e-4)


@pytest.mark.parametrize("shape,left", [((12, 40), True), ((40, 12), False)])
def test_subspace_projection_is_orthonormal(shape, left):
    P = stability._projection(3, shape, 6, "cpu")
    Q = stability.orthogonalised(P, left, scale=False).double()
    gram = Q @ Q.t() if left else Q.t() @ Q
    assert torch.allclose(gram, torch.eye(6, dtype=torch.float64), atol=1e-5)


def test_probe_rejects_an_unknown_projection():
    p = torch.nn.Parameter(torch.zeros(4, 4))
    with pytest.raises(ValueError, match="projection must be one of"):
        stability.ProbeFlora([p], lr=0.1, rank=2, kappa=2, beta1=0.9, seed=0, projection="x")


def test_spikes_counts_rises_above_the_running_low():
    flat = [3.0 - 0.001 * i for i in range(400)]
    assert stability.spikes(flat) == 0
    spiky = list(flat)
    for i in range(200, 260):
        spiky[i] += 0.5
    for i in range(300, 330):
        spiky[i] += 0.5
    assert stability.spikes(spiky) == 2


def _fake_run(variant, transfer, seed, val, losses, kappa=10):
    return {"args": {"variant": variant, "transfer": transfer, "rank": 128, "proj_seed": seed,
                     "lr": 0.03,
                     "data_seed": seed, "kappa": kappa, "d_model": 32, "n_layers": 1,
                     "n_heads": 2, "context": 32, "batch_size": 4},
            "torch": torch.__version__, "device": "cpu", "parameters": 1000,
            "loss": losses, "val": [[len(losses), val]], "final_val_loss": val,
            "finished": True, "layers": ["w"],
            "diagnostics": [[5, [[1.0, 1.7, 3.0]]], [12, [[1.0, 2.9, 3.0]]]],
            "resamples": [[10, "w", 1.0, 1.7, 1.0]] if variant == "flora" else []}


def test_report_writes_the_section(tmp_path):
    runs = tmp_path / "runs"
    runs.mkdir()
    (tmp_path / "plan.json").write_text(json.dumps(
        {"steps": 100, "kappa": 10, "lr": 0.03, "concurrent": 5, "dropped": []}))
    good = [3.0 - 0.01 * i for i in range(100)]
    bad = list(good)
    for i in range(60, 100):
        bad[i] += 1.0
    for s in range(2):
        (runs / f"am{s}.json").write_text(json.dumps(
            _fake_run("adafactor_momentum", "flora_opt", s, 1.0, good)))
    (runs / "f0.json").write_text(json.dumps(_fake_run("flora", "flora_opt", 0, 1.01, good)))
    (runs / "f1.json").write_text(json.dumps(_fake_run("flora", "flora_opt", 1, 1.5, bad)))
    md = tmp_path / "conv.md"
    md.write_text("# title\n\n## Stability across projection seeds\nold\n\n## Later\nkept\n")
    stability.main(["report", "--runs", str(tmp_path), "--md", str(md), "--plot", str(tmp_path / "s.svg")])
    import xml.etree.ElementTree as ET
    assert len(list(ET.parse(tmp_path / "s.svg").getroot())) > 10
    text = md.read_text()
    assert "\nold\n" not in text and "\n\n## Later\nkept" in text
    row = next(line for line in text.splitlines() if "transfer=flora_opt, lr=0.03 |" in line)
    assert "| 1.0100 | 1.5000 |" in row and "| 1/2 | 1/2 |" in row
    assert "| Flora r=128, transfer=flora_opt, lr=0.03 | 1.700 | 1.700 | 1.700 | 2.900 |" in text
    assert "| Adafactor + momentum (dense), lr=0.03 | - | - | 2.300 | - |" in text
    assert "| 1.2550 | 1.5000 | 1.255 | 1.500 | 1/2 | 1/2 |" in row
    assert math.isclose(stability.transfer_scale("norm_preserving", 2.0, 4.0), 0.5)
    assert math.isclose(stability.transfer_scale("least_squares", 2.0, 4.0, 4.0), 0.25)


@pytest.mark.parametrize("clip_threshold", [100.0, 0.01])
def test_diagnostics_direction_matches_the_parameter_change(clip_threshold):
    """RMS(D) the diagnostics rebuild from the state is the update the step made: equal to
    the update RMS without clipping, and clipped to the threshold otherwise."""
    gen = torch.Generator().manual_seed(5)
    params = [torch.nn.Parameter(torch.randn(s, generator=gen)) for s in ((12, 40), (40, 12))]
    opt = flora_ext.Flora(params, lr=0.01, rank=6, kappa=2, beta1=0.9,
                          clip_threshold=clip_threshold)
    mover = stability.MomentumTransfer(opt, {p: str(i) for i, p in enumerate(params)},
                                       "norm_preserving")
    diag = stability.Diagnostics(opt, [(str(i), p) for i, p in enumerate(params)])
    for t in range(1, 6):
        for p in params:
            p.grad = torch.randn(p.shape, generator=gen)
        diag.before()
        mover.step()
        diag.after(t)
    for step, layers in diag.rows:
        for update_rms, rms_d, _ in layers:
            want = min(rms_d, clip_threshold)
            assert update_rms == pytest.approx(want, rel=1e-3), f"step {step}"


def _planned(plan, seeds, extra_seeds):
    """stability.plan_runs for ``plan`` at rank 128 (others 64 and 256), 2 data seeds: its
    runs and their names."""
    args = stability.main.__globals__["argparse"].Namespace(
        plan=plan, seeds=seeds, data_seeds=2, extra_seeds=extra_seeds, rank=128,
        other_ranks=[64, 256])
    runs = stability.plan_runs(args)
    return runs, [name for _, name, _ in runs]


def test_projection_plan_names_its_runs():
    runs, names = _planned("projections", seeds=8, extra_seeds=4)
    assert len(names) == len(set(names)) == 2 + 8 + 2 + 8 + 4
    assert [n for p, n, _ in runs if p == 0 and n.startswith("flora_py-r128-orthogonal")] == [
        f"flora_py-r128-orthogonal-proj{s}" for s in range(8)]
    extra = dict((n, a) for _, n, a in runs)["flora_py-r64-orthogonal-proj1"]
    assert extra[extra.index("--projection") + 1] == "orthogonal"


def _probe_run(projection, direction="flora", gamma=1.0, steps=8):
    gen = torch.Generator().manual_seed(5)
    params = [torch.nn.Parameter(torch.randn(s, generator=gen) * 0.1) for s in SHAPES]
    opt = stability.ProbeFlora(params, lr=0.05, rank=6, kappa=3, beta1=0.9, seed=11,
                               projection=projection, direction=direction, gamma=gamma)
    for _ in range(steps):
        for p in params:
            p.grad = torch.randn(p.shape, generator=gen)
        opt.step()
    return [p.detach().clone() for p in params]


def test_split_with_gamma_one_minus_beta1_is_the_subspace_projection():
    # Pi((1 - b1) U + b1 m) + (1 - b1)(I - Pi) U = (1 - b1) U + b1 Pi m: the orthonormal
    # ('subspace') projection's Flora step, transfers included (kappa 3, 8 steps)
    split = _probe_run("orthogonal", "split", gamma=0.1)
    subspace = _probe_run("subspace")
    for a, b in zip(split, subspace):
        assert rel_err(a, b) < 1e-5


def test_split_uses_the_gradient_outside_the_subspace():
    # First step (M = 0): split with gamma 1 steps along (1 - b1) Pi U + (I - Pi) U, Flora's
    # subspace direction (gamma = 1 - b1) along (1 - b1) U: the same outside the subspace up
    # to the factor 1 / (1 - b1), the same inside it (each up to its clip and lr_t)
    def first_step(gamma):
        gen = torch.Generator().manual_seed(5)
        p = torch.nn.Parameter(torch.randn(12, 40, generator=gen) * 0.1)
        p0 = p.detach().clone()
        opt = stability.ProbeFlora([p], lr=0.05, rank=6, kappa=3, beta1=0.9, seed=11,
                                   projection="orthogonal", direction="split", gamma=gamma)
        p.grad = torch.randn(p.shape, generator=gen)
        opt.step()
        P = opt._p_cache[id(p)][1]  # r x n (left), orthonormal rows times s
        proj = P.t() @ P / (12 / 6)  # Pi on the row side
        d = p0 - p.detach()
        return proj @ d, d - proj @ d

    in1, out1 = first_step(1.0)
    in0, out0 = first_step(0.1)
    assert rel_err(in1 / in1.norm(), in0 / in0.norm()) < 1e-4
    assert rel_err(out1 / out1.norm(), out0 / out0.norm()) < 1e-4
    ratio1, ratio0 = (in1.norm() / out1.norm()).item(), (in0.norm() / out0.norm()).item()
    assert ratio1 == pytest.approx(0.1 * ratio0, rel=1e-4)


def test_direction_needs_a_projector_and_a_known_name():
    p = torch.nn.Parameter(torch.zeros(8, 8))
    with pytest.raises(ValueError, match="direction must be one of"):
        stability.ProbeFlora([p], lr=0.1, rank=2, kappa=2, beta1=0.9, seed=0,
                             projection="orthogonal", direction="x")
    with pytest.raises(ValueError, match="needs projection='orthogonal'"):
        stability.ProbeFlora([p], lr=0.1, rank=2, kappa=2, beta1=0.9, seed=0,
                             projection="gaussian", direction="split")


def test_direction_plan_names_its_runs():
    runs, names = _planned("directions", seeds=3, extra_seeds=2)
    assert len(names) == len(set(names)) == 2 + 4 * 3 + 2 + 4
    assert "flora_py-r128-orthogonal-split0.5-proj2" in names
    assert "flora_py-r128-orthogonal-shrink-proj0" in names
    extra = dict((n, a) for _, n, a in runs)["flora_py-r256-orthogonal-split1-proj1"]
    assert extra[extra.index("--direction") + 1] == "split"
    assert extra[extra.index("--gamma") + 1] == "1"
