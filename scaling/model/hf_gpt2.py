"""GPT-2 checkpoints in the Hugging Face format -> this decoder's ModelConfig and Flax params.

`python -m scaling.model.hf_gpt2 HF_DIR_OR_NAME OUT_RUN_DIR` writes a run directory (config.json, an orbax checkpoint,
record.json with the validation loss on the run's data), so `scaling.eval.sample` and everything else that reads run
directories runs on GPT-2 unchanged. `load_any` loads a run directory, a local HF directory or a Hub name.

GPT-2 (Radford et al. 2019) is this decoder's architecture: learned positions, pre-LN blocks, tanh GELU, biases,
LayerNorm eps 1e-5, tied embeddings. HF's GPT-2 uses `Conv1D` layers whose weights are stored [in, out], which is a
Flax Dense kernel as it is, and its fused `c_attn` output splits into q, k, v and then heads exactly as
`CausalSelfAttention` splits `qkv` (split in three, then reshape to [H, K]): no tensor is permuted.
Letters: V vocabulary, P positions (n_positions), D d_model, F feed-forward width.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import re
import sys
from pathlib import Path
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np

from scaling.accounting import FLOP_CONVENTIONS, count_params, flops_per_token
from scaling.config import Config, TrainConfig, resolve_budget, to_dict
from scaling.data.tokenizers import ENDOFTEXT, TokenizerConfig, bytes_to_unicode, write_ranks
from scaling.data.tokens import DataConfig, TokenData, load_tokens
from scaling.model.decoder import ModelConfig, init_params, loss_fn
from scaling.record import CONFIG_FILE, git_commit, package_versions, text_metrics, write_json_atomic, write_record
from scaling.train.checkpoint import Checkpointer

WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin")
HUB_FILES = ["config.json", "model.safetensors", "model.safetensors.index.json", "model-*.safetensors",
             "vocab.json", "merges.txt"]
# HF's tanh approximation of GELU under its names (transformers/activations.py): all equal the decoder's
# nn.gelu(approximate=True) (Hendrycks & Gimpel 2016, Sec. 2).
TANH_GELU = ("gelu_new", "gelu_pytorch_tanh", "gelu_fast")
LAYER_NORM_EPS = 1e-5  # the decoder's (scaling/model/decoder.py _layer_norm)
# Buffers, not parameters: the causal mask and its fill value in older transformers versions.
_BUFFER = re.compile(r"h\.\d+\.attn\.(bias|masked_bias)$")
_HUB_ID = re.compile(r"^[\w.-]+(/[\w.-]+)?$")


# --------------------------------------------------------------------------------------------------------------------
# config.json -> ModelConfig
# --------------------------------------------------------------------------------------------------------------------
def model_config(hf: dict, where: str = "config.json") -> ModelConfig:
    """The decoder's config for an HF GPT2Config; ValueError naming the field this decoder cannot run."""
    def need(key: str, ok, want: str, default: Any = None) -> Any:
        value = hf.get(key, default)
        if not ok(value):
            raise ValueError(f"{where}: {key}={value!r} is not supported by this decoder (it needs {want}); "
                             "only GPT-2-architecture checkpoints import")
        return value

    need("model_type", lambda v: v == "gpt2", "model_type 'gpt2'")
    need("activation_function", lambda v: v in TANH_GELU, f"the tanh GELU: one of {TANH_GELU}", "gelu_new")
    need("layer_norm_epsilon", lambda v: isinstance(v, (int, float)) and abs(v - LAYER_NORM_EPS) < 1e-12,
         f"{LAYER_NORM_EPS}", LAYER_NORM_EPS)
    need("scale_attn_weights", lambda v: v is True, "True (scores divided by sqrt(head dim))", True)
    need("scale_attn_by_inverse_layer_idx", lambda v: v is False, "False", False)
    need("add_cross_attention", lambda v: v is False, "False (a decoder-only model)", False)
    D, F = hf.get("n_embd"), hf.get("n_inner")
    for key in ("n_embd", "n_layer", "n_head", "n_positions", "vocab_size"):
        need(key, lambda v: isinstance(v, int) and v > 0, "a positive integer")
    # vocab_size is kept as it is (50257 for GPT-2), not padded to a multiple of 64: padded rows would add
    # exp(logit) mass to every softmax and change the loss.
    return ModelConfig(d_model=D, n_layers=hf["n_layer"], n_heads=hf["n_head"], vocab_size=hf["vocab_size"],
                       seq_len=hf["n_positions"], d_ff=None if F in (None, 4 * D) else F, pos_encoding="learned",
                       tie_embeddings=bool(hf.get("tie_word_embeddings", True)), use_bias=True, dropout=0.0)


