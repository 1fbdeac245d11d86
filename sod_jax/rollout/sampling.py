"""Per-slot token sampling: greedy, temperature, top-k, top-p, with a PRNG key per request.

Every slot carries its own settings, so one decode call serves requests with different sampling
options. Keys are derived from the request only (its seed, its sample index within the request and
the number of tokens it has generated), never from the slot or the batch, so the same seed gives the
same tokens whatever else is being decoded.

The log-prob returned with each token is under the *raw* policy (temperature 1, no truncation): the
quantity the trainer recomputes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import jax
import jax.numpy as jnp

NEG_INF = -1e30


@dataclass(frozen=True)
class SamplingParams:
    """How one request samples. ``greedy`` overrides the rest."""

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1  # -1: off
    greedy: bool = False

    def __post_init__(self):
        if self.temperature <= 0 and not self.greedy:
            raise ValueError(f"temperature must be > 0 (got {self.temperature}); use greedy=True for argmax")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k == 0 or self.top_k < -1:
            raise ValueError(f"top_k must be -1 (off) or >= 1, got {self.top_k}")

    @property
    def filters(self) -> bool:
        return not self.greedy and (self.top_p < 1.0 or self.top_k > 0)

    @classmethod
    def from_options(cls, **options) -> "SamplingParams":
        """Build from keyword options, rejecting unknown ones with the list of valid names."""
        valid = set(cls.__dataclass_fields__)
        unknown = sorted(set(options) - valid)
        if unknown:
            raise ValueError(f"unknown sampling option(s) {unknown}; valid options: {sorted(valid)}")
        return cls(**options)


def request_key(seed: int, sample_index: int = 0) -> jax.Array:
    """Base key of sample ``sample_index`` of a request with ``seed`` (raw uint32[2])."""
    return jax.random.fold_in(jax.random.PRNGKey(seed), sample_index)


def filter_logits(logits: jax.Array, top_k: jax.Array, top_p: jax.Array) -> jax.Array:
    """Mask (to NEG_INF) tokens outside top-k, then outside the top-p nucleus of what is left.

    ``logits [S, V]`` already temperature-scaled; ``top_k [S]`` (<= 0: off), ``top_p [S]``.
    A token is kept by top-p when the probability mass ranked strictly above it is < p (so the most
    likely token is always kept), the same rule as HF's TopPLogitsWarper.
    """
    V = logits.shape[-1]
    sorted_desc = -jnp.sort(-logits, axis=-1)  # [S, V]
    k = jnp.where(top_k > 0, jnp.minimum(top_k, V), V)
    kth = jnp.take_along_axis(sorted_desc, (k - 1)[:, None], axis=-1)  # [S, 1]
    logits = jnp.where(logits < kth, NEG_INF, logits)
    sorted_desc = jnp.where(jnp.arange(V)[None, :] < k[:, None], sorted_desc, NEG_INF)
    probs = jax.nn.softmax(sorted_desc, axis=-1)
    mass_above = jnp.cumsum(probs, axis=-1) - probs
    keep = mass_above < top_p[:, None]
    # smallest kept logit = cutoff; ties with it are kept too
    cutoff = jnp.min(jnp.where(keep, sorted_desc, jnp.inf), axis=-1, keepdims=True)
    return jnp.where(logits < cutoff, NEG_INF, logits)


def sample(
    logits: jax.Array,  # [S, V] float32
    keys: jax.Array,  # [S, 2] uint32, one per slot for this token
    temperature: jax.Array,  # [S]
    top_k: jax.Array,  # [S] int
    top_p: jax.Array,  # [S]
    greedy: jax.Array,  # [S] bool
    use_filters: bool = True,  # static: False skips the sort when no slot uses top-k/top-p
) -> tuple[jax.Array, jax.Array]:
    """Next token ``[S]`` int32 and its raw-policy log-prob ``[S]`` float32."""
    logits = logits.astype(jnp.float32)
    raw_logp = jax.nn.log_softmax(logits, axis=-1)
    scaled = logits / jnp.maximum(temperature, 1e-6)[:, None]
    if use_filters:
        scaled = filter_logits(scaled, top_k, top_p)
    drawn = jax.vmap(jax.random.categorical)(keys, scaled)
    token = jnp.where(greedy, jnp.argmax(logits, axis=-1), drawn).astype(jnp.int32)
    return token, jnp.take_along_axis(raw_logp, token[:, None], axis=-1)[:, 0]


def token_keys(base_keys: jax.Array, counters: jax.Array) -> jax.Array:
    """Per-slot key for the token each slot is about to generate: ``fold_in(base, counter)``."""
    return jax.vmap(jax.random.fold_in)(base_keys, counters)


def any_filters(params: list[Optional[SamplingParams]]) -> bool:
    return any(p is not None and p.filters for p in params)
