import json
import math
import os

import numpy as np
import pytest

from scaling.bench import references as bench_refs
from scaling.bench import runner as bench
from scaling.accounting import count_params, flops_per_token

TINY = bench.PRESETS["tiny"][0]
QUICK = ["--preset", "tiny", "--steps", "1", "--warmup", "0", "--vmap", "", "--allow-busy"]


def test_tiny_bench_prints_every_column_writes_json_and_scan_profile_rows(tmp_path, capsys):
    # One bench invocation for every flag: each invocation starts worker processes and compiles (~20 s).
    out = tmp_path / "bench.json"
    report = bench.main(["--preset", "tiny", "--steps", "2", "--warmup", "1", "--vmap", "2", "--refs", "linen",
                         "--allow-busy", "--json", str(out), "--scan", "--profile"])
    printed = capsys.readouterr().out
    for column in ("tokens/s", "step ms", "FLOP/s", "MFU", "compile s", "peak mem", "attention", "linen tok/s",
                   "x linen", "load", "speed-up"):
        assert column in printed, column
    on_disk = json.loads(out.read_text())
    assert on_disk["rows"] == json.loads(json.dumps(report["rows"]))
    row = on_disk["rows"][0]
    assert row["variant"] == "f32"
    model = bench.model_config(TINY, {})
    assert row["N"] == count_params(model).non_embedding
    # achieved FLOP/s is tokens/s times the chinchilla FLOPs per token, and MFU divides it by the stated peak
    assert row["flops_per_s"] == pytest.approx(row["tokens_per_s"] * flops_per_token(model, "chinchilla"))
    assert row["mfu"] == pytest.approx(row["flops_per_s"] / on_disk["peak_flops"])
    assert row["tokens_per_s"] == pytest.approx(row["batch"] * row["seq_len"] / (row["step_ms"] / 1e3))
    assert row["attention"] == "blocked" and row["compile_s"] > 0 and row["peak_memory_bytes"] > 0
    assert [r["K"] for r in on_disk["vmap"]["rows"]] == [1, 2]
    assert len(on_disk["loadavg_start"]) == 3
    assert on_disk["host"] == bench.cpu_model() and f"({on_disk['host']})" in printed  # ratios depend on the CPU
    for measured in (row, row["refs"]["linen"]):
        assert len(measured["load"]["loadavg_before"]) == 3 and len(measured["load"]["loadavg_after"]) == 3
    assert row["refs"]["linen"]["tokens_per_s"] > 0
    variants = {r["variant"]: r for r in report["rows"]}
    assert set(variants) == {"f32", "f32-scan"}
    assert variants["f32"]["N"] == variants["f32-scan"]["N"]
    assert variants["f32-scan"]["compile_s"] > 0
    groups = {p["group"]: p for p in variants["f32"]["profile"]}
    assert sum(p["share"] for p in groups.values()) == pytest.approx(1.0)
    assert any(g.startswith("bwd attn core") for g in groups) and any("mlp/fc matmul" in g for g in groups)


def test_cpu_devices_row_runs_the_step_data_parallel_over_that_many_devices():
    both = bench.main(["--preset", "tiny", "--steps", "2", "--warmup", "1", "--vmap", "", "--refs", "", "--allow-busy",
                       "--cpu-devices", "1,2"])
    one, two = both["rows"]
    assert (one["variant"], two["variant"]) == ("f32", "f32-fsdp2")
    assert (one["mesh_devices"], two["mesh_devices"]) == (1, 2) and two["pid"] != one["pid"]
    assert two["loss"] == pytest.approx(one["loss"], rel=1e-4)  # the same maths, summed per device first
    with pytest.raises(SystemExit):
        bench.parse_args(["--cpu-devices", "0"])


@pytest.mark.parametrize("steps_per_call", [1, 2])
def test_step_setup_in_microbatches_trains_on_the_same_tokens(steps_per_call):
    """benchmarks/interleaved.py's "grad_accum": the same batch split in microbatches, so an A/B of the split times
    the same maths (the update equal up to float summation order)."""
    import jax

    ends = []
    for A in (1, 2):
        _, step, state, lower_args, call = bench.step_setup(TINY, {}, steps_per_call, grad_accum=A)
        compiled = step.lower(*lower_args).compile()
        for i in range(2):
            state, metrics = call(compiled, state, i)
        ends.append((jax.device_get(metrics["train_loss"]), jax.tree_util.tree_leaves(jax.device_get(state["params"]))))
    (loss1, params1), (loss2, params2) = ends
    np.testing.assert_allclose(loss2, loss1, rtol=1e-5)
    for p1, p2 in zip(params1, params2):  # other tokens: differences of ~1e-2 (checked with another batch)
        np.testing.assert_allclose(p2, p1, atol=2e-5)
    with pytest.raises(ValueError, match="grad_accum=3 does not split tiny's batch of 4"):
        bench.step_setup(TINY, {}, 1, grad_accum=3)


