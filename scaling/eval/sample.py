"""Generation from a trained run: `python -m scaling.eval.sample RUN_DIR --prompt "..." [--prompt-file FEWSHOT.txt]`.

Decoding uses the model's KV cache: the prompt is prefilled in one call, then each new token costs one position,
not a recompute of the whole prefix. Sampling: temperature (0 = greedy) and top-k (Fan et al. 2018).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, Optional

import jax
import jax.numpy as jnp
from omegaconf import OmegaConf

from scaling.train.checkpoint import Checkpointer
from scaling.config import Config
from scaling.model.decoder import ModelConfig
from scaling.record import CONFIG_FILE, read_record


def load_run(run_dir: Path) -> tuple[Config, dict]:
    """The run's config and its newest intact parameters."""
    cfg, params, _ = load_run_checkpoint(run_dir)
    return cfg, params


def load_run_checkpoint(run_dir: Path) -> tuple[Config, dict, int]:
    """The run's config, its newest intact parameters and the step they are from (a corrupt newer checkpoint is
    set aside by the Checkpointer, so this can be older than the run's last step). A member of a vmapped group
    (K > 1) is read from its group's checkpoint: the group saves in one directory of its own."""
    from scaling.train.loop import initial_state_fn  # the trainer's own template, whatever K

    run_dir = Path(run_dir)
    cfg = _read_config(run_dir)
    group = None if (run_dir / "checkpoints").exists() else _group_of(run_dir)
    if group is None:
        cfgs, checkpoints, index = [cfg], run_dir / "checkpoints", None
    else:
        group_dir, members = group
        cfgs = [_read_config(group_dir.parent / m) for m in members]
        checkpoints, index = group_dir / "checkpoints", members.index(run_dir.name)
    # Shapes only (eval_shape): running the init would allocate and compute a second model (GPT-2 XL: 18 GB) for nothing.
    restored = Checkpointer(checkpoints, cfg.train.checkpoint).restore_latest(jax.eval_shape(initial_state_fn(cfgs)))
    if restored is None:
        raise FileNotFoundError(f"{run_dir}/checkpoints holds no checkpoint: the run saved none yet.")
    params = restored[1]["params"]
    if index is not None:
        params = jax.tree_util.tree_map(lambda x_K: x_K[index], params)
    return cfg, params, int(restored[0])


def _read_config(run_dir: Path) -> Config:
    config_path = run_dir / CONFIG_FILE
    if not config_path.exists():
        raise FileNotFoundError(f"{config_path} not found: {run_dir} is not a run directory (run scaling.train.loop first).")
    saved = json.loads(config_path.read_text())
    return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(Config), saved))


def _group_of(run_dir: Path) -> Optional[tuple[Path, list[str]]]:
    """(group dir, its members) of the newest vmapped group this run trained in (scaling.train.stack: the group
    directory `.group-<hash>` beside its members, with members.json), or None. A relaunch with another member set
    trains in another group directory, so the newest one holds the run's last steps."""
    groups = [(f.parent, json.loads(f.read_text())["members"]) for f in run_dir.parent.glob(".group-*/members.json")]
    groups = [(d, m) for d, m in groups if run_dir.name in m and (d / "checkpoints").exists()]
    return max(groups, key=lambda g: (g[0] / "checkpoints").stat().st_mtime, default=None)


def check_run_tokenizer(record: dict, tokenizer: Any) -> None:
    """The tokenizer rebuilt from a run's data config must be the one it trained with (its record says which)."""
    trained_with = (record.get("tokenizer") or {}).get("identity")
    if trained_with and trained_with != tokenizer.identity:
        raise ValueError(f"tokenizer mismatch: the run was trained with {trained_with} but {tokenizer.identity} was "
                         "rebuilt from its data config; the token cache or corpus changed since training.")


def _pick(logits_BxV: jnp.ndarray, rng: jax.Array, temperature: float, top_k: Optional[int]) -> jnp.ndarray:
    if temperature == 0.0:
        return jnp.argmax(logits_BxV, axis=-1)
    logits_BxV = logits_BxV / temperature
    if top_k:
        kth_Bx1 = jax.lax.top_k(logits_BxV, top_k)[0][:, -1:]
        logits_BxV = jnp.where(logits_BxV < kth_Bx1, -jnp.inf, logits_BxV)
    return jax.random.categorical(rng, logits_BxV, axis=-1)


