"""GPT-2 in the Hugging Face format -> the Flax decoder: a randomly initialised tiny GPT-2 written here with HF's tensor
names and shapes (no network), checked against an independent NumPy forward of GPT-2 and through the import CLI."""

import json
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import save_file

from scaling.data.tokens import DataConfig, load_tokens
from scaling.eval.sample import main as sample_main
from scaling.model import hf_gpt2
from scaling.record import read_record

V, D, H, P, N_LAYER = 50257, 32, 4, 64, 2
CONFIG = {"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"], "vocab_size": V, "n_positions": P,
          "n_embd": D, "n_layer": N_LAYER, "n_head": H, "n_inner": None, "activation_function": "gelu_new",
          "layer_norm_epsilon": 1e-5, "resid_pdrop": 0.1, "embd_pdrop": 0.1, "attn_pdrop": 0.1,
          "scale_attn_weights": True, "tie_word_embeddings": True}
# A toy byte-level BPE of GPT-2's size in its vocab.json + merges.txt format: 256 byte tokens, 50000 merges (all pairs
# of printable ASCII characters, then pairs + one character), then end-of-text at 50256.
ASCII = [chr(c) for c in range(33, 127)]
MERGES = ([f"{a} {b}" for a in ASCII for b in ASCII] + [f"{a}{b} {c}" for a in ASCII for b in ASCII for c in ASCII])[:V - 257]


def gpt2_tensors(seed: int = 0) -> dict[str, np.ndarray]:
    """HF GPT2Model's state dict (names, shapes; Conv1D weights [in, out]); scales large enough that attention and
    LayerNorm are far from trivial, so a permuted or transposed tensor changes the logits."""
    rng = np.random.default_rng(seed)
    r = lambda *shape, s=0.2: (s * rng.standard_normal(shape)).astype(np.float32)  # noqa: E731
    t = {"wte.weight": r(V, D, s=0.1), "wpe.weight": r(P, D, s=0.1), "ln_f.weight": 1 + r(D), "ln_f.bias": r(D)}
    for i in range(N_LAYER):
        t.update({f"h.{i}.ln_1.weight": 1 + r(D), f"h.{i}.ln_1.bias": r(D),
                  f"h.{i}.attn.c_attn.weight": r(D, 3 * D, s=0.5), f"h.{i}.attn.c_attn.bias": r(3 * D),
                  f"h.{i}.attn.c_proj.weight": r(D, D), f"h.{i}.attn.c_proj.bias": r(D),
                  f"h.{i}.ln_2.weight": 1 + r(D), f"h.{i}.ln_2.bias": r(D),
                  f"h.{i}.mlp.c_fc.weight": r(D, 4 * D), f"h.{i}.mlp.c_fc.bias": r(4 * D),
                  f"h.{i}.mlp.c_proj.weight": r(4 * D, D), f"h.{i}.mlp.c_proj.bias": r(D),
                  f"h.{i}.attn.bias": np.tril(np.ones((P, P), np.float32))[None, None]})  # the causal-mask buffer
    return t


def byte_alphabet() -> list[str]:
    """GPT-2's byte -> unicode map in id order, written as tiktoken's data_gym loader writes it: printable bytes (not
    space) stand for themselves, the others get chr(256 + n) in byte order."""
    printable = [b for b in range(256) if chr(b).isprintable() and chr(b) != " "]
    rest = [b for b in range(256) if b not in printable]
    return [chr(b) for b in printable] + [chr(256 + n) for n, _ in enumerate(rest)]


