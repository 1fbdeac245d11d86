"""Qwen3 dense decoder in Flax NNX.

Structure (per layer): RMSNorm -> GQA attention with per-head q/k RMSNorm and RoPE -> residual ->
RMSNorm -> SwiGLU MLP -> residual; then a final RMSNorm and a tied or untied lm head.

Layer weights are stored *stacked* with a leading ``layers`` axis, so the decoder can run as one
``lax.scan`` (compile time flat in depth) or as an unrolled loop over the same arrays; the
checkpoint layout does not depend on that choice. Every parameter carries ``logical_axes``
metadata; :mod:`sod_jax.parallel` maps those names to mesh axes.

The math lives in pure functions of plain arrays (``rms_norm``, ``apply_rope``, ``attention``,
``decoder_layer``) and ONE forward, :func:`forward`, that training, the teacher and the rollout
engine (prefill, decode, cache extension: a :class:`KVCache` plus a :class:`CacheWrite`) all run.
Each block runs under a ``jax.named_scope`` so profiles name it.
Shapes use B batch, T query length, S key length, D hidden, N query heads, K kv heads,
G = N // K, H head_dim, F mlp width, V vocab, L layers.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, NamedTuple, Optional, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from sod_jax.models.blocked_attention import MASKED_SCORE, blocked_attention
from sod_jax.parallel import constrain

_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


def as_dtype(name: Any) -> Any:
    return _DTYPES[name] if isinstance(name, str) else name


@dataclass(frozen=True)
class Qwen3Config:
    """Architecture (from HF ``config.json``) plus how to run it. Hashable: safe as a jit static."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 1_000_000.0
    tie_word_embeddings: bool = True
    max_position_embeddings: int = 40960
    bos_token_id: Optional[int] = None
    eos_token_id: Optional[int] = None
    # How to run (not part of the checkpoint):
    dtype: str = "float32"  # compute dtype of activations and matmuls
    param_dtype: str = "float32"  # dtype weights are stored in
    scan_layers: bool = True  # lax.scan over the stacked layer weights
    remat: str = "none"  # none | full | dots: what the backward pass may keep per layer
    attention_block: int = 512  # full-sequence attention beyond this many tokens runs in causal blocks

    def replace(self, **kw) -> "Qwen3Config":
        return dataclasses.replace(self, **kw)

    def num_params(self) -> int:
        D, F, V, L = self.hidden_size, self.intermediate_size, self.vocab_size, self.num_hidden_layers
        N, K, H = self.num_attention_heads, self.num_key_value_heads, self.head_dim
        per_layer = D * H * (N + 2 * K) + N * H * D + 3 * D * F + 2 * D + 2 * H
        return V * D * (1 if self.tie_word_embeddings else 2) + L * per_layer + D


# ---------------------------------------------------------------------------------------------
# Pure math
# ---------------------------------------------------------------------------------------------


def rms_norm(x: jax.Array, weight: jax.Array, eps: float) -> jax.Array:
    """RMSNorm over the last axis, statistics in fp32 (as HF Qwen3), result in x's dtype."""
    xf = x.astype(jnp.float32)
    xf = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + eps)
    return weight.astype(x.dtype) * xf.astype(x.dtype)


def rope_tables(positions: jax.Array, head_dim: int, theta: float) -> tuple[jax.Array, jax.Array]:
    """cos/sin tables ``[B, T, H]`` for integer positions ``[B, T]`` (HF's half-split layout)."""
    inv_freq = 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))  # [H/2]
    freqs = positions.astype(jnp.float32)[..., None] * inv_freq  # [B, T, H/2]
    emb = jnp.concatenate([freqs, freqs], axis=-1)  # [B, T, H]
    return jnp.cos(emb), jnp.sin(emb)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """Rotate ``x [B, T, heads, H]`` by tables ``[B, T, H]``; computed in fp32."""
    xf = x.astype(jnp.float32)
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-xf[..., half:], xf[..., :half]], axis=-1)
    out = xf * cos[:, :, None, :] + rotated * sin[:, :, None, :]
    return out.astype(x.dtype)


