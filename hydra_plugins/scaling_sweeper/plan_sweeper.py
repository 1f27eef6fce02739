"""`hydra/sweeper=plan`: an IsoFLOP grid is not a Cartesian product, so a sweeper plans the runs and any launcher runs them.

Hydra imports every module under `hydra_plugins` at start-up, so this one imports JAX-heavy code only inside `sweep`.
"""


import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional

from hydra.core.config_store import ConfigStore
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.utils import JobStatus
from hydra.plugins.sweeper import Sweeper
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig, OmegaConf

log = logging.getLogger("scaling.sweep")


@dataclass
class PlanSweeperConf:
    _target_: str = "hydra_plugins.scaling_sweeper.plan_sweeper.PlanSweeper"
    plan: Dict[str, Any] = field(default_factory=dict)  # scaling.plan.SweepSpec fields
    run_overrides: Dict[str, List[str]] = field(default_factory=dict)  # run-name glob -> extra overrides
    max_batch_size: Optional[int] = None  # jobs handed to the launcher at once (None: all)
    skip_finished: bool = True  # relaunch: completed / diverged runs are not launched again
    fail_on_error: bool = True  # after every run has had its go, exit non-zero if any failed
    dry_run: bool = False  # print the plan, launch nothing


ConfigStore.instance().store(group="hydra/sweeper", name="plan", node=PlanSweeperConf, provider="scaling")


class PlanSweeper(Sweeper):
    def __init__(self, plan: Any, run_overrides: Any, max_batch_size: Optional[int], skip_finished: bool,
                 fail_on_error: bool, dry_run: bool) -> None:
        self.plan_cfg = OmegaConf.to_container(plan, resolve=True) if isinstance(plan, DictConfig) else dict(plan)
        self.run_overrides = OmegaConf.to_container(run_overrides) if isinstance(run_overrides, DictConfig) else dict(run_overrides or {})
        self.max_batch_size = max_batch_size
        self.skip_finished = skip_finished
        self.fail_on_error = fail_on_error
        self.dry_run = dry_run

    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig) -> None:
        from hydra.core.plugins import Plugins

        self.hydra_context = hydra_context
        self.config = config
        self.launcher = Plugins.instance().instantiate_launcher(
            hydra_context=hydra_context, task_function=task_function, config=config
        )

    def sweep(self, arguments: List[str]) -> Any:
        from hydra._internal.core_plugins.basic_sweeper import BasicSweeper

        from scaling import sweep as S
        from scaling.plan import SweepSpec, plan_sweep

        loader = self.hydra_context.config_loader
        parsed = OverridesParser.create(config_loader=loader).parse_overrides(arguments)
        combos = BasicSweeper.split_arguments(parsed, None)[0]
        first = loader.load_sweep_config(self.config, combos[0])
        spec = SweepSpec(**self.plan_cfg)
        plan = plan_sweep(spec, OmegaConf.to_object(first.model), first.train.flops_convention)
        sweep_name = first.get("sweep") or spec.prefix or spec.kind
        jobs = S.expand_jobs(plan, sweep_name, combos, self.run_overrides)
        log.info("plan %r (%s, C in the %s convention): %d runs\n%s", sweep_name, spec.kind, plan.convention,
                 len(jobs), plan.table())
        if self.dry_run:
            log.info("dry run, nothing launched; the jobs:\n%s", "\n".join(f"  {j.name}: {' '.join(j.overrides)}" for j in jobs))
            return []

        # Each job's directory comes from its own composed config (hydra.sweep.dir / subdir), as the launcher sees it.
        run_dirs, sweep_dirs = {}, set()
        for job in jobs:
            cfg = loader.load_sweep_config(self.config, job.overrides)
            sweep_dirs.add(Path(cfg.hydra.sweep.dir))
            run_dirs[job.name] = Path(cfg.hydra.sweep.dir) / str(cfg.hydra.sweep.subdir)
        if len(sweep_dirs) != 1:
            raise ValueError(f"the runs of sweep {sweep_name!r} resolve to several sweep dirs {sorted(map(str, sweep_dirs))}: "
                             "hydra.sweep.dir must not depend on per-run keys.")
        sweep_dir = sweep_dirs.pop()
        S.write_manifest(sweep_dir, S.manifest(plan, sweep_name, jobs, arguments))
        OmegaConf.save(self.config, sweep_dir / "multirun.yaml")

        todo = [j for j in jobs if not (self.skip_finished and S.run_status(run_dirs[j.name]) in S.FINAL)]
        log.info("sweep dir %s: %d runs to launch, %d already finished (skipped)", sweep_dir, len(todo), len(jobs) - len(todo))
        size = self.max_batch_size or max(1, len(todo))
        returns, failed = [], []
        for start in range(0, len(todo), size):
            batch = todo[start:start + size]
            results = self.launcher.launch([j.overrides for j in batch], initial_job_idx=start)
            for job, r in zip(batch, results):
                if r.status == JobStatus.FAILED:  # the run wrote a failed record; the others carry on
                    failed.append(f"{job.name}: {r._return_value!r}")
            returns.append(results)

        df = S.collect(sweep_dir, skip_corrupt=True)
        df = df[df["name"].isin([j.name for j in jobs])]
        log.info("sweep %s: %s", sweep_name, S.summary(df))
        if failed and self.fail_on_error:
            raise RuntimeError(f"{len(failed)} of {len(todo)} runs failed (their records say why; the rest finished):\n"
                               + "\n".join(failed))
        return returns
