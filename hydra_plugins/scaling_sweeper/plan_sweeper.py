"""`hydra/sweeper=plan`: an IsoFLOP grid is not a Cartesian product, so a sweeper plans the runs and any launcher runs them.

Hydra imports every module under `hydra_plugins` at start-up, so this one imports JAX-heavy code only inside `sweep`.

`vmap`: runs that differ only in lr / seed (an lr plan's runs of one shape and budget, `scaling.train.stack.group_by_shape`)
go to the launcher as ONE job per group, which calls `scaling.train.loop.train_group`: one vmapped step for the group on a
GPU/TPU, or the runs one after another on CPU (`auto`, the default, decides in the job from its device; `true` forces
the vmapped step, `false` gives one job per run as for other plans). `auto` groups lr plans and the seed replicates of
any plan (`plan.seeds`), whose runs differ only in train.seed.
"""


import logging
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional

from hydra.core.config_store import ConfigStore
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.utils import JobStatus
from hydra.plugins.sweeper import Sweeper
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig, OmegaConf

log = logging.getLogger("scaling.sweep.schedule")


@dataclass
class PlanSweeperConf:
    _target_: str = "hydra_plugins.scaling_sweeper.plan_sweeper.PlanSweeper"
    # scaling.sweep.plan.SweepSpec fields. `seeds` is present (empty: one run per point, as SweepSpec's default) so that
    # `hydra.sweeper.plan.seeds=[0,1,2]` works on the command line without `+`, whatever the experiment sets.
    plan: Dict[str, Any] = field(default_factory=lambda: {"seeds": []})
    run_overrides: Dict[str, List[str]] = field(default_factory=dict)  # run-name glob -> extra overrides
    max_batch_size: Optional[int] = None  # jobs handed to the launcher at once (None: all)
    skip_finished: bool = True  # relaunch: completed / diverged runs are not launched again
    fail_on_error: bool = True  # after every run has had its go, exit non-zero if any failed
    dry_run: bool = False  # print the plan, launch nothing
    vmap: str = "auto"  # auto | true | false: one job per same-shape group (lr plans; see the module docstring)
    max_k: int = 16  # most runs in one vmapped group


ConfigStore.instance().store(group="hydra/sweeper", name="plan", node=PlanSweeperConf, provider="scaling")