# --------------------------------------------------------------------------------------------------------------------
# Weights: files -> {HF name: array} -> Flax params
# --------------------------------------------------------------------------------------------------------------------
def read_tensors(hf_dir: Path) -> dict[str, np.ndarray]:
    """Every tensor of the checkpoint as float32 numpy, under HF's names without a `transformer.` prefix.
    safetensors first (read with its numpy API: no torch); pytorch_model.bin needs torch."""
    st, index, pt = (hf_dir / f for f in WEIGHT_FILES)
    if st.exists() or index.exists():
        from safetensors.numpy import load_file

        shards = [st] if st.exists() else sorted({index.parent / f for f in json.loads(index.read_text())["weight_map"].values()})
        tensors = {}
        for shard in shards:
            try:
                tensors.update(load_file(str(shard)))
            except Exception as e:  # safetensors raises its own SafetensorError, OSError, ...
                raise ValueError(f"{shard} is not a readable safetensors file ({type(e).__name__}: {e}); "
                                 "download it again") from None
    elif pt.exists():
        try:
            import torch
        except ImportError:
            raise ValueError(f"{hf_dir} holds only pytorch_model.bin, which needs torch to read: pip install torch, "
                             "or convert the checkpoint to model.safetensors") from None
        state = torch.load(str(pt), map_location="cpu", weights_only=True)
        tensors = {k: v.float().numpy() for k, v in state.items()}
    else:
        raise FileNotFoundError(f"{hf_dir} holds no weights: expected one of {', '.join(WEIGHT_FILES)} beside "
                                "config.json")
    return {k.removeprefix("transformer."): np.asarray(v, dtype=np.float32) for k, v in tensors.items()}


def flax_names(cfg: ModelConfig) -> dict[tuple[str, ...], str]:
    """Flax param path -> the HF tensor it is (both store [in, out] kernels and [V, D] embeddings)."""
    names = {("wte", "embedding"): "wte.weight", ("wpe", "embedding"): "wpe.weight",
             ("ln_f", "scale"): "ln_f.weight", ("ln_f", "bias"): "ln_f.bias"}
    layer = {("ln_1", "scale"): "ln_1.weight", ("ln_1", "bias"): "ln_1.bias",
             ("attn", "qkv", "kernel"): "attn.c_attn.weight", ("attn", "qkv", "bias"): "attn.c_attn.bias",
             ("attn", "proj", "kernel"): "attn.c_proj.weight", ("attn", "proj", "bias"): "attn.c_proj.bias",
             ("ln_2", "scale"): "ln_2.weight", ("ln_2", "bias"): "ln_2.bias",
             ("mlp", "fc", "kernel"): "mlp.c_fc.weight", ("mlp", "fc", "bias"): "mlp.c_fc.bias",
             ("mlp", "proj", "kernel"): "mlp.c_proj.weight", ("mlp", "proj", "bias"): "mlp.c_proj.bias"}
    for i in range(cfg.n_layers):
        names.update({(f"block_{i}", *path): f"h.{i}.{name}" for path, name in layer.items()})
    return names


