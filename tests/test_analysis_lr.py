"""Learning-rate sweeps in the analysis package: groups, the parabola optimum in ln(lr), edge flags, the report."""

import json
import math
from pathlib import Path

import numpy as np
import pytest

from analysis.__main__ import main
from analysis.laws.lr import fit_lr_curve, lr_sweeps
from analysis.load import load_sweep
from analysis.synthetic import MODEL, OPTIM, isoflop_runs, write_sweep
from scaling.record import write_record

LR_OPT, L_OPT, CURV = 4e-3, 2.5, 0.08  # truth: loss = L_OPT + CURV (ln lr - ln LR_OPT)^2
GRID = [1e-3, 2e-3, 4e-3, 8e-3, 1.6e-2]  # LR_OPT itself is not interior-centred on purpose below


def true_loss(lr):
    return L_OPT + CURV * (math.log(lr) - math.log(LR_OPT)) ** 2


def _write_run(root: Path, name: str, *, N: float, D: float, lr: float, loss: float | None,
               status: str = "completed", budget: float = 2e9, **extra) -> None:
    C = 6 * N * D
    rec = {"name": name, "status": status, "error": None, "diverged_step": None, "N": N, "N_total": N * 1.1,
           "D": D, "steps": 100, "C": C, "C_convention": "6N", "C_6N": C, "C_kaplan": 1.05 * C, "C_chinchilla": 1.1 * C,
           "flops_per_token": {"6N": 6 * N, "kaplan": 6.3 * N, "chinchilla": 6.6 * N},
           "budget": {"kind": "flops", "value": budget, "convention": "6N"},
           "loss": loss, "train_loss": loss, "sweep": "lr_syn", "seed": 0, "model": MODEL,
           "optim": OPTIM | {"lr": lr, "warmup_fraction": 0.05}} | extra
    write_record(root / name, rec)


def lr_sweep_dir(root: Path, lrs=GRID, *, N=25472.0, D=11520.0, shift=0.0, diverged=(), failed=()) -> Path:
    """One shape and budget at every lr in `lrs`; losses from the known parabola (lr scaled by `shift` decades)."""
    for lr in lrs:
        name = f"lr-N{N:.3g}-lr{lr:.3g}"
        if lr in diverged:
            _write_run(root, name, N=N, D=D, lr=lr, loss=None, status="diverged", diverged_step=7)
        elif lr in failed:
            _write_run(root, name, N=N, D=D, lr=lr, loss=None, status="failed", error="RuntimeError: out of memory")
        else:
            _write_run(root, name, N=N, D=D, lr=lr, loss=true_loss(lr * 10 ** -shift))
    return root


def test_load_reads_lr_from_the_record(tmp_path):
    df = load_sweep(lr_sweep_dir(tmp_path / "s"))
    assert sorted(df["lr"]) == pytest.approx(GRID)


def test_parabola_recovers_the_known_optimum():
    lrs = np.array(GRID) * 1.3  # the optimum between grid points
    res = fit_lr_curve(lrs, [true_loss(x) for x in lrs])
    assert res["edge"] is None
    assert res["lr_opt"] == pytest.approx(LR_OPT, rel=1e-9) and res["loss_opt"] == pytest.approx(L_OPT, abs=1e-12)
    # least squares over 5 points (2 neighbours a side) of an exact parabola: the same vertex
    res5 = fit_lr_curve(lrs, [true_loss(x) for x in lrs], neighbours=2)
    assert res5["lr_opt"] == pytest.approx(LR_OPT, rel=1e-9)


def test_lr_sweeps_groups_by_shape_and_budget_and_recovers_each_optimum(tmp_path):
    root = tmp_path / "s"
    lr_sweep_dir(root, np.array(GRID) * 1.3, N=1e4, D=1e5)
    lr_sweep_dir(root, np.array(GRID) * 1.3, N=4e4, D=2e5, shift=0.3)  # optimum 2x higher
    sweeps = lr_sweeps(load_sweep(root))
    assert [(s.N, s.D) for s in sweeps] == [(1e4, 1e5), (4e4, 2e5)]
    assert sweeps[0].lr_opt == pytest.approx(LR_OPT, rel=1e-6)
    assert sweeps[1].lr_opt == pytest.approx(LR_OPT * 10 ** 0.3, rel=1e-6)
    assert all(len(s.points) == 5 and s.excluded.empty for s in sweeps)
    assert sweeps[0].best_lr == pytest.approx(4e-3 * 1.3) and "optimum lr" in sweeps[0].note