def generate(
    cfg: ModelConfig,
    params: dict,
    prompt: list[int],
    max_new_tokens: int,
    temperature: float = 1.0,
    top_k: Optional[int] = None,
    seed: int = 0,
    use_cache: bool = True,
) -> list[int]:
    """Continues `prompt` by `max_new_tokens` tokens; `use_cache=False` recomputes the prefix (the reference)."""
    if temperature < 0:
        raise ValueError(f"temperature={temperature} is invalid: use 0 (greedy) or a positive value.")
    if top_k is not None and top_k < 1:
        raise ValueError(f"top_k={top_k} is invalid: use a positive k, or omit it to sample from every token.")
    if top_k is not None and top_k >= cfg.vocab_size:
        top_k = None  # keeping k >= V tokens truncates nothing
    if not prompt:
        raise ValueError("the prompt is empty: give at least one token (text, or a few-shot file).")
    if max_new_tokens >= cfg.seq_len:
        raise ValueError(f"max_new_tokens={max_new_tokens} must be below the model's seq_len={cfg.seq_len}.")
    room = cfg.seq_len - max_new_tokens  # the model attends over at most seq_len positions
    if len(prompt) > room:
        raise ValueError(f"the prompt is {len(prompt)} tokens, but the model's context (seq_len={cfg.seq_len}) holds "
                         f"at most {room} prompt tokens with max_new_tokens={max_new_tokens}: shorten the prompt, "
                         f"lower --max-new-tokens, or pass --truncate-prompt to keep its last {room} tokens.")
    model = cfg.build()
    rng = jax.random.key(seed)
    out = list(prompt)
    if not use_cache:
        forward = jax.jit(lambda p, t: model.apply({"params": p}, t)[:, -1])
        for i in range(max_new_tokens):
            logits_1xV = forward(params, jnp.asarray([out]))
            out.append(int(_pick(logits_1xV, jax.random.fold_in(rng, i), temperature, top_k)[0]))
        return out[len(prompt) :]

    cache = model.init(jax.random.key(0), jnp.zeros((1, cfg.seq_len), jnp.int32), decode=True)["cache"]

    @jax.jit
    def step(params, cache, tokens_1xL, positions_L):
        logits_1xLxV, mutated = model.apply(
            {"params": params, "cache": cache}, tokens_1xL, positions_L, decode=True, mutable=["cache"]
        )
        return logits_1xLxV[:, -1], mutated["cache"]

    logits_1xV, cache = step(params, cache, jnp.asarray([prompt]), jnp.arange(len(prompt)))
    for i in range(max_new_tokens):
        token = int(_pick(logits_1xV, jax.random.fold_in(rng, i), temperature, top_k)[0])
        out.append(token)
        if i + 1 < max_new_tokens:
            position = len(out) - 1
            logits_1xV, cache = step(params, cache, jnp.asarray([[token]]), jnp.asarray([position]))
    return out[len(prompt) :]


def main(argv: Optional[list[str]] = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m scaling.eval.sample", description=__doc__)
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--prompt", default="", help="text to continue (appended after --prompt-file)")
    parser.add_argument("--prompt-file", type=Path, help="a few-shot prompt: examples, then the query")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--temperature", type=float, default=0.8)
    parser.add_argument("--top-k", type=int, default=40)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--num-samples", type=int, default=1)
    parser.add_argument("--truncate-prompt", action="store_true",
                        help="keep only the prompt's last tokens that fit the context (said on stderr) instead of "
                             "refusing a prompt longer than seq_len - max_new_tokens")
    args = parser.parse_args(argv)
    try:
        from scaling.data.tokens import load_tokens

        cfg, params, step = load_run_checkpoint(args.run_dir)
        try:
            record = read_record(args.run_dir)
        except FileNotFoundError:
            record = {}  # an unfinished run writes its record at the end; the tokenizer check then has nothing to read
        if record.get("status") == "completed" and step != record.get("steps"):
            print(f"note: sampling from checkpoint step {step}, not the completed run's final step {record['steps']} "
                  "(a newer checkpoint is unreadable and was set aside as <step>.corrupt)", file=sys.stderr)
        tokenizer = load_tokens(cfg.data).tokenizer
        check_run_tokenizer(record, tokenizer)
        text = (args.prompt_file.read_text(encoding="utf-8") if args.prompt_file else "") + args.prompt
        prompt = tokenizer.encode(text) if text else [tokenizer.eot]
        room = cfg.model.seq_len - args.max_new_tokens
        if args.truncate_prompt and 0 < room < len(prompt):
            print(f"note: --truncate-prompt: the prompt is {len(prompt)} tokens; kept its last {room} (seq_len "
                  f"{cfg.model.seq_len} - max_new_tokens {args.max_new_tokens})", file=sys.stderr)
            prompt = prompt[-room:]
            text = tokenizer.decode(prompt)  # what the model saw
        for n in range(args.num_samples):
            ids = generate(cfg.model, params, prompt, args.max_new_tokens, args.temperature, args.top_k, args.seed + n)
            print(f"--- sample {n} ---\n{text}{tokenizer.decode(ids)}")
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