def to_flax(cfg: ModelConfig, tensors: dict[str, np.ndarray], where: str = "the checkpoint") -> dict:
    """The decoder's param tree from HF tensors; one ValueError naming the first missing, misshapen or unknown tensor."""
    shapes = {tuple(k.key for k in path): leaf.shape for path, leaf in
              jax.tree_util.tree_leaves_with_path(jax.eval_shape(lambda: init_params(cfg, jax.random.key(0))))}
    names = flax_names(cfg)
    if not cfg.tie_embeddings:
        names[("head", "kernel")] = "lm_head.weight"
    assert set(names) == set(shapes), "flax_names is out of step with the decoder's param tree"
    used = set(names.values())
    if cfg.tie_embeddings and "lm_head.weight" in tensors:  # some writers also store the tied copy
        if not np.array_equal(tensors["lm_head.weight"], tensors.get("wte.weight")):
            raise ValueError(f"{where}: lm_head.weight differs from wte.weight although tie_word_embeddings is true: "
                             "set tie_word_embeddings to false in config.json if the head is untied")
        used.add("lm_head.weight")
    unknown = sorted(k for k in tensors if k not in used and not _BUFFER.fullmatch(k))
    if unknown:
        raise ValueError(f"{where}: tensor {unknown[0]!r} (of {len(unknown)} unknown: {unknown[:4]}) is not part of "
                         "GPT-2: this checkpoint has layers the decoder lacks (or more layers than config.json's n_layer)")
    params: dict = {}
    for path, name in names.items():
        if name not in tensors:
            raise ValueError(f"{where}: tensor {name!r} is missing (config.json gives n_layer={cfg.n_layers}); "
                             "the checkpoint is incomplete or does not match its config.json")
        array = tensors[name].T if path == ("head", "kernel") else tensors[name]  # torch Linear stores [out, in]
        if array.shape != shapes[path]:
            raise ValueError(f"{where}: tensor {name!r} has shape {list(tensors[name].shape)}, but config.json "
                             f"(n_embd={cfg.d_model}, n_inner={cfg.ff_dim}, n_positions={cfg.seq_len}, "
                             f"vocab_size={cfg.vocab_size}) needs {list(shapes[path])}; the weights and config.json "
                             "disagree")
        node = params
        for key in path[:-1]:
            node = node.setdefault(key, {})
        node[path[-1]] = array
    return params


# --------------------------------------------------------------------------------------------------------------------
# Where the checkpoint is: a local directory, or a Hub name downloaded once
# --------------------------------------------------------------------------------------------------------------------
def resolve(path_or_name: str | Path) -> Path:
    """A local HF directory, or the Hub snapshot of a name such as "gpt2" / "gpt2-medium" (downloaded once)."""
    path = Path(path_or_name).expanduser()
    if path.exists():
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"{path} holds no config.json: give a Hugging Face checkpoint directory "
                                    f"(config.json + one of {', '.join(WEIGHT_FILES)})")
        return path
    name = str(path_or_name)
    if not _HUB_ID.fullmatch(name):
        raise FileNotFoundError(f"{name} does not exist: give a local Hugging Face checkpoint directory "
                                "(config.json + model.safetensors) or a Hub name such as gpt2")
    offline = (f"{name!r} is no local directory and could not be fetched from the Hugging Face Hub ({{}}); offline, "
               "download it elsewhere (huggingface-cli download gpt2) and pass the local directory")
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise FileNotFoundError(offline.format("huggingface_hub is not installed")) from None
    try:
        hf_dir = Path(snapshot_download(repo_id=name, allow_patterns=HUB_FILES))
        if not any((hf_dir / f).exists() for f in WEIGHT_FILES):  # a repository without safetensors
            hf_dir = Path(snapshot_download(repo_id=name, allow_patterns=["pytorch_model.bin"]))
    except Exception as e:  # offline, unknown repository, HTTP errors: huggingface_hub raises many types
        raise FileNotFoundError(offline.format(f"{type(e).__name__}: {str(e)[:200]}")) from None
    return hf_dir