def attention_mask(
    q_positions: jax.Array,
    kv_positions: jax.Array,
    kv_valid: jax.Array,
    q_segments: Optional[jax.Array] = None,
    kv_segments: Optional[jax.Array] = None,
) -> jax.Array:
    """Boolean ``[B, T, S]`` mask: key s is visible to query t when it is valid, not in the future
    (by index order: callers pass monotone ``*_positions`` = slot indices) and in the same segment."""
    mask = kv_positions[:, None, :] <= q_positions[:, :, None]
    mask &= kv_valid[:, None, :].astype(bool)
    if q_segments is not None:
        mask &= q_segments[:, :, None] == kv_segments[:, None, :]
    return mask


def attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array) -> jax.Array:
    """GQA softmax attention. q ``[B, T, N, H]``, k/v ``[B, S, K, H]``, mask ``[B, T, S]`` -> ``[B, T, N, H]``.

    Query head n reads kv head ``n // G`` (HF's ``repeat_kv`` order). Scores and softmax in fp32;
    a query row with no visible key (padding) gets a uniform, finite distribution.
    """
    B, T, N, H = q.shape
    S, K = k.shape[1], k.shape[2]
    G = N // K
    # Heads-major layout with the G query heads of a kv head folded into the row axis: two plain
    # batched matmuls [B*K] x [G*T, H] x [H, S] (XLA:CPU runs this ~1.7x faster than a 5-D einsum).
    qg = q.reshape(B, T, K, G, H).transpose(0, 2, 3, 1, 4).reshape(B, K, G * T, H)
    kt, vt = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)  # [B, K, S, H]
    scores = jnp.einsum("bkqh,bksh->bkqs", qg, kt, preferred_element_type=jnp.float32) * (H**-0.5)
    scores = jnp.where(mask[:, None, None, :, :], scores.reshape(B, K, G, T, S), jnp.float32(MASKED_SCORE))
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype).reshape(B, K, G * T, S)
    out = jnp.einsum("bkqs,bksh->bkqh", probs, vt)
    return out.reshape(B, K, G, T, H).transpose(0, 3, 1, 2, 4).reshape(B, T, N, H)


def layer_qkv(cfg: Qwen3Config, p: dict, x: jax.Array, cos: jax.Array, sin: jax.Array):
    """Normed input -> rotated q ``[B,T,N,H]``, k ``[B,T,K,H]`` and v ``[B,T,K,H]`` of one layer."""
    h = rms_norm(x, p["attn_norm"], cfg.rms_norm_eps)
    q = jnp.einsum("btd,dnh->btnh", h, p["q"])
    k = jnp.einsum("btd,dkh->btkh", h, p["k"])
    v = jnp.einsum("btd,dkh->btkh", h, p["v"])
    q = apply_rope(rms_norm(q, p["q_norm"], cfg.rms_norm_eps), cos, sin)
    k = apply_rope(rms_norm(k, p["k_norm"], cfg.rms_norm_eps), cos, sin)
    return q, k, v


def layer_out(cfg: Qwen3Config, p: dict, x: jax.Array, attn: jax.Array) -> jax.Array:
    """Attention output projection + residual, then the SwiGLU MLP block + residual. ``[B,T,D]``."""
    x = x + jnp.einsum("btnh,nhd->btd", attn, p["o"])
    x = constrain(x, ("batch", None, None))
    h = rms_norm(x, p["mlp_norm"], cfg.rms_norm_eps)
    gate = jnp.einsum("btd,df->btf", h, p["gate"])
    up = jnp.einsum("btd,df->btf", h, p["up"])
    x = x + jnp.einsum("btf,fd->btd", jax.nn.silu(gate) * up, p["down"])
    return constrain(x, ("batch", None, None))


class SelfMask(NamedTuple):
    """Causal self-attention mask as ``[B, T]`` vectors, for :func:`blocked_attention` (the dense
    ``[B, T, T]`` mask would be O(T^2))."""

    valid: jax.Array  # [B, T] bool
    segment_ids: Optional[jax.Array]  # [B, T] or None
    block: int


class KVCache(NamedTuple):
    """Per-layer KV cache buffers (one buffer per layer, so a decode step updates each in place).
    S = cache rows, C = positions each row holds."""

    k: tuple  # per layer [S, K, H, C]: positions last, so q.k^T is a plain matmul per head
    v: tuple  # per layer [S, K, C, H]: heads before positions, so p.v reads it in place


