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

import jax
import jax.numpy as jnp

from sod_jax.models.blocked_attention import MASKED_SCORE as NEG_INF  # the one masking constant


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


def request_key(seed, sample_index=0) -> jax.Array:
    """Base key of sample ``sample_index`` of a request with ``seed`` (raw uint32[2]); traceable."""
    return jax.random.fold_in(jax.random.PRNGKey(seed), sample_index)


def _bisect(lo: jax.Array, hi: jax.Array, keep_lo, iters: int):
    """Per-slot bisection: ``keep_lo(mid) [S] bool`` says whether ``mid`` may become the new ``lo``."""

    def body(_, c):
        lo, hi = c
        mid = 0.5 * (lo + hi)
        ok = keep_lo(mid)
        return jnp.where(ok, mid, lo), jnp.where(ok, hi, mid)

    return jax.lax.fori_loop(0, iters, body, (lo, hi))


def filter_logits(logits: jax.Array, top_k: jax.Array, top_p: jax.Array, iters: int = 32) -> jax.Array:
    """Mask (to NEG_INF) tokens outside top-k, then outside the top-p nucleus of what is left.

    ``logits [S, V]`` already temperature-scaled; ``top_k [S]`` (<= 0: off), ``top_p [S]``.
    A token is kept by top-p when the probability mass ranked strictly above it is < p (so the most
    likely token is always kept), the rule of HF's TopPLogitsWarper; ties at a cutoff are kept.

    Both cutoffs are found by bisection on the logit value (O(V) per iteration, no sort): exact
    unless two distinct logits are closer than (max - min) / 2**iters.
    """
    V = logits.shape[-1]
    lo0 = jnp.min(logits, axis=-1) - 1.0
    hi0 = jnp.max(logits, axis=-1) + 1.0

    def apply_top_k(logits):  # invariant count(l >= lo) >= k > count(l >= hi)
        k = jnp.where(top_k > 0, jnp.minimum(top_k, V), V)
        lo, _ = _bisect(lo0, hi0, lambda t: jnp.sum(logits >= t[:, None], axis=-1) >= k, iters)
        return jnp.where(logits >= lo[:, None], logits, NEG_INF)

    def apply_top_p(logits):  # invariant mass(l > lo) >= p > mass(l > hi)
        probs = jax.nn.softmax(logits, axis=-1)
        mass_above = lambda t: jnp.sum(jnp.where(logits > t[:, None], probs, 0.0), axis=-1)  # noqa: E731
        lo, hi = _bisect(lo0, hi0, lambda t: mass_above(t) >= top_p, iters)
        # tokens >= hi are kept; the (tied) boundary tokens in (lo, hi) are kept when the mass above
        # them, i.e. the mass at >= hi, is still < p.
        boundary_kept = jnp.sum(jnp.where(logits >= hi[:, None], probs, 0.0), axis=-1) < top_p
        keep = (logits >= hi[:, None]) | ((logits > lo[:, None]) & boundary_kept[:, None])
        keep |= (top_p >= 1.0)[:, None]  # p = 1 is off (fp32 mass sums fall short of 1)
        return jnp.where(keep, logits, NEG_INF)

    # Each filter runs only when some slot uses it (a runtime branch, not a recompile).
    logits = jax.lax.cond(jnp.any(top_k > 0), apply_top_k, lambda x: x, logits)
    return jax.lax.cond(jnp.any(top_p < 1.0), apply_top_p, lambda x: x, logits)


MODES = ("greedy", "sample", "filter")


def sample(
    logits: jax.Array,  # [S, V] float32
    keys: jax.Array,  # [S, 2] uint32, one per slot for this token
    temperature: jax.Array,  # [S]
    top_k: jax.Array,  # [S] int
    top_p: jax.Array,  # [S]
    greedy: jax.Array,  # [S] bool
    mode: str = "filter",  # static: "greedy" (every slot greedy), "sample" (no filters), "filter"
) -> tuple[jax.Array, jax.Array]:
    """Next token ``[S]`` int32 and its raw-policy log-prob ``[S]`` float32.

    Draws by inverse CDF with one uniform per slot (cheaper than Gumbel-max, which needs V random
    numbers per slot)."""
    logits = logits.astype(jnp.float32)
    raw_logp = jax.nn.log_softmax(logits, axis=-1)
    token = jnp.argmax(logits, axis=-1)
    if mode != "greedy":
        scaled = logits / jnp.maximum(temperature, 1e-6)[:, None]
        if mode == "filter":
            scaled = filter_logits(scaled, top_k, top_p)
        cdf = jnp.cumsum(jax.nn.softmax(scaled, axis=-1), axis=-1)  # [S, V]
        u = jax.vmap(jax.random.uniform)(keys) * cdf[:, -1]
        drawn = jnp.sum(cdf <= u[:, None], axis=-1)  # first index whose cdf exceeds u: a positive-mass token
        token = jnp.where(greedy, token, drawn)
    token = token.astype(jnp.int32)
    return token, jnp.take_along_axis(raw_logp, token[:, None], axis=-1)[:, 0]


def mode_of(params: "SamplingParams") -> str:
    return "greedy" if params.greedy else ("filter" if params.filters else "sample")


def widest_mode(modes) -> str:
    """The static mode that serves every slot in ``modes``."""
    return MODES[max((MODES.index(m) for m in modes), default=0)]


def token_keys(base_keys: jax.Array, counters: jax.Array) -> jax.Array:
    """Per-slot key for the token each slot is about to generate: ``fold_in(base, counter)``."""
    return jax.vmap(jax.random.fold_in)(base_keys, counters)
