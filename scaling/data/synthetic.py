"""A synthetic source with a known entropy rate: a random order-k Markov chain over V symbols.

Its exact irreducible loss (nats/token) is a ground truth for the fitted E of a scaling law and makes fast tests.
Rows of the transition table are Dirichlet(concentration) draws: small concentration -> peaked rows -> low entropy.
"""
from __future__ import annotations

import bisect
import hashlib
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np

from scaling.data.tokenizers import Tokenizer


@dataclass
class SyntheticConfig:
    vocab_size: int = 64  # V symbols (token ids 0..V-1; id V is an end-of-text that never occurs)
    order: int = 1  # k: each token depends on the k previous ones
    concentration: float = 0.2  # Dirichlet parameter of each transition row
    n_tokens: int = 2_000_000  # training tokens (the validation stream is an independent chain)
    seed: int = 0

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        if not 2 <= self.vocab_size <= 65_535:
            raise ValueError(f"synthetic.vocab_size={self.vocab_size} must be in 2..65535, e.g. 64")
        if not 1 <= self.order <= 4:
            raise ValueError(f"synthetic.order={self.order} must be in 1..4, e.g. 1")
        if self.vocab_size ** (self.order + 1) > 4_000_000:
            raise ValueError(f"synthetic.vocab_size**(order+1)={self.vocab_size ** (self.order + 1)} transition "
                             "probabilities is too many (> 4e6); lower synthetic.vocab_size or synthetic.order")
        if not self.concentration > 0:
            raise ValueError(f"synthetic.concentration={self.concentration} must be > 0, e.g. 0.2")
        if self.n_tokens < 1024:
            raise ValueError(f"synthetic.n_tokens={self.n_tokens} must be >= 1024")


def _entropy(p: np.ndarray) -> float:
    p = p[p > 0]
    return float(-(p * np.log(p)).sum())


class MarkovChain:
    """Transition table P_SxV (S = V**k states, state = last k tokens, most significant first) and its stationary
    distribution pi_S."""

    def __init__(self, cfg: SyntheticConfig) -> None:
        self.V, self.k = cfg.vocab_size, cfg.order
        self.S = self.V ** self.k
        rng = np.random.default_rng([cfg.seed, 0])
        P_SxV = rng.dirichlet(np.full(self.V, cfg.concentration), size=self.S)
        P_SxV = np.maximum(P_SxV, 1e-300)  # tiny concentrations underflow to 0; keep the chain ergodic
        self.P_SxV = P_SxV / P_SxV.sum(axis=1, keepdims=True)
        self.pi_S = self._stationary()

    def _step(self, pi_S: np.ndarray) -> np.ndarray:
        flow_SxV = pi_S[:, None] * self.P_SxV
        # state (x1..xk) emits y and becomes (x2..xk, y): sum out x1
        return flow_SxV.reshape(self.V, self.S // self.V * self.V).sum(axis=0)

    def _stationary(self) -> np.ndarray:
        pi_S = np.full(self.S, 1.0 / self.S)
        for _ in range(100_000):
            new_S = 0.5 * (pi_S + self._step(pi_S))  # lazy chain: same fixed point, immune to periodicity
            if np.abs(new_S - pi_S).sum() < 1e-14:
                return new_S / new_S.sum()
            pi_S = new_S
        raise RuntimeError("stationary distribution did not converge; raise synthetic.concentration")

    @property
    def entropy_rate(self) -> float:
        """H = -sum_s pi(s) sum_y P(y|s) log P(y|s) (Cover & Thomas 2006, Thm 4.2.4): nats/token."""
        logP_SxV = np.log(self.P_SxV)
        return float(-(self.pi_S[:, None] * self.P_SxV * logP_SxV).sum())

    def block_entropy(self, m: int) -> float:
        """Entropy of m consecutive stationary tokens, m <= k."""
        return _entropy(self.pi_S.reshape(self.V ** (self.k - m), self.V ** m).sum(axis=0))

    def conditional_entropy(self, j: int) -> float:
        """H(X_t | j previous tokens): block(j+1) - block(j) below the order, the entropy rate from it on."""
        if j >= self.k:
            return self.entropy_rate
        return self.block_entropy(j + 1) - self.block_entropy(j)

    def loss_floor(self, seq_len: int) -> float:
        """Exact minimum mean loss over a window of seq_len targets, target j seeing j earlier tokens (j = 1..L).
        Equals entropy_rate for order 1."""
        partial = [self.conditional_entropy(j) for j in range(1, min(self.k, seq_len + 1))]
        return (sum(partial) + (seq_len - len(partial)) * self.entropy_rate) / seq_len

    def sample(self, n: int, seed: Iterable[int]) -> np.ndarray:
        """n tokens of the stationary chain (the first k are a draw from pi). A plain loop: a Markov chain is
        sequential and splicing parallel chains would break the exact entropy rate at the joins."""
        rng = np.random.default_rng(list(seed))
        state = int(rng.choice(self.S, p=self.pi_S))
        first = [(state // self.V ** (self.k - 1 - i)) % self.V for i in range(self.k)]
        cdf = np.cumsum(self.P_SxV, axis=1)[:, :-1].tolist()  # bisect on lists beats numpy calls per token
        u = rng.random(n - self.k).tolist()
        out = first + [0] * (n - self.k)
        V, S = self.V, self.S
        for t, ut in enumerate(u, start=self.k):
            y = bisect.bisect_right(cdf[state], ut)
            out[t] = y
            state = (state * V + y) % S
        return np.asarray(out, dtype=np.uint16 if V < 65_535 else np.uint32)

    @property
    def digest(self) -> str:
        return hashlib.sha256(self.P_SxV.tobytes()).hexdigest()


class SyntheticTokenizer(Tokenizer):
    """Token ids are the chain's symbols; there is no text. eot = V exists (so n_vocab = V + 1) but never occurs,
    which leaves the optimal loss exactly the entropy rate."""

    def __init__(self, chain: MarkovChain) -> None:  # noqa: super().__init__ needs a tiktoken encoding
        self.encoding = None
        self.name = f"synthetic{chain.V}"
        self.kind = "synthetic"
        self.eot = chain.V
        self.n_vocab = chain.V + 1
        self.identity = f"{self.name}-{chain.digest[:12]}"

    def encode(self, text: str) -> list[int]:
        raise ValueError("the synthetic source has no text to encode; its tokens are generated ids")

    def encode_batch(self, texts):  # type: ignore[override]
        raise ValueError("the synthetic source has no text to encode; its tokens are generated ids")

    def decode(self, ids: Iterable[int]) -> str:
        return " ".join(str(int(i)) for i in ids)