class CacheWrite(NamedTuple):
    """Where the T tokens of a cached forward go: batch row b is cache row ``rows[b]`` (all rows in
    order when None), its token t lands at position ``start[b] + t`` and attends to positions
    ``<= start[b] + t`` of that row. Tokens with ``write`` False (padding, inactive slots) are not
    stored; out-of-range ``rows`` (batch padding) are dropped."""

    rows: Optional[jax.Array]  # [B] int32 or None
    start: jax.Array  # [B] int32 tokens already in the row
    write: jax.Array  # [B, T] bool
    read: Optional["CacheRead"] = None  # which positions the attention reads (None: the whole cache)
    # > 0: the rows hold nothing before this call (a prefill into an empty cache, start 0), so the
    # tokens attend only to each other: blocked causal self-attention in blocks of this many tokens,
    # never a [B, T, C] score matrix (the same values; a 4,096-token prompt bucket no longer needs
    # T x C scores per head)
    fresh_block: int = 0


class CacheRead(NamedTuple):
    """Which cache positions a cached forward reads, chosen on device, so one compiled program serves
    every cache length: every row reads the first ``windows[index]`` positions, and the rows
    ``tail_rows`` (the longest ones; a *ragged* read) read ``windows[tail_index]`` instead. The
    caller guarantees that no row attends past the window it reads. One straggler then costs its own
    long read, not a long read for every row: ``B x w + R x w_tail`` positions instead of ``B x C``.

    ``windows`` is a static ladder (ascending, the last one at most C); ``lax.switch`` picks the
    branch, so each program holds one attention per window, not one program per cache length."""

    windows: tuple  # static ascending window lengths
    index: jax.Array  # [] int32 into windows
    tail_rows: Optional[jax.Array] = None  # [R] int32, distinct rows of the batch
    tail_index: Optional[jax.Array] = None  # [] int32 into windows; < 0: no tail read this call


def cache_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array) -> jax.Array:
    """GQA attention against cache rows. q ``[B, T, N, H]``, k ``[B, K, H, C]``, v ``[B, K, C, H]``,
    mask ``[B, T, C]`` -> ``[B, T, N, H]``. Same math as :func:`attention`, laid out so the cache
    is read in place (no transpose of the C axis)."""
    B, T, N, H = q.shape
    K, C = k.shape[1], k.shape[3]
    G = N // K
    qg = q.reshape(B, T, K, G, H).transpose(0, 2, 3, 1, 4).reshape(B, K, G * T, H)
    scores = jnp.einsum("bkqh,bkhc->bkqc", qg, k.astype(q.dtype), preferred_element_type=jnp.float32) * (H**-0.5)
    scores = jnp.where(mask[:, None, None], scores.reshape(B, K, G, T, C), jnp.float32(MASKED_SCORE))
    probs = jax.nn.softmax(scores, axis=-1).astype(q.dtype).reshape(B, K, G * T, C)
    out = jnp.einsum("bkqc,bkch->bkqh", probs, v.astype(q.dtype))
    return out.reshape(B, K, G, T, H).transpose(0, 3, 1, 2, 4).reshape(B, T, N, H)


def window_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array, windows: Sequence[int],
                     index: jax.Array, rows: Optional[jax.Array] = None) -> jax.Array:
    """:func:`cache_attention` of ``q [B, T, N, H]`` over the first ``windows[index]`` positions of
    the cache rows ``rows [B]`` of ``k [S, K, H, C]`` / ``v [S, K, C, H]`` (all S rows in order when
    None; ``mask [B, T, C]``). ``index`` is traced: one ``lax.switch`` branch per window, each
    reading (gathering) only its window. Equal to :func:`cache_attention` over the whole rows when
    no query sees a position at or past the window."""

    def branch(w):
        def attend(q, k, v, m):
            if rows is None:
                return cache_attention(q, k[..., :w], v[:, :, :w], m[..., :w])
            return cache_attention(q, k[rows, :, :, :w], v[rows, :, :w], m[..., :w])
        return attend

    return jax.lax.switch(index, [branch(w) for w in windows], q, k, v, mask)


