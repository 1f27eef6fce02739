import math

import pytest

from scaling.accounting import count_params, flops_per_token
from scaling.config import TrainConfig, resolve_budget
from scaling.model.decoder import ModelConfig
from scaling.sweep.plan import FamilyRule, HyperRule, SweepSpec, fmt_sci, plan_sweep

BASE = ModelConfig(vocab_size=257, seq_len=64)
FAMILY = FamilyRule(head_dim=16, d_model_multiple=16, min_d_model=32, max_d_model=1024, aspect_ratio=32)


def isoflop(**kw) -> SweepSpec:
    kw = {"budgets": [1e11, 1e12, 1e13], "n_sizes": 5, "size_step": 2.0, "family": FAMILY, **kw}
    return SweepSpec(kind="isoflop", **kw)


def shape_of(run) -> ModelConfig:
    return BASE.replace(d_model=run.d_model, n_layers=run.n_layers, n_heads=run.n_heads, d_ff=run.d_ff)


def test_isoflop_runs_honour_their_budget_as_the_trainer_will_run_them():
    plan = plan_sweep(isoflop(), BASE, "chinchilla")
    assert len(plan.runs) == 15 and not plan.skipped
    for run in plan.runs:
        assert abs(run.C["chinchilla"] / run.budget - 1) <= plan.spec.tolerance
        # The trainer resolves the same overrides to the same steps, D and C (one home for those facts).
        trainer = resolve_budget(shape_of(run), TrainConfig(flops=run.budget, batch_size=run.batch_size))
        assert (trainer.steps, trainer.D) == (run.steps, run.D)
        assert trainer.C == run.C
        assert run.D == pytest.approx(run.budget / flops_per_token(shape_of(run), "chinchilla"), rel=plan.spec.tolerance)
        assert f"train.flops={run.budget!r}" in run.overrides()


def test_plan_uses_the_requested_flop_convention():
    six = plan_sweep(isoflop(budgets=[1e12]), BASE, "6N")
    chin = plan_sweep(isoflop(budgets=[1e12]), BASE, "chinchilla")
    for run in six.runs:
        assert abs(run.C["6N"] / 1e12 - 1) <= 0.02
        assert run.C["6N"] == pytest.approx(6 * run.N * run.D)
    # The chinchilla count includes embeddings, head and attention, so the same C buys fewer tokens.
    d_six = {r.d_model: r.D for r in six.runs}
    assert all(r.D < d_six[r.d_model] for r in chin.runs if r.d_model in d_six)


def test_shapes_are_valid_members_of_the_family():
    plan = plan_sweep(isoflop(), BASE)
    for run in plan.runs:
        model = shape_of(run)  # ModelConfig validates divisibility itself
        assert run.d_model % FAMILY.d_model_multiple == 0 and run.d_model // run.n_heads == FAMILY.head_dim
        assert run.n_layers == max(1, math.floor(run.d_model / FAMILY.aspect_ratio + 0.5))
        assert run.d_ff == 4 * run.d_model
        assert (run.N, run.N_total) == (count_params(model).non_embedding, count_params(model).total)


def test_names_are_unique_and_readable():
    plan = plan_sweep(isoflop(), BASE)
    names = [r.name for r in plan.runs]
    assert len(set(names)) == len(names)
    run = plan.runs[0]
    assert run.name == f"isoflop-C{fmt_sci(run.budget)}-d{run.d_model}-L{run.n_layers}-B{run.batch_size}"
    assert fmt_sci(1e13) == "1e13" and fmt_sci(3.2e11) == "3.2e11" and fmt_sci(250_000) == "2.5e5"


def test_sizes_are_spread_evenly_in_log_n_around_the_prior_optimum():
    plan = plan_sweep(isoflop(n_sizes=7, size_step=1.6, budgets=[1e13]), BASE)
    n_opt = plan.optimum["1e13"]
    Ns = sorted(r.N for r in plan.runs)
    assert len(Ns) == 7
    assert Ns[0] < n_opt < Ns[-1]
    below, above = sum(n < n_opt for n in Ns), sum(n > n_opt for n in Ns)
    assert abs(below - above) <= 1
    # The prior: D/N = tokens_per_param at N_opt (Hoffmann et al. 2022), so D/N straddles 20 across the grid.
    ratios = [r.D / r.N for r in plan.runs]
    assert min(ratios) < 20 < max(ratios)


def test_prior_fit_moves_the_grid():
    low = plan_sweep(isoflop(budgets=[1e13], prior_fit=[0.05, 0.5]), BASE)  # N_opt = 0.05 * sqrt(C) ~ 1.6e5
    high = plan_sweep(isoflop(budgets=[1e13], prior_fit=[0.2, 0.5]), BASE)
    assert low.optimum["1e13"] == pytest.approx(0.05 * 1e13**0.5)
    assert max(r.N for r in low.runs) < max(r.N for r in high.runs)