def load_hf(path_or_name: str | Path) -> tuple[ModelConfig, dict]:
    """(ModelConfig, Flax params) of an HF GPT-2 checkpoint directory or Hub name."""
    hf_dir = resolve(path_or_name)
    try:
        hf = json.loads((hf_dir / "config.json").read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{hf_dir / 'config.json'} is not valid JSON ({e}); download it again") from None
    cfg = model_config(hf, str(hf_dir / "config.json"))
    return cfg, to_flax(cfg, read_tensors(hf_dir), str(hf_dir))


# --------------------------------------------------------------------------------------------------------------------
# The tokenizer: GPT-2's byte-level BPE from the checkpoint's own vocab.json + merges.txt
# --------------------------------------------------------------------------------------------------------------------
def hf_bpe_ranks(vocab: dict[str, int], merges: list[str], where: str) -> dict[bytes, int]:
    """tiktoken ranks of an HF byte-level BPE (GPT-2's vocab.json + merges.txt, Radford et al. 2019 Sec. 2.2).

    tiktoken merges the adjacent pair whose concatenation has the lowest rank, which reproduces the BPE only if token
    ids follow the merge order: checked here as tiktoken's own loader (`data_gym_to_mergeable_bpe_ranks`) checks it."""
    to_byte = {c: b for b, c in bytes_to_unicode().items()}
    try:
        ranks = {bytes(to_byte[c] for c in token): i for token, i in vocab.items() if token != ENDOFTEXT}
        merged = [bytes(to_byte[c] for c in "".join(m.split(" "))) for m in merges]
    except KeyError as e:
        raise ValueError(f"{where}: token character {e} is not in GPT-2's byte alphabet: not a byte-level BPE") from None
    if sorted(ranks.values()) != list(range(len(ranks))) or any(bytes([b]) not in ranks for b in range(256)):
        raise ValueError(f"{where}: vocab.json's ids are not 0..{len(ranks) - 1} over the 256 bytes and the merges")
    for j, token in enumerate(merged):
        if ranks.get(token) != 256 + j:
            raise ValueError(f"{where}: merge {j} ({merges[j]!r}) has id {ranks.get(token)}, not {256 + j}: vocab.json "
                             "and merges.txt disagree")
    if vocab.get(ENDOFTEXT) != len(ranks):
        raise ValueError(f"{where}: {ENDOFTEXT} has id {vocab.get(ENDOFTEXT)}, expected {len(ranks)} (after every BPE "
                         "token, as in GPT-2)")
    return ranks


def tokenizer_config(hf_dir: Path, folder: Path) -> TokenizerConfig:
    """The run's TokenizerConfig: the checkpoint's vocab.json + merges.txt as a tiktoken ranks file in `folder` (so the
    run needs no network), else tiktoken's named "gpt2" encoding (which tiktoken downloads once)."""
    vocab_path, merges_path = hf_dir / "vocab.json", hf_dir / "merges.txt"
    if not (vocab_path.exists() and merges_path.exists()):
        return TokenizerConfig(kind="tiktoken", name="gpt2")
    lines = merges_path.read_text(encoding="utf-8").splitlines()
    merges = [m for m in lines if m and not m.startswith("#version")]
    ranks = hf_bpe_ranks(json.loads(vocab_path.read_text(encoding="utf-8")), merges, str(hf_dir))
    # Named gpt2 like tiktoken's encoding; its identity still differs from tiktoken's "gpt2" (same ranks, but the
    # identity also hashes the split pattern, which tiktoken spells with possessive quantifiers).
    path = Path(folder) / "gpt2.tiktoken"
    path.parent.mkdir(parents=True, exist_ok=True)
    write_ranks(ranks, path)
    return TokenizerConfig(kind="tiktoken", name=str(path.absolute()))


# --------------------------------------------------------------------------------------------------------------------
# A run directory of an imported model
# --------------------------------------------------------------------------------------------------------------------
def run_config(model: ModelConfig, tokenizer: TokenizerConfig, name: str, data: Optional[DataConfig] = None,
               batch_size: int = 8, eval_tokens: Optional[int] = None) -> Config:
    """The Config of an imported model: `data` (default: the embedded corpus) tokenized with the model's tokenizer.
    train.steps=1 only satisfies the one-budget rule (load_run builds the optimizer state's tree from it); the model
    is not trained here."""
    data = dataclasses.replace(data or DataConfig(), tokenizer=tokenizer)
    train = TrainConfig(steps=1, batch_size=batch_size, eval_tokens=eval_tokens or TrainConfig.eval_tokens)
    return Config(name=name, model=model, data=data, train=train)


def data_config_of(run_dir: Path) -> DataConfig:
    """The data config of a run directory: an import evaluates on the same validation documents as that run."""
    from omegaconf import OmegaConf

    path = Path(run_dir) / CONFIG_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: --data-from takes a run directory (one with config.json)")
    saved = json.loads(path.read_text()).get("data") or {}
    return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(DataConfig), saved))