def read_cache_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array, read: CacheRead,
                         rows: Optional[jax.Array] = None) -> jax.Array:
    """:func:`window_attention` as :class:`CacheRead` says: every row over its window, the tail rows
    (when ``tail_index >= 0``) over theirs. ``rows``: as in :func:`window_attention`."""
    out = window_attention(q, k, v, mask, read.windows, read.index, rows)
    if read.tail_rows is None:
        return out
    t = read.tail_rows  # [R] positions in the batch
    cache_rows = t if rows is None else rows[t]

    def with_tail(out):
        tail = window_attention(q[t], k, v, mask[t], read.windows, jnp.maximum(read.tail_index, 0), cache_rows)
        return out.at[t].set(tail)

    return jax.lax.cond(read.tail_index >= 0, with_tail, lambda out: out, out)


def write_cache_tokens(buf: jax.Array, new: jax.Array, rows: jax.Array, start: jax.Array, write: jax.Array,
                      pos_axis: int) -> jax.Array:
    """Store ``new [B, T, K, H]`` in cache ``buf`` (``[S, K, H, C]`` with ``pos_axis=3`` or ``[S, K, C, H]``
    with ``pos_axis=2``): token t of batch row b at row ``rows[b]``, position ``start[b] + t``, where
    ``write [B, T]``; tokens not written, out-of-range rows and positions past C are dropped.

    Each token is one *window* update (a ``[K, H, 1]`` block at ``(row, position)``), not a point
    scatter over the head axes: inside the decode's while loop and the extension's scan XLA:TPU
    updates the windowed form in place, whereas the point form makes it copy the layer's whole
    buffer every step (a standalone v5e compile of a loop writing four 64 MiB buffers: 128 MiB of
    temporaries as points, 0.4 MiB as windows; the paper's 16-slot decode on v5e-8: 5.6 -> 0.5 GiB)."""
    B, T = new.shape[:2]
    S, C = buf.shape[0], buf.shape[pos_axis]
    pos = jnp.where(write & (rows < S)[:, None], start[:, None] + jnp.arange(T)[None], C)  # [B, T]; C: dropped
    row = jnp.broadcast_to(rows[:, None], (B, T))
    index = jnp.stack([row.reshape(-1), pos.reshape(-1)], axis=1)  # [B*T, 2]: (row, position)
    upd = new.astype(buf.dtype).reshape(B * T, *new.shape[2:])  # [B*T, K, H]
    upd = upd[..., None] if pos_axis == 3 else upd[:, :, None, :]  # [B*T, K, H, 1] / [B*T, K, 1, H]
    dims = jax.lax.ScatterDimensionNumbers(update_window_dims=(1, 2, 3), inserted_window_dims=(0,),
                                           scatter_dims_to_operand_dims=(0, pos_axis))
    return jax.lax.scatter(buf, index, upd, dims, mode=jax.lax.GatherScatterMode.FILL_OR_DROP)


def _cached_attention(q, k, v, ck: jax.Array, cv: jax.Array, w: CacheWrite):
    """Write this call's k/v ``[B, T, K, H]`` into the cache rows, then attend over them.
    Returns (attention output ``[B, T, N, H]``, updated k buffer, updated v buffer)."""
    B, T = q.shape[:2]
    C = cv.shape[2]
    idx = w.start[:, None] + jnp.arange(T)[None]  # [B, T] cache position of each token
    rows = jnp.arange(B) if w.rows is None else w.rows  # [B]
    ck = write_cache_tokens(ck, k, rows, w.start, w.write, pos_axis=3)
    cv = write_cache_tokens(cv, v, rows, w.start, w.write, pos_axis=2)
    if w.fresh_block and T > w.fresh_block:
        return blocked_attention(q, k, v, w.write, None, w.fresh_block), ck, cv
    mask = jnp.arange(C)[None, None, :] <= idx[:, :, None]  # [B, T, C]
    if w.read is not None:
        return read_cache_attention(q, ck, cv, mask, w.read, w.rows), ck, cv
    kr, vr = (ck, cv) if w.rows is None else (ck[w.rows], cv[w.rows])  # [B, K, H, C], [B, K, C, H]
    return cache_attention(q, kr, vr, mask), ck, cv


