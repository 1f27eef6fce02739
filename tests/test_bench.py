import json

import pytest

from scaling import bench
from scaling.accounting import count_params, flops_per_token


def test_tiny_bench_prints_every_column_and_writes_json(tmp_path, capsys):
    out = tmp_path / "bench.json"
    report = bench.main(["--preset", "tiny", "--steps", "2", "--warmup", "1", "--vmap", "2", "--no-torch",
                         "--json", str(out)])
    printed = capsys.readouterr().out
    for column in ("tokens/s", "step ms", "FLOP/s", "MFU", "compile s", "peak mem", "attention", "speed-up"):
        assert column in printed, column
    on_disk = json.loads(out.read_text())
    assert on_disk["rows"] == json.loads(json.dumps(report["rows"]))
    row = on_disk["rows"][0]
    model = bench.model_config(bench.PRESETS["tiny"][0], {})
    assert row["N"] == count_params(model).non_embedding
    # achieved FLOP/s is tokens/s times the chinchilla FLOPs per token, and MFU divides it by the stated peak
    assert row["flops_per_s"] == pytest.approx(row["tokens_per_s"] * flops_per_token(model, "chinchilla"))
    assert row["mfu"] == pytest.approx(row["flops_per_s"] / on_disk["peak_flops"])
    assert row["tokens_per_s"] == pytest.approx(row["batch"] * row["seq_len"] / (row["step_ms"] / 1e3))
    assert row["attention"] == "xla" and row["compile_s"] > 0 and row["peak_memory_bytes"] > 0
    assert [r["K"] for r in on_disk["vmap"]["rows"]] == [1, 2]
    assert len(on_disk["loadavg_start"]) == 3


def test_torch_column_is_explained_when_torch_is_missing(monkeypatch, capsys):
    import builtins

    real_import = builtins.__import__

    def no_torch(name, *a, **kw):
        if name == "torch" or name.startswith("torch."):
            raise ImportError("No module named 'torch'")
        return real_import(name, *a, **kw)

    monkeypatch.setattr(builtins, "__import__", no_torch)
    report = bench.main(["--preset", "tiny", "--steps", "1", "--warmup", "0", "--vmap", ""])
    assert "torch not installed" in report["rows"][0]["torch_note"]
    assert "torch not installed" in capsys.readouterr().out


def test_torch_reference_trains_the_same_shape():
    pytest.importorskip("torch")
    shape = bench.PRESETS["tiny"][0]
    row = bench.bench_torch(shape, warmup=0, steps=2, compile_model=False)
    assert row["torch_tokens_per_s"] > 0
    # Same init and tied head: the first losses of both frameworks sit near ln(V) for random tokens.
    import math

    assert abs(row["torch_loss"] - math.log(shape.vocab_size)) < 0.5


def test_cudnn_request_without_cudnn_raises_instead_of_falling_back():
    import jax

    if jax.devices()[0].platform == "gpu":
        pytest.skip("this machine has cuDNN")
    with pytest.raises(RuntimeError, match="attention=cudnn was requested but cuDNN attention is unavailable"):
        bench.bench_jax(bench.PRESETS["tiny"][0], {"attention": "cudnn"}, warmup=0, steps=1, peak=1e12)


def test_attention_used_reads_the_compiled_hlo():
    model = bench.model_config(bench.PRESETS["tiny"][0], {})
    assert bench.attention_used(model, 'custom_call_target="__cudnn$fmhaSoftmax"') == "cudnn"
    assert bench.attention_used(model, "dot(...)") == "xla"
    assert bench.attention_used(model.replace(attention="einsum"), "dot(...)") == "einsum"


def test_bad_arguments_fail_clearly():
    with pytest.raises(SystemExit):
        bench.parse_args(["--steps", "0"])


def test_scan_flag_adds_a_scanned_row_with_the_same_shape():
    report = bench.main(["--preset", "tiny", "--steps", "1", "--warmup", "0", "--vmap", "", "--no-torch", "--scan"])
    variants = {r["variant"]: r for r in report["rows"]}
    assert set(variants) == {"f32", "f32-scan"}
    assert variants["f32"]["N"] == variants["f32-scan"]["N"]
    assert variants["f32-scan"]["compile_s"] > 0