def test_n_convention_total_reads_prior_fit_and_sizes_in_total_parameters():
    """A fit made in total N (analysis predict --n-convention total) centres the grid on total N; the same numbers
    read as non-embedding N would centre it on much wider models, since the embedding is most of a small model."""
    fit = [0.05, 0.5]  # N_opt = 0.05 sqrt(C): 1.58e5 at 1e13
    total = plan_sweep(isoflop(budgets=[1e13], prior_fit=fit, n_convention="total", n_sizes=3), BASE)
    mid = sorted(total.runs, key=lambda r: r.N_total)[1]
    nearest = min(FAMILY.shapes(BASE), key=lambda s: abs(math.log(count_params(s).total / 1.58e5)))
    assert mid.d_model == nearest.d_model and mid.N_total == count_params(nearest).total
    assert [r.target_N for r in sorted(total.runs, key=lambda r: r.N_total)] == pytest.approx(
        [0.05 * 1e13**0.5 * f for f in (0.5, 1, 2)])
    non_embedding = plan_sweep(isoflop(budgets=[1e13], prior_fit=fit, n_sizes=3), BASE)
    assert sorted(r.d_model for r in non_embedding.runs)[1] > mid.d_model
    grid = plan_sweep(SweepSpec(kind="grid", sizes=[mid.N_total], tokens=[1e6], family=FAMILY, n_convention="total"), BASE)
    assert [r.d_model for r in grid.runs] == [mid.d_model]
    with pytest.raises(ValueError, match=r"plan.n_convention='kaplan' is unknown: use one of \('non_embedding', 'total'\)"):
        isoflop(n_convention="kaplan")


def test_hyperparameters_scale_with_width_batch_and_run_length():
    hyper = HyperRule(base_lr=3e-3, base_d_model=128, base_batch=32, batch_flops_exponent=0.3271, base_flops=1e12,
                      min_steps=1)
    assert hyper.lr(256, 32) == pytest.approx(1.5e-3)  # lr ~ 1/d_model
    assert hyper.lr(128, 128) == pytest.approx(6e-3)  # lr ~ sqrt(B)
    assert hyper.batch_size(1e12) == 32 and hyper.batch_size(1e14) == 128  # 32 * 100^0.327 = 145 -> 128
    plan = plan_sweep(isoflop(hyper=hyper), BASE)
    by_budget = {r.budget: r.batch_size for r in plan.runs}
    assert by_budget[1e11] < by_budget[1e13]
    run = plan.runs[0]
    assert f"optim.warmup_fraction={hyper.warmup_fraction}" in run.overrides()  # warmup is a fraction of the run


def test_short_runs_get_smaller_batches_until_min_steps():
    hyper = HyperRule(base_batch=256, min_batch=4, min_steps=100)
    plan = plan_sweep(isoflop(budgets=[1e11], hyper=hyper), BASE)
    assert all(r.steps >= 100 for r in plan.runs)
    assert all(r.batch_size < 256 for r in plan.runs)


def test_runs_outside_tolerance_are_skipped_with_a_reason():
    hyper = HyperRule(base_batch=512, min_batch=512, min_steps=1)
    plan = plan_sweep(isoflop(budgets=[1e11], tolerance=0.01, hyper=hyper), BASE)
    assert plan.skipped and all("tolerance" in s["reason"] or "steps" in s["reason"] for s in plan.skipped)
    assert all(abs(r.budget_error) <= 0.01 for r in plan.runs)


def test_size_by_tokens_grid():
    spec = SweepSpec(kind="grid", sizes=[2e4, 1e5, 5e5], tokens=[1e6, 4e6], family=FAMILY)
    plan = plan_sweep(spec, BASE)
    assert len(plan.runs) == 6
    assert len({(r.d_model, r.D) for r in plan.runs}) == 6
    for run in plan.runs:
        assert run.budget is None and run.kind == "tokens"
        assert run.D >= run.nominal and run.D / run.nominal - 1 <= spec.tolerance
        assert "train.tokens=" in " ".join(run.overrides())
    ratio = plan_sweep(SweepSpec(kind="grid", sizes=[1e5], grid_tokens_per_param=[10, 40], family=FAMILY), BASE)
    assert [round(r.nominal / r.N) for r in ratio.runs] == [10, 40]


@pytest.mark.parametrize(
    "kw, match",
    [
        ({"kind": "random"}, "plan.kind='random'"),
        ({"budgets": []}, "plan.budgets"),
        ({"budgets": [-1.0]}, "plan.budgets"),
        ({"size_step": 1.0}, "plan.size_step"),
        ({"tolerance": 0.0}, "plan.tolerance"),
        ({"kind": "grid", "sizes": [1e5]}, "exactly one of plan.tokens"),
    ],
)
def test_bad_specs_name_the_field(kw, match):
    with pytest.raises(ValueError, match=match):
        SweepSpec(**{"budgets": [1e12], **kw})


def test_bad_rules_and_unreachable_budgets_name_the_field():
    with pytest.raises(ValueError, match="family.d_model_multiple=12"):
        FamilyRule(head_dim=8, d_model_multiple=12)
    with pytest.raises(ValueError, match="hyper.min_batch"):
        HyperRule(min_batch=64, max_batch=32)
    with pytest.raises(ValueError, match="outside the family"):
        plan_sweep(isoflop(budgets=[1e6]), BASE)
    with pytest.raises(ValueError, match="convention"):
        plan_sweep(isoflop(), BASE, "7N")


