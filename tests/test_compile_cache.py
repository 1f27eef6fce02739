"""The persistent compilation cache a training process sets up for itself (config key compile_cache).

The test session has its own cache (conftest.py sets JAX_COMPILATION_CACHE_DIR), which a run must leave alone; the
product's default is checked in fresh processes without it.
"""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from scaling.config import Config
from scaling.train.compile_cache import default_dir, host_key

REPO = Path(__file__).resolve().parent.parent

RUN = textwrap.dedent(
    """
    import json, sys
    from pathlib import Path
    import jax, jax.monitoring
    sys.path.insert(0, "tests")
    from test_train import tiny_config
    from scaling.train.loop import train

    hits = []
    jax.monitoring.register_event_listener(lambda event, **kw: hits.append(event) if "cache_hits" in event else None)
    tmp, setting = Path(sys.argv[1]), json.loads(sys.argv[2])
    cfg = tiny_config(tmp)
    cfg.compile_cache = setting
    record = train(cfg, tmp / sys.argv[3])
    print(json.dumps({"loss": record["loss"], "hits": len(hits), "dir": jax.config.jax_compilation_cache_dir}))
    """
)


def _run(tmp_path, setting, run_name, cache_root):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("JAX_COMPILATION_CACHE", "JAX_PERSISTENT_CACHE"))}
    env.update(SCALING_CACHE=str(cache_root), JAX_PLATFORMS="cpu")
    proc = subprocess.run([sys.executable, "-c", RUN, str(tmp_path), json.dumps(setting), run_name], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_default_cache_is_per_host_and_a_second_process_hits_it_with_identical_losses(tmp_path):
    root = tmp_path / "scaling-cache"
    first = _run(tmp_path, "auto", "a", root)
    assert first["dir"] == str(root / "xla" / host_key()) and first["hits"] == 0
    assert any(Path(first["dir"]).iterdir())  # the step, eval and init executables were written
    second = _run(tmp_path, "auto", "b", root)  # another run of the same shape in a fresh process
    assert second["hits"] > 0 and second["loss"] == first["loss"]  # bit-identical: the same executable


def test_null_compiles_without_a_cache_and_an_explicit_dir_is_used_as_is(tmp_path):
    root = tmp_path / "scaling-cache"
    off = _run(tmp_path, None, "off", root)
    assert off["dir"] is None and not (root / "xla").exists()
    mine = _run(tmp_path, str(tmp_path / "mine"), "mine", root)
    assert mine["dir"] == str(tmp_path / "mine") and any((tmp_path / "mine").iterdir())


def test_unwritable_cache_dir_warns_and_the_run_trains(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    out = _run(tmp_path, str(blocker / "cache"), "r", tmp_path / "root")
    assert out["dir"] is None and out["loss"] > 0


def test_empty_compile_cache_is_refused_and_the_host_key_names_the_cpu():
    with pytest.raises(ValueError, match=r"compile_cache='' is invalid: give a directory, auto \(the default\), or null"):
        Config(compile_cache="")
    machine, digest = host_key().rsplit("-", 1)
    assert machine and len(digest) == 8 and host_key() == host_key()
    assert default_dir({"SCALING_CACHE": "/x"}) == Path("/x/xla") / host_key()
    # Unset or empty: the default root, as the token cache reads it (scaling.paths).
    assert default_dir({"SCALING_CACHE": ""}) == default_dir({}) == Path("~/.cache/scaling/xla").expanduser() / host_key()
