"""The wheel works without the checkout: configs (pkg://scaling.configs), the plan sweeper and the corpus ship in it.

The wheel goes into a fresh venv with --no-deps; the venv sees this environment's dependencies through a .pth line.
A directory named in a .pth is only appended to sys.path, its own .pth files are not run, so the editable install of
this environment (a finder that maps `scaling` to the checkout) stays off: every import of `scaling` is the wheel's.
"""

import json
import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
# What the wheel is built without, at the checkout's top level: environments, outputs and earlier builds
# (setuptools' build/lib keeps modules deleted since, so an in-place build could ship them; a copy also keeps
# concurrent builds apart).
NOT_SOURCE = {".git", ".venv", "build", "dist", "scaling.egg-info", ".pytest_cache", "runs", "multirun", "outputs",
              "wandb", ".cache", "tests", "experiments"}
TINY_RUN = [
    "model=tiny", "data=synthetic", "logging=none", "train=steps", "train.steps=20", "train.batch_size=8",
    "train.eval_every=20", "train.eval_tokens=2048", "train.checkpoint.every=20", "data.synthetic.vocab_size=32",
    "data.synthetic.n_tokens=50000", "model.vocab_size=33", "name=from-wheel",
]
# A user's own study in their own config directory: a group preset of theirs next to the shipped groups.
USER_EXPERIMENT = """# @package _global_
defaults:
  - override /model: wide
  - override /data: synthetic
  - override /train: steps
name: my-study-d${model.d_model}
train:
  steps: 7
"""
USER_MODEL = "d_model: 48\nn_layers: 1\nn_heads: 2\nseq_len: 32\nvocab_size: ${data.tokenizer.vocab_size}\n"
PROBE = """
import json, sys
from importlib import resources
import hydra_plugins.scaling_sweeper, scaling, scaling.configs
print(json.dumps({"scaling": scaling.__file__, "configs": str(resources.files("scaling.configs") / "config.yaml"),
                  "sweeper": hydra_plugins.scaling_sweeper.__file__, "sys_path": sys.path}))
"""


def _run(cmd: list, cwd: Path, env: dict, timeout: float = 300) -> subprocess.CompletedProcess:
    out = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert out.returncode == 0, f"{cmd} failed ({out.returncode})\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}"
    return out


def _shipped_files(src: Path) -> set:
    """Paths inside the wheel that the source tree's packages, configs and corpus must give."""
    files = {p.relative_to(src).as_posix() for root in ("scaling", "analysis", "hydra_plugins")
             for p in (src / root).rglob("*.py")}
    files |= {"scaling/configs/" + p.relative_to(src / "configs").as_posix() for p in (src / "configs").rglob("*")
              if p.suffix == ".yaml" or p.name == "__init__.py"}
    files |= {p.relative_to(src).as_posix() for p in (src / "scaling" / "data" / "corpus").iterdir()}
    return files | {"scaling/py.typed"}


@pytest.fixture(scope="module")
def venv(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("install")
    shutil.copytree(REPO, tmp / "src", ignore=lambda d, names: {n for n in names if n == "__pycache__"
                                                                 or (Path(d) == REPO and n in NOT_SOURCE)})
    _run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(tmp / "dist"), str(tmp / "src")],
         cwd=tmp, env=os.environ.copy())
    (wheel,) = (tmp / "dist").glob("scaling-*.whl")
    missing = _shipped_files(tmp / "src") - set(zipfile.ZipFile(wheel).namelist())
    assert not missing, f"not in the wheel (a new package needs its line in pyproject's packages): {sorted(missing)}"

    env_dir = tmp / "venv"
    _run([sys.executable, "-m", "venv", "--without-pip", str(env_dir)], cwd=tmp, env=os.environ.copy())
    python = env_dir / "bin" / "python"
    _run([sys.executable, "-m", "pip", "--python", str(python), "install", "-q", "--no-deps", "--no-index", str(wheel)],
         cwd=tmp, env=os.environ.copy())
    site = Path(_run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], cwd=tmp,
                     env=os.environ.copy()).stdout.strip())
    deps = dict.fromkeys(sysconfig.get_paths()[k] for k in ("purelib", "platlib"))
    (site / "_scaling_test_deps.pth").write_text("".join(f"{p}\n" for p in deps))
    return env_dir