def validation_loss(cfg: ModelConfig, params: dict, data: TokenData, n_tokens: int, batch_size: int, seq_len: int) -> float:
    """Mean next-token loss (nats) over `val_batches`, averaged per batch as the trainer's evaluation does."""
    step = jax.jit(lambda p, b: loss_fn(p, cfg, b))
    return float(np.mean([float(step(params, b)) for b in data.val_batches(n_tokens, batch_size, seq_len)]))


def import_run(src: str | Path, out_dir: str | Path, *, name: Optional[str] = None, tokens: float = 0.0,
               data: Optional[DataConfig] = None, eval_tokens: Optional[int] = None,
               eval_seq_len: Optional[int] = None, batch_size: int = 8) -> dict:
    """Writes OUT_RUN_DIR as `scaling.train.loop` would have: config.json, checkpoints/0 (params + the optimizer's
    initial state, the tree `scaling.eval.sample.load_run` restores) and record.json (status completed, loss on the
    validation split of `data`, default the embedded corpus). D = `tokens` (published training tokens, 0: unknown)."""
    out = Path(out_dir)
    if (out / CONFIG_FILE).exists() or (out / "checkpoints").exists():
        raise FileExistsError(f"{out} already holds a run: choose a new output directory, or delete it first")
    if not tokens >= 0:
        raise ValueError(f"tokens={tokens!r} is invalid: give the published training tokens, or 0 when unknown")
    hf_dir = resolve(src)
    model, params = load_hf(hf_dir)
    L = eval_seq_len or model.seq_len
    if not 0 < L <= model.seq_len:
        raise ValueError(f"eval_seq_len={L} is invalid: use 1..{model.seq_len} (the model's n_positions)")
    cfg = run_config(model, tokenizer_config(hf_dir, out / "tokenizer"), name or _default_name(src), data,
                     batch_size, eval_tokens)
    data = load_tokens(cfg.data)
    data.check_model_vocab(model.vocab_size)
    loss = validation_loss(model, params, data, cfg.train.eval_tokens, batch_size, L)
    # bits per byte: the loss that compares with a sweep's runs whatever their tokenizer (scaling.record.text_metrics)
    per_token = data.val_text_per_token(cfg.train.eval_tokens, batch_size, L) or (None, None)

    write_json_atomic(out / CONFIG_FILE, to_dict(cfg))
    optimizer = cfg.optim.build(resolve_budget(cfg.model, cfg.train).steps, cfg.model)
    params = jax.tree.map(jnp.asarray, params)
    checkpointer = Checkpointer(out / "checkpoints", cfg.train.checkpoint)
    checkpointer.save(0, {"params": params, "opt_state": optimizer.init(params)}, {"tokens": 0}, force=True)
    checkpointer.close()

    counts, fpt = count_params(model), {c: flops_per_token(model, c) for c in FLOP_CONVENTIONS}
    return write_record(out, {
        "name": cfg.name, "status": "completed", "error": None, "diverged_step": None,
        "N": counts.non_embedding, "N_total": counts.total, "N_embedding": counts.embedding, "N_head": counts.head,
        "tied_embeddings": counts.tied, "steps": 0, "tokens_per_step": 0, "D": tokens,
        **{f"C_{c}": fpt[c] * tokens for c in FLOP_CONVENTIONS}, "C": fpt["chinchilla"] * tokens,
        "C_convention": "chinchilla", "flops_per_token": fpt,
        "budget": {"kind": "tokens", "value": tokens, "convention": None},
        "batch_size": batch_size, "seq_len": model.seq_len, "loss": loss, "train_loss": None,
        **text_metrics(loss, *per_token),
        "loss_eval": {"tokens": cfg.train.eval_tokens, "seq_len": L, "batch_size": batch_size},
        "model": dataclasses.asdict(model), "optim": dataclasses.asdict(cfg.optim), "seed": 0,
        "tokenizer": data.tokenizer_record(), "data": data.data_record(), "epochs": None,
        "imported": {"format": "huggingface-gpt2", "source": str(src), "hf_dir": str(hf_dir.absolute()),
                     "D_published": tokens > 0},
        "device_kind": jax.devices()[0].device_kind, "versions": package_versions(), "git_commit": git_commit(),
    })