@pytest.mark.parametrize("shift, edge, side", [(1.0, "highest", "higher"), (-1.0, "lowest", "lower")])
def test_best_lr_at_the_edge_of_the_grid_is_flagged(tmp_path, shift, edge, side):
    (s,) = lr_sweeps(load_sweep(lr_sweep_dir(tmp_path / "s", shift=shift)))
    assert s.edge == edge and s.lr_opt is None and s.parabola is None
    assert s.best_lr == (GRID[-1] if edge == "highest" else GRID[0])
    assert f"widen the sweep to {side} learning rates" in s.note


def test_diverged_and_failed_runs_are_excluded_and_listed(tmp_path):
    # 1.6e-2 diverged, 1e-3 failed: the best usable lr (4e-3) is still interior, fitted through 2e-3..8e-3
    root = lr_sweep_dir(tmp_path / "s", diverged=(1.6e-2,), failed=(1e-3,))
    (s,) = lr_sweeps(load_sweep(root))
    assert s.lr_opt == pytest.approx(LR_OPT, rel=1e-9) and s.window == (2e-3, 8e-3)
    assert sorted(s.excluded["status"]) == ["diverged", "failed"]
    pts = s.points.set_index("lr")
    assert math.isnan(pts.loc[1.6e-2, "loss"]) and pts.loc[1.6e-2, "status"] == "diverged at step 7"
    assert pts.loc[1e-3, "status"] == "failed: RuntimeError: out of memory"
    # the best usable lr next to a diverged one is at the usable edge: flagged, no parabola
    (s,) = lr_sweeps(load_sweep(lr_sweep_dir(tmp_path / "t", diverged=(8e-3, 1.6e-2))))
    assert s.edge == "highest" and s.lr_opt is None


def test_no_lr_sweep_for_an_isoflop_sweep(tmp_path):
    sweep = write_sweep(tmp_path / "iso", isoflop_runs(budgets=(1e17, 1e18), n_per_budget=5, noise=0.0))
    assert lr_sweeps(load_sweep(sweep)) == []  # every (N, D) has one lr


def test_report_writes_the_lr_section_and_figure(tmp_path):
    root = lr_sweep_dir(tmp_path / "s", np.array(GRID) * 1.3, diverged=(GRID[-1] * 1.3,))
    lr_sweep_dir(root, N=4e4, D=2e5, shift=1.0)  # a second group whose best lr is the grid's highest
    assert main(["report", str(root), "--bootstrap", "0", "--jobs", "1"]) == 0
    md = (root / "report" / "report.md").read_text()
    for needle in ("## Learning-rate sweeps", "| lr | loss | runs used | status |",
                   "| 0.0052 | 2.506 | 1/1 | completed, best |", "| 0.0208 | - | 0/1 | diverged at step 7 |", "interpolated optimum: lr 0.004 (loss 2.5)",
                   "best lr at the highest end of the grid: widen the sweep", "excluded from this group: lr-N2.55e+04",
                   "![lr_sweep](figures/lr_sweep.png)"):
        assert needle in md, needle
    res = json.loads((root / "report" / "results.json").read_text())
    g0, g1 = res["lr_sweeps"]
    assert g0["lr_opt"] == pytest.approx(LR_OPT, rel=1e-6) and g0["edge"] is None
    assert g0["excluded"][0]["status"] == "diverged" and g0["points"][-1]["loss"] is None
    assert g1["edge"] == "highest" and g1["lr_opt"] is None
    figs = root / "report" / "figures"
    assert (figs / "lr_sweep.png").stat().st_size > 10_000 and (figs / "lr_sweep.svg").exists()
    # Approach 3 on runs that differ in lr, not in N and D, fits a negative exponent: reported, not crashed or plotted
    assert "N_opt, D_opt need both > 0" in res["approach3"]["error"] and not (figs / "contours.png").exists()


def test_report_on_an_isoflop_sweep_has_no_lr_section(tmp_path):
    sweep = write_sweep(tmp_path / "iso", isoflop_runs(budgets=(1e17, 1e18, 1e19), n_per_budget=6, noise=0.0))
    assert main(["report", str(sweep), "--bootstrap", "0", "--jobs", "1"]) == 0
    assert "Learning-rate" not in (sweep / "report" / "report.md").read_text()
    assert "lr_sweeps" not in json.loads((sweep / "report" / "results.json").read_text())
    assert not (sweep / "report" / "figures" / "lr_sweep.png").exists()