def test_every_implementation_runs_in_its_own_process_on_the_same_cores():
    pytest.importorskip("torch")
    report = bench.main([*QUICK, "--refs", "linen,torch", "--threads", "1"])
    row = report["rows"][0]
    pids = {row["pid"], row["refs"]["linen"]["pid"], row["refs"]["torch"]["pid"], os.getpid()}
    assert len(pids) == 4
    assert row["cores"] == row["refs"]["linen"]["cores"] == row["refs"]["torch"]["cores"] == 1
    assert "1 threads" in row["refs"]["torch"]["version"]


def test_repeats_interleave_the_implementations_in_their_own_processes_and_report_the_median():
    report = bench.main([*QUICK, "--refs", "linen", "--repeats", "3"])
    row = report["rows"][0]
    for measured in (row, row["refs"]["linen"]):
        samples = measured["samples"]
        assert len(samples) == 3 and measured["tokens_per_s"] == sorted(samples)[1]
    cell = f"{row['tokens_per_s']:,.0f} ({min(row['samples']):,.0f}-{max(row['samples']):,.0f})"
    assert f"| {cell} |" in bench.format_table(report)
    with pytest.raises(SystemExit):
        bench.parse_args(["--repeats", "0"])


def test_median_row_keeps_the_median_measurement_and_the_whole_load_span():
    def measured(tps, before, after, others):
        return {"tokens_per_s": tps, "step_ms": 1e3 / tps, "pid": tps,
                "load": {"loadavg_before": (before, 0, 0), "loadavg_after": (after, 0, 0), "other_cores": others}}

    rows = [measured(30.0, 0.2, 1.0, 0.01), measured(10.0, 1.0, 1.5, 0.30), measured(20.0, 1.5, 1.8, 0.02),
            measured(40.0, 1.8, 1.9, 0.00)]
    median = bench.median_row(rows)
    assert median["pid"] == 20.0 and median["samples"] == [30.0, 10.0, 20.0, 40.0]  # lower median of an even count
    assert median["load"] == {"loadavg_before": (0.2, 0, 0), "loadavg_after": (1.9, 0, 0), "other_cores": 0.30}
    failed = {"error": "worker timed out after 9 s"}
    assert bench.median_row([failed]) == failed
    assert bench.median_row([rows[0], failed])["samples"] == [30.0]  # a failed repeat is no sample


def test_busy_machine_is_refused_unless_allowed(monkeypatch):
    monkeypatch.setattr(os, "getloadavg", lambda: (3.5, 3.0, 2.0))
    with pytest.raises(SystemExit, match="1-minute load average is 3.50 > --max-load 1.0"):
        bench.main(["--preset", "tiny", "--refs", ""])


def test_rows_measured_while_others_were_busy_are_marked():
    quiet = {"loadavg_before": (0.1, 0, 0), "loadavg_after": (1.9, 0, 0), "other_cores": 0.05}
    busy = {**quiet, "other_cores": 1.6}
    row = {"shape": "s", "variant": "f32", "N": 1, "batch": 1, "seq_len": 1, "tokens_per_s": 2.0, "step_ms": 1.0,
           "flops_per_s": 1.0, "mfu": 0.1, "compile_s": 1.0, "peak_memory_bytes": 1, "attention": "blocked",
           "load": quiet, "refs": {"torch": {"tokens_per_s": 1.0, "load": quiet}}}
    report = {"rows": [row], "refs": ["torch"], "max_load": 1.0, "threads": 2, "loadavg_start": (0.1, 0, 0),
              "loadavg_end": (1.9, 0, 0)}
    table = bench.format_table(report)
    assert "| 2.00x |" in table and "BUSY" not in table  # our own worker's load average does not count
    row["refs"]["torch"]["load"] = busy
    assert "others 1.60 BUSY" in bench.format_table(report)