def write_vocab(hf_dir, merges=MERGES) -> None:
    vocab = {c: i for i, c in enumerate(byte_alphabet())}
    for m in merges:
        vocab["".join(m.split(" "))] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    (hf_dir / "vocab.json").write_text(json.dumps(vocab))
    (hf_dir / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")


def write_gpt2(hf_dir, tensors=None, **config):
    hf_dir.mkdir(parents=True, exist_ok=True)
    (hf_dir / "config.json").write_text(json.dumps({**CONFIG, **config}))
    save_file(gpt2_tensors() if tensors is None else tensors, str(hf_dir / "model.safetensors"))
    write_vocab(hf_dir)
    return hf_dir


def reference_logits(t: dict[str, np.ndarray], tokens_BxL: np.ndarray) -> np.ndarray:
    """GPT-2's forward in NumPy, read off HF's modeling_gpt2 (Radford et al. 2019): pre-LN blocks, tanh GELU, causal
    softmax(q k^T / sqrt(K)) attention, final LayerNorm, logits against lm_head (the token embedding when tied)."""
    def ln(x, name):
        mu, var = x.mean(-1, keepdims=True), x.var(-1, keepdims=True)
        return (x - mu) / np.sqrt(var + 1e-5) * t[f"{name}.weight"] + t[f"{name}.bias"]

    def gelu_new(x):  # Hendrycks & Gimpel 2016, tanh approximation
        return 0.5 * x * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x**3)))

    B, L = tokens_BxL.shape
    K = D // H
    x = t["wte.weight"][tokens_BxL] + t["wpe.weight"][np.arange(L)][None]
    causal_LxL = np.tril(np.ones((L, L), bool))
    for i in range(N_LAYER):
        a = f"h.{i}.attn"
        qkv = ln(x, f"h.{i}.ln_1") @ t[f"{a}.c_attn.weight"] + t[f"{a}.c_attn.bias"]
        q, k, v = (m.reshape(B, L, H, K).transpose(0, 2, 1, 3) for m in np.split(qkv, 3, axis=-1))
        s = np.where(causal_LxL, q @ k.transpose(0, 1, 3, 2) / np.sqrt(K), -np.inf)
        w = np.exp(s - s.max(-1, keepdims=True))
        y = (w / w.sum(-1, keepdims=True) @ v).transpose(0, 2, 1, 3).reshape(B, L, D)
        x = x + y @ t[f"{a}.c_proj.weight"] + t[f"{a}.c_proj.bias"]
        m = f"h.{i}.mlp"
        h = gelu_new(ln(x, f"h.{i}.ln_2") @ t[f"{m}.c_fc.weight"] + t[f"{m}.c_fc.bias"])
        x = x + h @ t[f"{m}.c_proj.weight"] + t[f"{m}.c_proj.bias"]
    return ln(x, "ln_f") @ t.get("lm_head.weight", t["wte.weight"]).T  # torch Linear [out, in]; tied: wte


TOKENS = np.random.default_rng(1).integers(0, V, size=(2, 24))


def flax_logits(cfg, params, tokens=TOKENS):
    return np.asarray(cfg.build().apply({"params": params}, jnp.asarray(tokens)))


def test_logits_equal_an_independent_numpy_gpt2(tmp_path):
    tensors = gpt2_tensors()
    cfg, params = hf_gpt2.load_hf(write_gpt2(tmp_path / "gpt2"))
    assert (cfg.d_model, cfg.n_layers, cfg.n_heads, cfg.vocab_size, cfg.seq_len, cfg.ff_dim) == (D, N_LAYER, H, V, P, 4 * D)
    assert cfg.tie_embeddings and cfg.pos_encoding == "learned"
    expected = reference_logits(tensors, TOKENS)
    np.testing.assert_allclose(flax_logits(cfg, params), expected, atol=1e-4, rtol=1e-4)
    # the comparison can fail: q and k swapped in c_attn is a different model
    swapped = dict(tensors)
    w = tensors["h.0.attn.c_attn.weight"]
    swapped["h.0.attn.c_attn.weight"] = np.concatenate([w[:, D:2 * D], w[:, :D], w[:, 2 * D:]], axis=1)
    assert np.abs(reference_logits(swapped, TOKENS) - expected).max() > 1e-2


def test_untied_head_and_d_ff_are_imported(tmp_path):
    tensors = gpt2_tensors()
    F = 48
    for i in range(N_LAYER):
        tensors[f"h.{i}.mlp.c_fc.weight"] = tensors[f"h.{i}.mlp.c_fc.weight"][:, :F].copy()
        tensors[f"h.{i}.mlp.c_fc.bias"] = tensors[f"h.{i}.mlp.c_fc.bias"][:F].copy()
        tensors[f"h.{i}.mlp.c_proj.weight"] = tensors[f"h.{i}.mlp.c_proj.weight"][:F].copy()
    head_VxD = (0.1 * np.random.default_rng(2).standard_normal((V, D))).astype(np.float32)
    tensors["lm_head.weight"] = head_VxD
    cfg, params = hf_gpt2.load_hf(write_gpt2(tmp_path / "g", tensors, n_inner=F, tie_word_embeddings=False))
    assert cfg.d_ff == F and not cfg.tie_embeddings
    np.testing.assert_allclose(flax_logits(cfg, params), reference_logits(tensors, TOKENS), atol=1e-4, rtol=1e-4)


