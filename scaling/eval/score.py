"""Scoring a task on a model: multiple choice by log-likelihood, exact match by greedy decoding.

Multiple choice (Brown et al. 2020, sec. 2.4; lm-eval-harness): each choice c is scored by
  log p(c | context) = sum_i log softmax(logits)[c_i]     over the choice's tokens,
`accuracy` picks the highest sum, `accuracy_norm` the highest sum per character of the choice (lm-eval-harness's
acc_norm), and `logprob` is the mean log-likelihood (nats) of the right answer: the continuous metric beside accuracy
(Schaeffer et al. 2023, "Are Emergent Abilities of Large Language Models a Mirage?").
Exact match: greedy decoding produces the target's tokens iff each is the argmax given the ones before it, so one
teacher-forced pass decides it (lm-eval-harness's `is_greedy`, how LAMBADA is scored); `generate_exact` decodes with
the KV cache instead (tests/test_eval.py checks they agree).

Rows (context + continuation tokens) are truncated from the LEFT to the model's seq_len, right-padded to a power-of-two
length and batched to a fixed size, so the jitted scorer compiles once per length bucket.
Letters: B batch, P padded row length (= model input length + 1), L = P - 1, V vocabulary.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np

from scaling.eval.tasks import Example, Task
from scaling.model.decoder import ModelConfig

LOGIT_BUDGET = 1 << 24  # float32 logits per batch (64 MiB): B = LOGIT_BUDGET / (L x V), at most MAX_BATCH
MAX_BATCH = 64
MIN_BUCKET = 16


@dataclass(frozen=True)
class Row:
    tokens: np.ndarray  # context (left-truncated) + continuation, at most seq_len + 1 tokens
    n_cont: int  # the continuation's tokens: the last n_cont of `tokens`


def encode_rows(task: Task, tokenizer: Any, seq_len: int) -> list[list[Row]]:
    """Per example, one row per continuation; errors name the example and the fix."""
    check_tokenizer(task, tokenizer)
    return [_example_rows(task, i, ex, tokenizer, seq_len) for i, ex in enumerate(task.examples)]


def check_tokenizer(task: Task, tokenizer: Any) -> None:
    if task.tokenizer is not None and task.tokenizer != tokenizer.identity:
        raise ValueError(f"tokenizer mismatch: task {task.name} was built from held-out documents tokenized by "
                         f"{task.tokenizer}, but the model reads {tokenizer.identity}; build the task from the run's "
                         "own data (scaling.evaluate does)")
    if getattr(tokenizer, "kind", None) == "synthetic":
        raise ValueError(f"task {task.name} is text, but the run's tokenizer {tokenizer.identity} is the synthetic "
                         "source's, which has no text: evaluate runs trained on text")


def _example_rows(task: Task, i: int, ex: Example, tokenizer: Any, seq_len: int) -> list[Row]:
    prompt = tokenizer.encode(ex.prompt()) or [tokenizer.eot]  # an empty context is conditioned on end-of-text
    rows = []
    for cont in ex.continuations:
        c = tokenizer.encode(cont)
        if not c:
            raise ValueError(f"task {task.name} example {i}: the continuation {cont!r} encodes to no token")
        if len(c) > seq_len:
            raise ValueError(f"task {task.name} example {i}: the answer {cont[:40]!r} is {len(c)} tokens, more than the "
                             f"model's context (seq_len={seq_len}) holds, so it cannot be scored: use a model with a "
                             "longer seq_len, or leave this task out")
        if ex.shots and len(prompt) + len(c) - 1 > seq_len:
            fits = [j for j in range(len(ex.shots)) if len(tokenizer.encode(ex.prompt(j))) + len(c) - 1 <= seq_len]
            raise ValueError(f"--shots {len(ex.shots)} does not fit task {task.name}: example {i} with its shots and "
                             f"answer is {len(prompt) + len(c)} tokens, more than the model's context (seq_len="
                             f"{seq_len}) + 1; use --shots {max(fits) if fits else 0} or fewer")
        rows.append(Row(np.asarray((prompt + c)[-(seq_len + 1):], np.int32), len(c)))
    return rows


@functools.lru_cache(maxsize=8)
def _scorer(cfg: ModelConfig):
    model = cfg.build()

    @jax.jit
    def score(params, tokens_BxP: jnp.ndarray, mask_BxL: jnp.ndarray):
        """Sum of log p over the masked target positions, and whether each was the argmax (greedy)."""
        logits_BxLxV = model.apply({"params": params}, tokens_BxP[:, :-1])
        targets_BxL = tokens_BxP[:, 1:]
        logp_BxL = jnp.take_along_axis(jax.nn.log_softmax(logits_BxLxV, -1), targets_BxL[..., None], -1)[..., 0]
        greedy_BxL = jnp.argmax(logits_BxLxV, -1) == targets_BxL
        return jnp.sum(logp_BxL * mask_BxL, -1), jnp.all(greedy_BxL | (mask_BxL == 0), -1)

    return score


def _bucket(length: int, seq_len: int) -> int:
    return min(seq_len + 1, max(MIN_BUCKET, 1 << (length - 1).bit_length()))


def score_rows(cfg: ModelConfig, params: Any, rows: list[Row]) -> tuple[np.ndarray, np.ndarray]:
    """(log p of each row's continuation, whether greedy decoding produces it), in the order of `rows`."""
    score = _scorer(cfg)
    logp, greedy = np.zeros(len(rows)), np.zeros(len(rows), bool)
    by_bucket: dict[int, list[int]] = {}
    for j, r in enumerate(rows):
        by_bucket.setdefault(_bucket(len(r.tokens), cfg.seq_len), []).append(j)
    for P, idx in sorted(by_bucket.items()):
        B = max(1, min(MAX_BATCH, LOGIT_BUDGET // ((P - 1) * cfg.vocab_size)))
        for s in range(0, len(idx), B):
            chunk = idx[s:s + B]
            tokens_BxP, mask_BxL = np.zeros((B, P), np.int32), np.zeros((B, P - 1), np.float32)
            for b, j in enumerate(chunk):
                t = rows[j].tokens
                tokens_BxP[b, :len(t)] = t
                mask_BxL[b, len(t) - 1 - rows[j].n_cont:len(t) - 1] = 1.0  # positions that predict the continuation
            lp_B, g_B = jax.device_get(score(params, tokens_BxP, mask_BxL))
            logp[chunk], greedy[chunk] = lp_B[:len(chunk)], g_B[:len(chunk)]
    return logp, greedy


def score_task(cfg: ModelConfig, params: Any, tokenizer: Any, task: Task) -> dict:
    """The record entry of one task: accuracy, accuracy_norm (mc), logprob, n, k, chance, kind."""
    return score_encoded(cfg, params, task, encode_rows(task, tokenizer, cfg.seq_len))


def score_encoded(cfg: ModelConfig, params: Any, task: Task, per_example: list[list[Row]]) -> dict:
    """`score_task` on rows already encoded (a training run encodes its tasks once, before its first step)."""
    flat = [r for rows in per_example for r in rows]
    logp, greedy = score_rows(cfg, params, flat)
    starts = np.cumsum([0] + [len(rows) for rows in per_example])
    right, right_norm, gold_logp = [], [], []
    for ex, a, b in zip(task.examples, starts[:-1], starts[1:]):
        lp = logp[a:b]
        if task.kind == "mc":
            right.append(int(np.argmax(lp)) == ex.gold)
            right_norm.append(int(np.argmax(lp / np.array([len(c) for c in ex.choices]))) == ex.gold)
            gold_logp.append(lp[ex.gold])
        else:
            right.append(bool(greedy[a]))
            gold_logp.append(lp[0])
    return {"accuracy": float(np.mean(right)),
            "accuracy_norm": float(np.mean(right_norm)) if task.kind == "mc" else None,
            "logprob": float(np.mean(gold_logp)), "n": len(task.examples), "k": task.k, "chance": task.chance,
            "kind": task.kind}


def generate_exact(cfg: ModelConfig, params: Any, tokenizer: Any, task: Task,
                   limit: Optional[int] = None) -> list[bool]:
    """Exact match by greedy decoding with the KV cache (scaling.eval.sample.generate), example by example: whether
    the decoded tokens are the target's. Slow (one decode per example); `score_task` decides the same in one pass."""
    from scaling.eval.sample import generate

    out = []
    for rows in encode_rows(task, tokenizer, cfg.seq_len)[:limit]:
        row = rows[0]
        # generate keeps room for every new token; the last target token is never fed back, hence at most one
        # context token less than the teacher-forced pass sees (equal whenever the row is shorter than seq_len)
        prompt = row.tokens[:-row.n_cont].tolist()[-(cfg.seq_len - row.n_cont):]
        out.append(generate(cfg, params, prompt, row.n_cont, temperature=0.0) == row.tokens[-row.n_cont:].tolist())
    return out