# ---------------------------------------------------------------------------------------------------------------
# learning-rate sweeps
# ---------------------------------------------------------------------------------------------------------------
TINY = ModelConfig(d_model=32, n_layers=2, n_heads=2, vocab_size=33, seq_len=16)
LR_HYPER = HyperRule(base_batch=8, min_batch=4, max_batch=8, min_steps=20)


def lr_spec(**kw) -> SweepSpec:
    return SweepSpec(**{"kind": "lr", "budgets": [2e9], "lrs": [3e-2, 1e-3, 3e-3, 1e-2], "hyper": LR_HYPER, **kw})


def test_lr_plan_runs_differ_only_in_lr_and_share_one_group():
    plan = plan_sweep(lr_spec(), TINY)
    assert [r.name for r in plan.runs] == [f"lr-C2e9-d32-L2-B8-lr{x}" for x in ("1e-3", "3e-3", "1e-2", "3e-2")]
    assert [r.lr for r in plan.runs] == [1e-3, 3e-3, 1e-2, 3e-2]
    assert {r.group for r in plan.runs} == {"lr-C2e9-d32-L2-B8"}
    first = plan.runs[0].manifest()
    first_overrides = dict(o.split("=", 1) for o in plan.runs[0].overrides())
    for run in plan.runs:
        diff = {k for k, v in run.manifest().items() if v != first[k]}
        assert diff <= {"name", "lr"}
        # the base model's own shape (no sizes given), at the budget the hyper rule places as for an IsoFLOP run
        assert (run.d_model, run.n_layers, run.budget, run.batch_size) == (32, 2, 2e9, 8)
        assert abs(run.C["chinchilla"] / 2e9 - 1) <= 0.02
        overrides = dict(o.split("=", 1) for o in run.overrides())
        assert overrides["optim.lr"] == f"{run.lr:.6g}" and overrides["name"] == run.name
        assert {k for k, v in overrides.items() if v != first_overrides[k]} <= {"name", "optim.lr"}
        assert run.tags()[-1] == f"lr{run.name.rsplit('-lr', 1)[1]}"


def test_lr_multipliers_scale_each_shapes_rule_lr_and_shapes_form_separate_groups():
    family = FamilyRule(head_dim=8, d_model_multiple=8, min_d_model=16, max_d_model=64, aspect_ratio=16)
    plan = plan_sweep(lr_spec(budgets=[], tokens=[1e5], sizes=[1e4, 4e4], lrs=[], lr_multipliers=[0.5, 1, 2],
                              family=family), TINY)
    assert len(plan.runs) == 6 and len({r.name for r in plan.runs}) == 6
    groups = {}
    for run in plan.runs:
        groups.setdefault(run.group, []).append(run)
        assert run.kind == "tokens" and run.budget is None and run.name.startswith("lr-D1e5-")
    assert len(groups) == 2
    for runs in groups.values():
        rule = LR_HYPER.lr(runs[0].d_model, runs[0].batch_size)
        assert [r.lr for r in runs] == pytest.approx([0.5 * rule, rule, 2 * rule], rel=1e-5)
        assert len({(r.d_model, r.n_layers, r.D, r.steps) for r in runs}) == 1


def test_lr_plan_validation_and_name_collisions():
    with pytest.raises(ValueError, match="exactly one of plan.lrs"):
        lr_spec(lr_multipliers=[1.0])
    with pytest.raises(ValueError, match="exactly one of plan.lrs"):
        lr_spec(lrs=[])
    with pytest.raises(ValueError, match="exactly one of plan.budgets"):
        lr_spec(tokens=[1e5])
    with pytest.raises(ValueError, match="must all be positive"):
        lr_spec(lrs=[1e-3, -1e-3])
    with pytest.raises(ValueError, match="run names collide"):  # 3 significant digits in the name
        plan_sweep(lr_spec(lrs=[1.0001e-3, 1.0002e-3]), TINY)
    assert fmt_sci(1.25e-2, 2) == "1.25e-2" and fmt_sci(3e-3, 2) == "3e-3"
    # other plan kinds: every run is a group of its own
    iso = plan_sweep(isoflop(budgets=[1e12]), BASE)
    assert all(r.group == r.name for r in iso.runs)


@pytest.mark.parametrize("values, match", [
    ({"budgets": [1e12], "budget": [1e12]}, r"plan: unknown key\(s\) 'budget'; the keys are kind, budgets"),
    ({"budgets": [1e12], "hyper": {"base_lr": 1e-3, "lr_width": 0.0}}, r"plan.hyper: unknown key\(s\) 'lr_width'"),
    ({"budgets": [1e12], "family": {"headdim": 8}}, r"plan.family: unknown key\(s\) 'headdim'"),
])
def test_unknown_plan_keys_are_named(values, match):
    with pytest.raises(ValueError, match=match):
        SweepSpec.from_dict(values)
    assert SweepSpec.from_dict({"budgets": [1e12]}) == SweepSpec(budgets=[1e12])