class PlanSweeper(Sweeper):
    def __init__(self, plan: Any, run_overrides: Any, max_batch_size: Optional[int], skip_finished: bool,
                 fail_on_error: bool, dry_run: bool, vmap: Any = "auto", max_k: int = 16) -> None:
        self.plan_cfg = OmegaConf.to_container(plan, resolve=True) if isinstance(plan, DictConfig) else dict(plan)
        self.run_overrides = OmegaConf.to_container(run_overrides) if isinstance(run_overrides, DictConfig) else dict(run_overrides or {})
        self.max_batch_size = max_batch_size
        self.skip_finished = skip_finished
        self.fail_on_error = fail_on_error
        self.dry_run = dry_run
        from scaling.sweep.schedule import parse_vmap  # JAX-free

        self.vmap = parse_vmap(vmap)
        self.max_k = max_k

    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig) -> None:
        from hydra.core.plugins import Plugins

        self.hydra_context = hydra_context
        self.config = config
        self.task_function = task_function
        self.launcher = Plugins.instance().instantiate_launcher(
            hydra_context=hydra_context, task_function=task_function, config=config
        )

    def sweep(self, arguments: List[str]) -> Any:
        """Hydra's side only: parse overrides, compose each job's config, launch; scaling.sweep.schedule decides the rest.
        A bad plan or override (ours name the key and the fix) is one line and exit 2 before anything is launched or
        written, as for a single run (scaling.train.loop.main); HYDRA_FULL_ERROR=1 keeps the traceback."""
        self._launched = False
        try:
            return self._sweep(arguments)
        except ValueError as e:
            if self._launched or os.environ.get("HYDRA_FULL_ERROR") == "1":
                raise
            print(f"error: {e}", file=sys.stderr)
            sys.exit(2)

    def _sweep(self, arguments: List[str]) -> Any:
        from hydra._internal.core_plugins.basic_sweeper import BasicSweeper

        from scaling.sweep import schedule as S
        from scaling.sweep.plan import SweepSpec, plan_sweep
        from scaling.record import FINAL, record_status, write_manifest

        loader = self.hydra_context.config_loader
        parsed = OverridesParser.create(config_loader=loader).parse_overrides(arguments)
        combos = BasicSweeper.split_arguments(parsed, None)[0]
        first = loader.load_sweep_config(self.config, combos[0])
        spec = SweepSpec.from_dict(self.plan_cfg)
        if spec.seeds and any(o.split("=", 1)[0].lstrip("+~") == "train.seed" for combo in combos for o in combo):
            raise ValueError(f"hydra.sweeper.plan.seeds={spec.seeds} and a train.seed override both set the seed (the "
                             "plan's would win): drop train.seed=... and list every seed in plan.seeds.")
        plan = plan_sweep(spec, OmegaConf.to_object(first.model), first.train.flops_convention)
        sweep_name = first.get("sweep") or spec.prefix or spec.kind
        jobs = S.expand_jobs(plan, sweep_name, combos, self.run_overrides)
        log.info("plan %r (%s, C in the %s convention): %d runs\n%s", sweep_name, spec.kind, plan.convention,
                 len(jobs), plan.table())
        if self.dry_run:
            log.info("dry run, nothing launched; the jobs:\n%s", "\n".join(f"  {j.name}: {' '.join(j.overrides)}" for j in jobs))
            return []

        # Each job's directory (and, to group runs, its typed config) from its own composed config, as the launcher sees it.
        grouping = S.groups_runs(self.vmap, spec.kind, replicated=bool(spec.seeds))
        composed = {j.name: loader.load_sweep_config(self.config, j.overrides) for j in jobs}
        run_dirs = {name: (Path(c.hydra.sweep.dir) / str(c.hydra.sweep.subdir)).absolute() for name, c in composed.items()}
        sweep_dirs = {str(Path(c.hydra.sweep.dir)) for c in composed.values()}
        if len(sweep_dirs) != 1:
            raise ValueError(f"the runs of sweep {sweep_name!r} resolve to several sweep dirs {sorted(sweep_dirs)}: "
                             "hydra.sweep.dir must not depend on per-run keys.")
        sweep_dir = Path(sweep_dirs.pop())
        cfgs = {name: _run_config(c) for name, c in composed.items()} if grouping else {}
        keys = None
        if grouping:
            from scaling.train.stack import group_key

            keys = {name: group_key(cfg) for name, cfg in cfgs.items()}
        plan_ = S.schedule(jobs, {j.name: record_status(run_dirs[j.name]) for j in jobs}, keys, self.max_k,
                           self.skip_finished)

        content = S.manifest(plan, sweep_name, jobs, arguments)
        for entry in content["planned"]:
            entry["job_group"] = plan_.job_group[entry["name"]]  # the runs trained by one job (one vmapped step on a GPU)
        content["vmap"] = self.vmap
        write_manifest(sweep_dir, content)
        OmegaConf.save(self.config, sweep_dir / "multirun.yaml")
        log.info("sweep dir %s: %d runs to launch, %d already finished (skipped), in %d jobs", sweep_dir, plan_.n_runs,
                 len(plan_.finished), plan_.n_jobs)

        returns, failed, offset = [], [], 0
        self._launched = True
        size = self.max_batch_size or max(1, plan_.n_jobs)
        # Ladder branches last: by then every parent has trained (or failed, which its branches' records then say).
        units = [("run", [[j] for j in plan_.singles]), ("group", plan_.grouped), ("run", [[j] for j in plan_.branches])]
        for kind, batch_units in units:
            if not batch_units:
                continue
            launcher = self.launcher
            if kind == "group":
                from hydra.core.plugins import Plugins

                task = GroupTask({u[0].name: ([cfgs[j.name] for j in u], [run_dirs[j.name] for j in u]) for u in batch_units},
                                 self.vmap)
                launcher = Plugins.instance().instantiate_launcher(hydra_context=self.hydra_context, task_function=task,
                                                                    config=self.config)
            for start in range(0, len(batch_units), size):
                batch = batch_units[start:start + size]
                results = launcher.launch([u[0].overrides for u in batch], initial_job_idx=offset + start)
                for u, r in zip(batch, results):
                    if r.status == JobStatus.FAILED:  # the runs wrote failed records; the others carry on
                        bad = [j.name for j in u if record_status(run_dirs[j.name]) not in FINAL] or [j.name for j in u]
                        failed += [f"{name}: {r._return_value!r}" for name in bad]
                returns.append(results)
            offset += len(batch_units)

        df = S.collect(sweep_dir, skip_corrupt=True)
        df = df[df["name"].isin([j.name for j in jobs])]
        log.info("sweep %s: %s", sweep_name, S.summary(df))
        if failed and self.fail_on_error:
            raise RuntimeError(f"{len(failed)} of {plan_.n_runs} runs failed (their records say why; the rest finished):\n"
                               + "\n".join(failed))
        return returns


def _run_config(node: DictConfig):
    """The typed Config a job would see: the composed config without its `hydra` node (as hydra's run_job does)."""
    from omegaconf import open_dict, read_write

    from scaling.config import from_omegaconf

    node = node.copy()
    with read_write(node), open_dict(node):
        del node["hydra"]
    return from_omegaconf(node)


class GroupTask:
    """The task function of a group job: the launcher composes the lead run's config; this trains the whole group.

    A plain picklable object (joblib and submitit ship it to the worker) holding lead name -> (configs, run dirs).
    """

    def __init__(self, groups: Dict[str, Any], vmap: str) -> None:
        self.groups = groups
        self.vmap = vmap

    def __call__(self, node: DictConfig) -> Dict[str, Any]:
        logging.getLogger("absl").setLevel(logging.WARNING)  # orbax logs every save step at INFO
        from scaling.train.loop import train_group

        cfgs, run_dirs = self.groups[node.name]
        records = train_group(cfgs, run_dirs, self.vmap)
        for r in records:
            print(f"[{r['name']}] status={r['status']} loss={r.get('loss')} lr={r['optim']['lr']} "
                  f"vmap_group={r.get('vmap_group')}")
        return {r["name"]: r.get("loss") for r in records}