def test_pytorch_bin_reads_like_safetensors(tmp_path, monkeypatch):
    torch = pytest.importorskip("torch")
    hf_dir = write_gpt2(tmp_path / "st")
    _, from_st = hf_gpt2.load_hf(hf_dir)
    (hf_dir / "model.safetensors").unlink()
    torch.save({f"transformer.{k}": torch.from_numpy(v) for k, v in gpt2_tensors().items()},
               hf_dir / "pytorch_model.bin")
    _, from_bin = hf_gpt2.load_hf(hf_dir)
    assert all(np.array_equal(a, b) for a, b in zip(*(jax.tree.leaves(p) for p in (from_st, from_bin))))
    monkeypatch.setitem(sys.modules, "torch", None)  # as if torch were not installed
    with pytest.raises(ValueError, match="only pytorch_model.bin, which needs torch to read: pip install torch"):
        hf_gpt2.load_hf(hf_dir)


def test_transformers_logits_equal(tmp_path):
    """Optional: HF's own GPT2LMHeadModel (when transformers and torch are installed) on the same checkpoint."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    model = transformers.GPT2LMHeadModel(transformers.GPT2Config(**{k: v for k, v in CONFIG.items()
                                                                     if k != "architectures"}))
    with torch.no_grad():
        for name, p in model.transformer.named_parameters():
            p.copy_(torch.from_numpy(gpt2_tensors()[name]))
    model.eval()
    model.save_pretrained(tmp_path / "hf", safe_serialization=True)
    cfg, params = hf_gpt2.load_hf(tmp_path / "hf")
    with torch.no_grad():
        expected = model(torch.from_numpy(TOKENS)).logits.numpy()
    np.testing.assert_allclose(flax_logits(cfg, params), expected, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("change, message", [
    (dict(activation_function="relu"), "activation_function='relu' is not supported"),
    (dict(scale_attn_by_inverse_layer_idx=True), "scale_attn_by_inverse_layer_idx=True is not supported"),
    (dict(layer_norm_epsilon=1e-6), "layer_norm_epsilon=1e-06 is not supported"),
    (dict(model_type="gpt_neo"), "model_type='gpt_neo' is not supported"),
    (dict(add_cross_attention=True), "add_cross_attention=True is not supported"),
])
def test_unsupported_config_is_one_clear_error(tmp_path, change, message):
    with pytest.raises(ValueError, match=message):
        hf_gpt2.load_hf(write_gpt2(tmp_path / "g", **change))


def test_missing_misshapen_and_unknown_tensors_are_named(tmp_path):
    t = gpt2_tensors()
    del t["h.1.mlp.c_fc.bias"]
    with pytest.raises(ValueError, match=r"tensor 'h.1.mlp.c_fc.bias' is missing"):
        hf_gpt2.load_hf(write_gpt2(tmp_path / "a", t))
    t = gpt2_tensors()
    t["h.0.attn.c_attn.weight"] = t["h.0.attn.c_attn.weight"][:, : 2 * D].copy()
    with pytest.raises(ValueError, match=r"tensor 'h.0.attn.c_attn.weight' has shape \[32, 64\].*needs \[32, 96\]"):
        hf_gpt2.load_hf(write_gpt2(tmp_path / "b", t))
    with pytest.raises(ValueError, match=r"tensor 'h.2.ln_1.weight' .* is not part of GPT-2"):
        hf_gpt2.load_hf(write_gpt2(tmp_path / "c", {**gpt2_tensors(), "h.2.ln_1.weight": np.ones(D, np.float32)}))
    t = gpt2_tensors()
    with pytest.raises(ValueError, match="lm_head.weight differs from wte.weight"):
        hf_gpt2.load_hf(write_gpt2(tmp_path / "d", {**t, "lm_head.weight": t["wte.weight"] + 1}))


def test_missing_directory_config_and_weights(tmp_path, monkeypatch):
    with pytest.raises(FileNotFoundError, match="does not exist: give a local Hugging Face checkpoint directory"):
        hf_gpt2.load_hf(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="holds no config.json"):
        hf_gpt2.load_hf(tmp_path / "empty")
    hf_dir = write_gpt2(tmp_path / "g")
    (hf_dir / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="holds no weights: expected one of model.safetensors"):
        hf_gpt2.load_hf(hf_dir)


def test_hub_name_offline_is_a_clear_error(tmp_path, monkeypatch):
    import huggingface_hub

    monkeypatch.chdir(tmp_path)  # no local folder called gpt2

    def offline(**kw):
        raise OSError("We couldn't connect to 'https://huggingface.co'")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", offline)
    with pytest.raises(FileNotFoundError, match="'gpt2' is no local directory and could not be fetched.*pass the local "
                                                "directory"):
        hf_gpt2.load_hf("gpt2")
    monkeypatch.setitem(sys.modules, "huggingface_hub", None)
    with pytest.raises(FileNotFoundError, match="huggingface_hub is not installed"):
        hf_gpt2.load_hf("gpt2-medium")


def test_tokenizer_files_that_disagree_are_refused(tmp_path):
    hf_dir = write_gpt2(tmp_path / "g")
    vocab = json.loads((hf_dir / "vocab.json").read_text())
    vocab["!!"], vocab["!\""] = vocab["!\""], vocab["!!"]  # ids no longer follow the merge order
    (hf_dir / "vocab.json").write_text(json.dumps(vocab))
    with pytest.raises(ValueError, match="merge 0 .* vocab.json and merges.txt disagree"):
        hf_gpt2.tokenizer_config(hf_dir, tmp_path / "tok")


def tiny_data(tmp_path) -> DataConfig:
    return DataConfig(max_bytes=200_000, doc_bytes=8192, cache_dir=str(tmp_path / "cache"))


@pytest.mark.slow
def test_import_writes_a_run_that_sample_loads(tmp_path, capsys):
    hf_dir, out = write_gpt2(tmp_path / "gpt2"), tmp_path / "runs" / "gpt2"
    source = tmp_path / "sweep_run"  # --data-from: evaluate on that run's data
    source.mkdir()
    (source / "config.json").write_text(json.dumps({"data": {"max_bytes": 200_000, "doc_bytes": 8192,
                                                             "cache_dir": str(tmp_path / "cache")}}))
    hf_gpt2.main([str(hf_dir), str(out), "--data-from", str(source), "--eval-tokens", "512", "--eval-seq-len", "32",
                  "--batch-size", "4", "--tokens", "1e9"])
    assert "validation loss" in capsys.readouterr().out
    rec = read_record(out)
    assert rec["status"] == "completed" and rec["name"] == "gpt2" and rec["D"] == 1e9 and rec["steps"] == 0
    assert rec["N"] == N_LAYER * (12 * D * D + 13 * D) + 2 * D  # GPT-2's non-embedding parameters (Kaplan's N)
    assert rec["tokenizer"]["vocab_size"] == V and rec["imported"]["format"] == "huggingface-gpt2"

    # the recorded loss is the reference GPT-2's on the run's validation batches
    data = load_tokens(hf_gpt2.run_config(*hf_gpt2.load_hf(hf_dir)[:1], hf_gpt2.tokenizer_config(hf_dir, tmp_path / "t"),
                                          "x", tiny_data(tmp_path)).data)
    losses = []
    for b in data.val_batches(512, 4, 32):
        logits = reference_logits(gpt2_tensors(), b[:, :-1])
        logp = logits - logits.max(-1, keepdims=True)
        logp -= np.log(np.exp(logp).sum(-1, keepdims=True))
        losses.append(-np.take_along_axis(logp, b[:, 1:, None], -1).mean())
    assert rec["loss"] == pytest.approx(float(np.mean(losses)), abs=1e-4)
    assert rec["bpb"] == pytest.approx(rec["loss"] / np.log(2) / rec["bytes_per_token"]) and rec["bytes_per_token"] > 1

    cfg, params = hf_gpt2.load_any(out)  # a run directory: scaling.eval.sample.load_run
    _, imported = hf_gpt2.load_hf(hf_dir)
    assert all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(imported)))
    assert cfg.data.tokenizer.name == str((out / "tokenizer" / "gpt2.tiktoken").absolute())
    sample_main([str(out), "--prompt", "the", "--max-new-tokens", "4", "--temperature", "0"])  # load_run + generate
    assert "--- sample 0 ---\nthe" in capsys.readouterr().out

    with pytest.raises(SystemExit):  # never over an existing run
        hf_gpt2.main([str(hf_dir), str(out)])
    assert f"{out} already holds a run" in capsys.readouterr().err


def test_load_any_reads_an_hf_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("SCALING_CACHE", str(tmp_path / "cache"))
    cfg, params = hf_gpt2.load_any(write_gpt2(tmp_path / "gpt2"))
    assert cfg.name == "gpt2" and cfg.model.vocab_size == V and cfg.data.tokenizer.kind == "tiktoken"
    assert cfg.data.tokenizer.name.startswith(str(tmp_path / "cache" / "tokenizers"))
    np.testing.assert_allclose(flax_logits(cfg.model, params), reference_logits(gpt2_tensors(), TOKENS), atol=1e-4,
                               rtol=1e-4)