def load_any(path_or_name: str | Path) -> tuple[Config, dict]:
    """(Config, params) of a run directory (its newest checkpoint), a local HF GPT-2 directory or a Hub name. An HF
    model gets the Config `import_run` would write (its tokenizer converted into the token cache's folder)."""
    path = Path(path_or_name).expanduser()
    if (path / "checkpoints").is_dir():
        from scaling.eval.sample import load_run

        return load_run(path)
    hf_dir = resolve(path_or_name)
    model, params = load_hf(hf_dir)
    key = hashlib.sha256(str(hf_dir.absolute()).encode()).hexdigest()[:16]
    folder = DataConfig().resolved_cache_dir() / "tokenizers" / f"hf-{key}"
    return run_config(model, tokenizer_config(hf_dir, folder), _default_name(path_or_name)), params


def _default_name(path_or_name: str | Path) -> str:
    return Path(str(path_or_name)).expanduser().name  # "gpt2", "openai-community/gpt2" or a directory: its last part


def main(argv: Optional[list[str]] = None) -> None:
    p = argparse.ArgumentParser(prog="python -m scaling.model.hf_gpt2", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("src", help="HF checkpoint directory (config.json + model.safetensors), or a Hub name: gpt2, "
                               "gpt2-medium, gpt2-large, gpt2-xl (downloaded once; needs huggingface_hub and network)")
    p.add_argument("out", type=Path, help="the run directory to write (must not hold a run)")
    p.add_argument("--name", default=None, help="the run's name (default: the checkpoint directory's name)")
    p.add_argument("--tokens", type=float, default=0.0, help="training tokens D for the record (0: unknown)")
    p.add_argument("--eval-tokens", type=int, default=None, help="validation tokens for the loss (default: "
                                                                 "train.eval_tokens)")
    p.add_argument("--eval-seq-len", type=int, default=None, help="context of the validation loss (default: "
                                                                  "n_positions); a sweep's seq_len compares like with like")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--data-from", type=Path, default=None, help="a run directory whose data config (source, split, "
                                                                "cache) to evaluate on (default: the embedded corpus)")
    a = p.parse_args(argv)
    try:
        rec = import_run(a.src, a.out, name=a.name, tokens=a.tokens, eval_tokens=a.eval_tokens,
                         eval_seq_len=a.eval_seq_len, batch_size=a.batch_size,
                         data=data_config_of(a.data_from) if a.data_from else None)
    except (ValueError, FileNotFoundError, FileExistsError) as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    bpb = f" ({rec['bpb']:.4f} bits/byte)" if rec.get("bpb") else ""
    print(f"{a.out}: {rec['name']} N={rec['N']:,} (N_total {rec['N_total']:,}), validation loss {rec['loss']:.4f} "
          f"nats/token{bpb} over {rec['loss_eval']['tokens']:,} tokens at seq_len {rec['loss_eval']['seq_len']}\n"
          f"sample: python -m scaling.eval.sample {a.out} --prompt \"...\"")


if __name__ == "__main__":
    main()