def test_missing_torch_is_explained(monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_torch(name, *a, **kw):
        if name == "torch" or name.startswith("torch."):
            raise ImportError("No module named 'torch'", name="torch")
        return real_import(name, *a, **kw)

    monkeypatch.setattr(builtins, "__import__", no_torch)
    # worker() pins its process to `threads` cores, as a bench subprocess should; here it runs in pytest's process,
    # whose later tests (and the processes they start) must keep every core.
    cores = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else None
    try:
        row = bench.worker({"impl": "torch", "shape": bench.asdict(TINY), "threads": 1, "warmup": 0, "steps": 1})
    finally:
        if cores is not None:
            os.sched_setaffinity(0, cores)
    assert "torch not installed (pip install -e '.[bench]')" in row["error"]


@pytest.mark.parametrize("shape", [TINY, bench.PRESETS["nanogpt"][1]], ids=lambda s: s.name)
def test_references_build_the_same_model_and_train(shape):
    """Same parameter count as this project's model (asserted inside), first loss near ln(V) (same init)."""
    dims = bench.reference_dims(shape)
    assert dims["expected_params"] == count_params(bench.model_config(shape, {})).total
    refs = [lambda: bench_refs.linen_step(**dims)]
    try:
        import torch  # noqa: F401

        refs.append(lambda: bench_refs.torch_step(**dims, compile_model=False))
    except ImportError:
        pass
    for make in refs:
        step = make()
        assert abs(step() - math.log(shape.vocab_size)) < 0.5
    with pytest.raises(AssertionError, match="params"):
        bench_refs.linen_step(**{**dims, "expected_params": dims["expected_params"] + 1})


def test_torch_reference_trains_on_a_new_batch_every_step():
    # On one repeated batch the reference memorizes it and its step slows (denormal gradients; torch does not flush
    # them, XLA:CPU does), so a long measurement would time a regime no training run is in. Uniformly random tokens
    # cannot be learnt: the loss stays near ln(V) only if every step sees new ones.
    pytest.importorskip("torch")
    step = bench_refs.torch_step(**bench.reference_dims(TINY), compile_model=False)
    losses = [step() for _ in range(60)]
    assert min(losses[-10:]) > math.log(TINY.vocab_size) - 0.3, losses[-10:]


def test_cudnn_request_without_cudnn_raises_instead_of_falling_back():
    import jax

    if jax.devices()[0].platform == "gpu":
        pytest.skip("this machine has cuDNN")
    with pytest.raises(RuntimeError, match="attention=cudnn was requested but cuDNN attention is unavailable"):
        bench.bench_jax(TINY, {"attention": "cudnn"}, warmup=0, steps=1, peak=1e12)


def test_attention_used_reads_the_compiled_hlo():
    import jax

    model = bench.model_config(TINY, {})
    assert bench.attention_used(model, 'custom_call_target="__cudnn$fmhaSoftmax"') == "cudnn"
    assert bench.attention_used(model, "dot(...)") == ("blocked" if jax.default_backend() == "cpu" else "xla")
    assert bench.attention_used(model.replace(attention="xla"), "dot(...)") == "xla"
    assert bench.attention_used(model.replace(attention="einsum"), "dot(...)") == "einsum"


def test_bad_arguments_fail_clearly():
    with pytest.raises(SystemExit):
        bench.parse_args(["--steps", "0"])
    with pytest.raises(SystemExit):
        bench.parse_args(["--refs", "numpy"])
    with pytest.raises(SystemExit):
        bench.parse_args(["--steps-per-call", "0"])
    assert bench.parse_args(["--steps-per-call", "1"]).steps_per_call == 1


def test_profile_groups_name_matmuls_of_every_cpu_library_and_the_model_part():
    profile_group = bench.profile_group
    op = "jit(step_fn)/transpose(jvp(Transformer))/block_1/mlp/fc/dot_general"
    for fusion in ("ynn_fusion.3", "onednn_fusion.12", "dot.78"):
        assert profile_group(fusion, op) == "bwd mlp/fc matmul", fusion
    gelu = "jit(step_fn)/jvp(Transformer)/block_2/mlp/tanh"
    assert profile_group("multiply_tanh_fusion", gelu) == "fwd mlp gelu other"
    assert profile_group("loop_fusion", "jit(step_fn)/jvp(Transformer)/block_0/ln_1/mul") == "fwd layernorm other"