@pytest.fixture()
def elsewhere(tmp_path) -> tuple:
    """An empty working directory outside the checkout, and an environment that names no path into it."""
    cwd = tmp_path / "elsewhere"
    cwd.mkdir()
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(SCALING_CACHE=str(tmp_path / "cache"), WANDB_MODE="disabled", PYTHONUNBUFFERED="1")
    return cwd, env


@pytest.mark.slow
def test_wheel_imports_its_own_copy(venv, elsewhere):
    cwd, env = elsewhere
    probe = json.loads(_run([str(venv / "bin" / "python"), "-c", PROBE], cwd=cwd, env=env).stdout)
    for key in ("scaling", "configs", "sweeper"):
        assert Path(probe[key]).is_relative_to(venv), (key, probe[key])
    assert Path(probe["configs"]).is_file()
    on_path = [Path(cwd, p).resolve() for p in probe["sys_path"]]  # "" is the working directory
    assert REPO not in on_path and not any("__editable__" in p.name for p in on_path), probe["sys_path"]


@pytest.mark.slow
def test_wheel_trains_a_run_outside_the_checkout(venv, elsewhere):
    cwd, env = elsewhere
    out = _run([str(venv / "bin" / "python"), "-m", "scaling.train", *TINY_RUN], cwd=cwd, env=env)
    record = json.loads((cwd / "runs" / "from-wheel" / "record.json").read_text())
    assert record["status"] == "completed", out.stdout[-2000:]
    assert "status=completed" in out.stdout


@pytest.mark.slow
def test_wheel_plans_the_quickstart_with_its_sweeper(venv, elsewhere):
    cwd, env = elsewhere
    out = _run([str(venv / "bin" / "python"), "-m", "scaling.train", "-m", "+experiment=isoflop_quickstart",
                "hydra.sweeper.dry_run=true"], cwd=cwd, env=env)
    log = out.stdout + out.stderr
    assert "plan 'isoflop_quickstart' (isoflop" in log, log[-2000:]
    assert "dry run, nothing launched" in log
    assert not (cwd / "multirun").exists()


@pytest.mark.slow
def test_user_config_dir_adds_experiments_and_groups(venv, elsewhere):
    cwd, env = elsewhere
    user = cwd.parent / "my_configs"
    (user / "experiment").mkdir(parents=True)
    (user / "model").mkdir()
    (user / "experiment" / "my_study.yaml").write_text(USER_EXPERIMENT)
    (user / "model" / "wide.yaml").write_text(USER_MODEL)
    # The console script, and both of Hydra's ways to add a config directory.
    for extra in (["--config-dir", str(user)], [f"hydra.searchpath=[file://{user}]"]):
        out = _run([str(venv / "bin" / "scaling-train"), *extra, "+experiment=my_study", "--cfg", "job",
                    "--resolve"], cwd=cwd, env=env)
        cfg = out.stdout
        assert "name: my-study-d48" in cfg and "source: synthetic" in cfg and "\n  steps: 7\n" in cfg, cfg[-2000:]
        assert "optim:" in cfg and "lr:" in cfg  # the shipped groups the study left alone


def test_ci_runs_the_readme_test_command_verbatim():
    # CI must run exactly the README's second command (the test command); a flag added on one side only (a quieter
    # pip, another pytest option) would make CI test something other than what the README tells users to run.
    readme = (REPO / "README.md").read_text()
    block = readme.split("```bash\n", 1)[1].split("```", 1)[0].splitlines()
    assert len(block) == 2 and "pytest" in block[1], block
    ci = [line for line in (REPO / ".ci" / "run").read_text().splitlines() if line and not line.startswith("#")]
    assert block[1] in ci, f"the README's test command {block[1]!r} is not a line of .ci/run: {ci}"