def decoder_layer(cfg: Qwen3Config, p: dict, x: jax.Array, cos, sin, mask, kv=None, write=None):
    """One decoder layer. ``x [B, T, D]`` -> (``[B, T, D]``, updated ``(k, v)`` cache buffers or None).

    Without a cache ``mask`` is a dense ``[B, T, T]`` mask or a :class:`SelfMask` (blocked
    attention). With ``kv`` = this layer's ``(k, v)`` buffers the tokens are written at ``write``
    and attend over the cache. ``p`` may hold the stored dtype: it is cast here, one layer at a time."""
    dt = as_dtype(cfg.dtype)
    p = {name: a.astype(dt) for name, a in p.items()}  # a no-op when stored in the compute dtype
    with jax.named_scope("attention"):
        q, k, v = layer_qkv(cfg, p, x, cos, sin)
        if kv is not None:
            attn, ck, cv = _cached_attention(q, k, v, kv[0], kv[1], write)
            kv = (ck, cv)
        elif isinstance(mask, SelfMask):
            attn = blocked_attention(q, k, v, mask.valid, mask.segment_ids, mask.block)
        else:
            attn = attention(q, k, v, mask)
    with jax.named_scope("mlp"):
        return layer_out(cfg, p, x, attn), kv


_REMAT = {
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


def run_layers(cfg: Qwen3Config, layers, x: jax.Array, cos, sin, mask=None,
               cache: Optional[KVCache] = None, write: Optional[CacheWrite] = None):
    """Apply all L layers. ``layers``: stacked weights ``{name: [L, ...]}`` (lax.scan when
    ``cfg.scan_layers`` and no cache, else an unrolled loop slicing layer i) or a list of L per-layer
    dicts (an unrolled loop; the rollout engine's sampling layout). With a ``cache`` every layer
    reads and writes its own buffers (always unrolled). Returns (x ``[B, T, D]``, cache or None)."""

    def body(h, p):
        return decoder_layer(cfg, p, h, cos, sin, mask)[0], None

    if cfg.remat != "none" and cache is None:
        body = jax.checkpoint(body, policy=_REMAT[cfg.remat])
    per_layer = isinstance(layers, (list, tuple))
    if cache is None and cfg.scan_layers and not per_layer:
        x, _ = jax.lax.scan(body, x, layers)
        return x, None
    k_out, v_out = [], []
    for i in range(cfg.num_hidden_layers):
        p = layers[i] if per_layer else jax.tree.map(lambda a: a[i], layers)
        with jax.named_scope(f"layer_{i}"):
            if cache is None:
                x, _ = body(x, p)
                continue
            x, (ck, cv) = decoder_layer(cfg, p, x, cos, sin, None, (cache.k[i], cache.v[i]), write)
        k_out.append(ck)
        v_out.append(cv)
    return x, (KVCache(tuple(k_out), tuple(v_out)) if cache is not None else None)


def embed_lookup(cfg: Qwen3Config, embed: jax.Array, ids: jax.Array) -> jax.Array:
    """Token embeddings ``[B, T, D]`` in the compute dtype (only the gathered rows are cast)."""
    x = jnp.take(embed, ids, axis=0).astype(as_dtype(cfg.dtype))
    return constrain(x, ("batch", None, None))


def forward(
    cfg: Qwen3Config,
    weights: dict,  # {"embed": [V, D], "layers": stacked dict or list of per-layer dicts, "final_norm": [D], ...}
    input_ids: jax.Array,  # [B, T] int
    positions: jax.Array,  # [B, T] int (RoPE positions)
    mask=None,  # without a cache: dense [B, T, T] bool or SelfMask
    cache: Optional[KVCache] = None,
    write: Optional[CacheWrite] = None,
) -> tuple[jax.Array, Optional[KVCache]]:
    """THE Qwen3 forward, used by training, the teacher, and the rollout engine's prefill, decode and
    cache extension. Returns final-normed hidden states ``[B, T, D]`` (the lm head's input) and the
    updated cache (None without one). Weights may be stored in any dtype: each layer is cast to the
    compute dtype inside the layer loop, never as a full copy of the stack."""
    with jax.named_scope("embed"):
        x = embed_lookup(cfg, weights["embed"], input_ids)
    cos, sin = rope_tables(positions, cfg.head_dim, cfg.rope_theta)
    x, cache = run_layers(cfg, weights["layers"], x, cos, sin, mask, cache, write)
    with jax.named_scope("final_norm"):
        return rms_norm(x, weights["final_norm"], cfg.rms_norm_eps), cache


def lm_logits(cfg: Qwen3Config, weights: dict, h: jax.Array) -> jax.Array:
    """Output projection of final-normed ``h [..., D]`` -> fp32 logits ``[..., V]``. A tied head
    contracts with the embedding ``[V, D]`` directly (no transposed copy)."""
    with jax.named_scope("lm_head"):
        dt = as_dtype(cfg.dtype)
        if "lm_head" in weights:
            return jnp.einsum("...d,dv->...v", h, weights["lm_head"].astype(dt), preferred_element_type=jnp.float32)
        return jnp.einsum("...d,vd->...v", h, weights["embed"].astype(dt), preferred_element_type=jnp.float32)


def default_positions(
    input_ids: jax.Array, attention_mask: Optional[jax.Array], segment_ids: Optional[jax.Array]
) -> jax.Array:
    """Positions ``[B, T]``: count of valid tokens before each token (padding-invariant), restarted
    at every segment boundary when ``segment_ids`` are given."""
    B, T = input_ids.shape
    valid = jnp.ones((B, T), jnp.int32) if attention_mask is None else attention_mask.astype(jnp.int32)
    pos = jnp.cumsum(valid, axis=1) - 1
    if segment_ids is not None:
        idx = jnp.arange(T)[None, :]
        new_seg = jnp.concatenate([jnp.ones((B, 1), bool), segment_ids[:, 1:] != segment_ids[:, :-1]], axis=1)
        seg_start = jax.lax.cummax(jnp.where(new_seg, idx, 0), axis=1)
        before = jnp.take_along_axis(jnp.cumsum(valid, axis=1) - valid, seg_start, axis=1)
        pos = pos - before
    return jnp.maximum(pos, 0)


# ---------------------------------------------------------------------------------------------
# The module
# ---------------------------------------------------------------------------------------------

# Logical axes of every weight; the HF name mapping in hf.py uses the same keys.
LAYER_AXES = {
    "attn_norm": ("layers", "norm"),
    "q": ("layers", "embed", "heads", "head_dim"),
    "k": ("layers", "embed", "kv_heads", "head_dim"),
    "v": ("layers", "embed", "kv_heads", "head_dim"),
    "q_norm": ("layers", "norm"),
    "k_norm": ("layers", "norm"),
    "o": ("layers", "heads", "head_dim", "embed"),
    "mlp_norm": ("layers", "norm"),
    "gate": ("layers", "embed", "mlp"),
    "up": ("layers", "embed", "mlp"),
    "down": ("layers", "mlp", "embed"),
}


def layer_shapes(cfg: Qwen3Config) -> dict[str, tuple[int, ...]]:
    L, D, F = cfg.num_hidden_layers, cfg.hidden_size, cfg.intermediate_size
    N, K, H = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    return {
        "attn_norm": (L, D), "q": (L, D, N, H), "k": (L, D, K, H), "v": (L, D, K, H),
        "q_norm": (L, H), "k_norm": (L, H), "o": (L, N, H, D), "mlp_norm": (L, D),
        "gate": (L, D, F), "up": (L, D, F), "down": (L, F, D),
    }


class Qwen3Layers(nnx.Module):
    """The L decoder layers' weights, stacked on a leading ``layers`` axis."""

    def __init__(self, cfg: Qwen3Config, *, rngs: nnx.Rngs):
        pd = as_dtype(cfg.param_dtype)
        init = nnx.initializers.normal(0.02)
        for name, shape in layer_shapes(cfg).items():
            if name.endswith("norm"):
                value = jnp.ones(shape, pd)
            else:
                value = init(rngs.params(), shape, pd)
            setattr(self, name, nnx.Param(value, logical_axes=LAYER_AXES[name]))

    def arrays(self, dtype=None) -> dict[str, jax.Array]:
        """The stacked weights ``{name: [L, ...]}`` (as stored, or cast to ``dtype``)."""
        return {name: getattr(self, name)[...] if dtype is None else getattr(self, name)[...].astype(dtype)
                for name in LAYER_AXES}


class Qwen3(nnx.Module):
    """Qwen3 causal LM. ``model(input_ids, positions, attention_mask, segment_ids) -> logits [B,T,V]``."""

    def __init__(self, cfg: Qwen3Config, *, rngs: nnx.Rngs):
        if cfg.num_attention_heads % cfg.num_key_value_heads:
            raise ValueError(f"num_attention_heads ({cfg.num_attention_heads}) must be a multiple of "
                             f"num_key_value_heads ({cfg.num_key_value_heads})")
        self.config = cfg
        pd = as_dtype(cfg.param_dtype)
        init = nnx.initializers.normal(0.02)
        self.embed = nnx.Param(init(rngs.params(), (cfg.vocab_size, cfg.hidden_size), pd),
                               logical_axes=("vocab", "embed"))
        self.layers = Qwen3Layers(cfg, rngs=rngs)
        self.final_norm = nnx.Param(jnp.ones((cfg.hidden_size,), pd), logical_axes=("norm",))
        if not cfg.tie_word_embeddings:
            self.lm_head = nnx.Param(init(rngs.params(), (cfg.hidden_size, cfg.vocab_size), pd),
                                     logical_axes=("embed", "vocab"))

    def lm_head_weight(self) -> jax.Array:
        """The output projection ``[D, V]`` in the compute dtype (the embedding transposed when tied)."""
        dt = as_dtype(self.config.dtype)
        w = self.embed[...].T if self.config.tie_word_embeddings else self.lm_head[...]
        return w.astype(dt)

    def embed_tokens(self, input_ids: jax.Array) -> jax.Array:
        return embed_lookup(self.config, self.embed[...], input_ids)

    def weights(self) -> dict:
        """The plain-array weights :func:`forward` reads, as stored (no cast, no copy)."""
        w = {"embed": self.embed[...], "layers": self.layers.arrays(), "final_norm": self.final_norm[...]}
        if not self.config.tie_word_embeddings:
            w["lm_head"] = self.lm_head[...]
        return w

    def hidden_states(
        self,
        input_ids: jax.Array,  # [B, T] int
        positions: Optional[jax.Array] = None,  # [B, T] int; default: padding-invariant counts
        attention_mask: Optional[jax.Array] = None,  # [B, T] 1 = token, 0 = padding (left or right)
        segment_ids: Optional[jax.Array] = None,  # [B, T] packed sequences attend within a segment
    ) -> jax.Array:
        """Final-normed hidden states ``[B, T, D]`` (the input of the lm head)."""
        cfg = self.config
        B, T = input_ids.shape
        if positions is None:
            positions = default_positions(input_ids, attention_mask, segment_ids)
        valid = jnp.ones((B, T), bool) if attention_mask is None else attention_mask.astype(bool)
        if cfg.attention_block and T > cfg.attention_block:
            mask = SelfMask(valid, segment_ids, cfg.attention_block)  # O(T x block) memory
        else:
            mask = attention_mask_from(jnp.broadcast_to(jnp.arange(T)[None], (B, T)), valid, segment_ids)
        return forward(cfg, self.weights(), input_ids, positions, mask)[0]

    def __call__(self, input_ids, positions=None, attention_mask=None, segment_ids=None) -> jax.Array:
        """Logits ``[B, T, V]`` in fp32. For training use :func:`sod_jax.models.logprobs.token_logprobs`
        on :meth:`hidden_states` instead: it never materialises ``[B, T, V]``."""
        h = self.hidden_states(input_ids, positions, attention_mask, segment_ids)
        logits = jnp.einsum("btd,dv->btv", h, self.lm_head_weight(), preferred_element_type=jnp.float32)
        return constrain(logits, ("batch", None, "vocab"))


def attention_mask_from(idx: jax.Array, valid: jax.Array, segment_ids: Optional[jax.Array]) -> jax.Array:
    """Causal + padding (+ segment) mask ``[B, T, T]`` for a full sequence."""
    return attention_mask(idx, idx, valid, segment_ids, segment_ids)


def init_model(cfg: Qwen3Config, seed: int = 0) -> Qwen3:
    """A randomly initialised model (tests, demos)."""
    return Qwen3(cfg, rngs=nnx.Rngs(seed))
