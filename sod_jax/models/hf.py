"""Hugging Face Qwen3 checkpoints <-> our NNX model.

Loading reads ``config.json`` and ``model.safetensors`` (or the shards listed in
``model.safetensors.index.json``) and builds every parameter with
``jax.make_array_from_callback``: each device's shard is filled layer by layer with
``safe_open(...).get_slice(name)[rows, cols]`` reads of exactly the part of that layer's tensor the
device holds, so the host holds one device shard plus one layer's slice at a time, never a whole
stacked weight and never a second copy of the model.

Saving writes ``config.json``, safetensors (sharded above ``max_shard_bytes`` with an index) that
``transformers`` loads directly, and ``generation_config.json``: the source checkpoint's file when
one is given, else only the token ids we know.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from typing import Any, Callable, Optional, Sequence, Union

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh
from safetensors import safe_open
from safetensors.numpy import save_file

from sod_jax import parallel
from sod_jax.models.qwen3 import Qwen3, Qwen3Config, as_dtype

SUPPORTED_MODEL_TYPES = ("qwen3",)
SUPPORTED_ARCHITECTURES = ("Qwen3ForCausalLM",)


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded as asked; the message names the file/tensor."""


# ---------------------------------------------------------------------------------------------
# Name and layout mapping (ours <-> HF). Our weights are [in, ..., out]; HF Linear is [out, in].
# ---------------------------------------------------------------------------------------------

# Our per-layer parameter name -> the HF tensor name inside ``model.layers.{i}.`` (public: the
# converter streams exports and checks imports with it).
LAYER_HF = {
    "attn_norm": "input_layernorm.weight",
    "q": "self_attn.q_proj.weight",
    "k": "self_attn.k_proj.weight",
    "v": "self_attn.v_proj.weight",
    "q_norm": "self_attn.q_norm.weight",
    "k_norm": "self_attn.k_norm.weight",
    "o": "self_attn.o_proj.weight",
    "mlp_norm": "post_attention_layernorm.weight",
    "gate": "mlp.gate_proj.weight",
    "up": "mlp.up_proj.weight",
    "down": "mlp.down_proj.weight",
}


def _hf_shape(name: str, cfg: Qwen3Config) -> tuple[int, ...]:
    """Shape of one layer's HF tensor for our weight ``name``."""
    D, F, N, K, H = (cfg.hidden_size, cfg.intermediate_size, cfg.num_attention_heads,
                     cfg.num_key_value_heads, cfg.head_dim)
    return {"attn_norm": (D,), "mlp_norm": (D,), "q_norm": (H,), "k_norm": (H,),
            "q": (N * H, D), "k": (K * H, D), "v": (K * H, D), "o": (D, N * H),
            "gate": (F, D), "up": (F, D), "down": (D, F)}[name]


def layer_to_hf(name: str, t: np.ndarray) -> np.ndarray:
    """One layer of our weight -> HF layout (the inverse of :func:`_layer_slice` on a whole layer)."""
    if name in ("q", "k", "v"):
        D = t.shape[0]
        return t.transpose(1, 2, 0).reshape(-1, D)
    if name == "o":
        return t.transpose(2, 0, 1).reshape(t.shape[2], -1)
    if name in ("gate", "up", "down"):
        return t.T
    return t


# ---------------------------------------------------------------------------------------------
# Config
# ---------------------------------------------------------------------------------------------


def config_from_hf(d: dict, source: str = "config.json", **runtime: Any) -> Qwen3Config:
    """Validate an HF ``config.json`` dict and build a :class:`Qwen3Config` (plus runtime options)."""
    mt = d.get("model_type")
    if mt not in SUPPORTED_MODEL_TYPES:
        raise CheckpointError(f"{source}: model_type {mt!r} is not supported (supported: {', '.join(SUPPORTED_MODEL_TYPES)})")
    archs = d.get("architectures") or ["Qwen3ForCausalLM"]
    if not any(a in SUPPORTED_ARCHITECTURES for a in archs):
        raise CheckpointError(f"{source}: architectures {archs} are not supported (supported: {', '.join(SUPPORTED_ARCHITECTURES)})")
    rope_params = d.get("rope_parameters") or {}
    scaling = d.get("rope_scaling") or ({k: v for k, v in rope_params.items() if k != "rope_theta"} or None)
    if scaling and scaling.get("rope_type", scaling.get("type", "default")) != "default":
        raise CheckpointError(f"{source}: rope_scaling {scaling} is not supported (only default RoPE)")
    if d.get("use_sliding_window"):
        raise CheckpointError(f"{source}: use_sliding_window=true is not supported")
    if d.get("attention_bias"):
        raise CheckpointError(f"{source}: attention_bias=true is not supported by Qwen3")
    for key in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads"):
        if key not in d:
            raise CheckpointError(f"{source}: required key '{key}' is missing")
    heads = d["num_attention_heads"]
    eos = d.get("eos_token_id")
    return Qwen3Config(
        vocab_size=d["vocab_size"],
        hidden_size=d["hidden_size"],
        intermediate_size=d["intermediate_size"],
        num_hidden_layers=d["num_hidden_layers"],
        num_attention_heads=heads,
        num_key_value_heads=d.get("num_key_value_heads") or heads,
        head_dim=d.get("head_dim") or d["hidden_size"] // heads,
        rms_norm_eps=float(d.get("rms_norm_eps", 1e-6)),
        rope_theta=float(d.get("rope_theta", rope_params.get("rope_theta", 10000.0))),
        tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
        max_position_embeddings=int(d.get("max_position_embeddings", 40960)),
        bos_token_id=d.get("bos_token_id"),
        eos_token_id=eos[0] if isinstance(eos, list) else eos,
        **runtime,
    )


def config_to_hf(cfg: Qwen3Config, torch_dtype: str) -> dict:
    return {
        "architectures": ["Qwen3ForCausalLM"],
        "model_type": "qwen3",
        "attention_bias": False,
        "attention_dropout": 0.0,
        "hidden_act": "silu",
        "initializer_range": 0.02,
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.intermediate_size,
        "num_hidden_layers": cfg.num_hidden_layers,
        "num_attention_heads": cfg.num_attention_heads,
        "num_key_value_heads": cfg.num_key_value_heads,
        "head_dim": cfg.head_dim,
        "rms_norm_eps": cfg.rms_norm_eps,
        "rope_theta": cfg.rope_theta,
        "rope_scaling": None,
        "max_position_embeddings": cfg.max_position_embeddings,
        "tie_word_embeddings": cfg.tie_word_embeddings,
        "use_sliding_window": False,
        "sliding_window": None,
        "max_window_layers": cfg.num_hidden_layers,
        "bos_token_id": cfg.bos_token_id,
        "eos_token_id": cfg.eos_token_id,
        "use_cache": True,
        "torch_dtype": torch_dtype,
    }


# ---------------------------------------------------------------------------------------------
# Reading safetensors lazily
# ---------------------------------------------------------------------------------------------


class _TensorIndex:
    """Where each tensor of a (possibly sharded) safetensors checkpoint lives; reads one at a time."""

    def __init__(self, root: Path):
        index = root / "model.safetensors.index.json"
        single = root / "model.safetensors"
        if index.is_file():
            weight_map = json.loads(index.read_text())["weight_map"]
            files = sorted(set(weight_map.values()))
            for f in files:
                if not (root / f).is_file():
                    raise CheckpointError(f"{index}: shard file '{f}' is missing")
        elif single.is_file():
            files = [single.name]
            weight_map = None
        else:
            raise CheckpointError(f"{root}: neither model.safetensors nor model.safetensors.index.json found")
        self.handles = {f: safe_open(str(root / f), framework="numpy") for f in files}
        self.where: dict[str, str] = {}
        for f, h in self.handles.items():
            for k in h.keys():
                self.where[k] = f
        if weight_map is not None:
            for k, f in weight_map.items():
                if k not in self.where:
                    raise CheckpointError(f"{index}: tensor '{k}' is listed in shard '{f}' but not stored there")

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self.handles[self.where[name]].get_slice(name).get_shape())

    def read(self, name: str, index: tuple = ()) -> np.ndarray:
        """``tensor[index]`` (basic slices) read from the file without loading the rest."""
        return self.handles[self.where[name]].get_slice(name)[index]


def expected_tensors(cfg: Qwen3Config) -> dict[str, tuple[int, ...]]:
    """HF tensor name -> shape of every tensor a checkpoint of ``cfg`` holds."""
    names = {"model.embed_tokens.weight": (cfg.vocab_size, cfg.hidden_size),
             "model.norm.weight": (cfg.hidden_size,)}
    if not cfg.tie_word_embeddings:
        names["lm_head.weight"] = (cfg.vocab_size, cfg.hidden_size)
    for i in range(cfg.num_hidden_layers):
        for ours, theirs in LAYER_HF.items():
            names[f"model.layers.{i}.{theirs}"] = _hf_shape(ours, cfg)
    return names


def _check_tensors(idx: _TensorIndex, cfg: Qwen3Config, root: Path) -> None:
    expected = expected_tensors(cfg)
    for name, shape in expected.items():
        if name not in idx.where:
            raise CheckpointError(f"{root}: tensor '{name}' is missing (expected shape {shape})")
        got = idx.shape(name)
        if got != shape:
            raise CheckpointError(f"{root}: tensor '{name}' has shape {got} but the config implies {shape} "
                                  f"(file {idx.where[name]})")
    # A tied checkpoint may still carry lm_head.weight (a copy of the embedding); rotary buffers are derived.
    allowed_extra = {"lm_head.weight"} if cfg.tie_word_embeddings else set()
    for name in idx.where:
        if name not in expected and name not in allowed_extra and not name.endswith("rotary_emb.inv_freq"):
            raise CheckpointError(f"{root}: unexpected tensor '{name}' with shape {idx.shape(name)} "
                                  f"(file {idx.where[name]}); it has no place in a {cfg.num_hidden_layers}-layer Qwen3")


# ---------------------------------------------------------------------------------------------
# Paths and the Hub
# ---------------------------------------------------------------------------------------------

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def resolve_checkpoint_dir(path: Union[str, os.PathLike]) -> Path:
    """A local directory as is; a Hub id (``Qwen/Qwen3-0.6B``) fetched when online; else a clear error."""
    p = Path(path)
    if p.is_dir():
        return p
    text = str(path)
    if p.exists():
        raise CheckpointError(f"'{text}' is a file; pass the checkpoint directory holding config.json")
    if not _HUB_ID.match(text):
        raise CheckpointError(f"checkpoint directory '{text}' does not exist")
    how = (f"'{text}' is not a local directory; it looks like a Hugging Face Hub id. Download it where there is "
           f"internet (`huggingface-cli download {text} --local-dir DIR`) and pass that DIR instead")
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False"):
        raise CheckpointError(how + " (HF_HUB_OFFLINE is set)")
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise CheckpointError(how + " (huggingface_hub is not installed)") from None
    try:
        return Path(snapshot_download(text, allow_patterns=["*.json", "*.safetensors", "*.jinja", "*.txt"]))
    except Exception as e:  # offline, unknown repo, auth: all mean "use a local directory"
        raise CheckpointError(f"{how} (download failed: {type(e).__name__}: {e})") from None


def read_config(path: Union[str, os.PathLike], **runtime: Any) -> Qwen3Config:
    root = resolve_checkpoint_dir(path)
    cfg_path = root / "config.json"
    if not cfg_path.is_file():
        raise CheckpointError(f"{root}: config.json is missing")
    try:
        d = json.loads(cfg_path.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{cfg_path}: not valid JSON ({e})") from None
    return config_from_hf(d, str(cfg_path), **runtime)


# ---------------------------------------------------------------------------------------------
# Load
# ---------------------------------------------------------------------------------------------


def np_dtype(dtype: Any) -> np.dtype:
    """The numpy dtype of a dtype name (``"bfloat16"``, ...) or jnp dtype: the one mapping used for
    loading and saving (bfloat16 is ``ml_dtypes.bfloat16``)."""
    return np.dtype(as_dtype(dtype))


def _bounds(sl: slice, n: int) -> tuple[int, int]:
    start, stop, step = sl.indices(n)
    if step != 1:
        raise ValueError(f"strided shard index {sl} is not supported")
    return start, stop


def _layer_slice(idx: _TensorIndex, ours: str, layer: int, sl: tuple, cfg: Qwen3Config) -> np.ndarray:
    """The part ``sl`` (slices of our per-layer layout) of one layer's weight ``ours``, read from
    the HF tensor with one ``get_slice`` read of the rows/columns it covers."""
    name = f"model.layers.{layer}.{LAYER_HF[ours]}"
    H = cfg.head_dim
    if ours in ("q", "k", "v"):  # HF [heads*H, D] -> ours [D, heads, H]
        heads = cfg.num_attention_heads if ours == "q" else cfg.num_key_value_heads
        d, n, h = sl
        n0, n1 = _bounds(n, heads)
        block = idx.read(name, (slice(n0 * H, n1 * H), d))
        return block.reshape(n1 - n0, H, -1).transpose(2, 0, 1)[:, :, h]
    if ours == "o":  # HF [D, N*H] -> ours [N, H, D]
        n, h, d = sl
        n0, n1 = _bounds(n, cfg.num_attention_heads)
        block = idx.read(name, (d, slice(n0 * H, n1 * H)))
        return block.reshape(block.shape[0], n1 - n0, H).transpose(1, 2, 0)[:, h, :]
    if ours in ("gate", "up", "down"):  # HF Linear [out, in] -> ours [in, out]
        return idx.read(name, (sl[1], sl[0])).T
    return idx.read(name, sl)  # norms


def _place(shape: tuple[int, ...], sharding: jax.sharding.Sharding, dtype: Any,
           read: Callable[[tuple], np.ndarray], stacked: bool) -> jax.Array:
    """Build a global array shard by shard. ``read(index)`` returns our-layout host data for a tuple
    of slices: for ``stacked`` weights one layer's part (index = (layer, slices...)), else the part
    of the whole tensor."""
    dt = np_dtype(dtype)

    def callback(index: tuple) -> np.ndarray:
        index = tuple(index) + (slice(None),) * (len(shape) - len(index))
        if not stacked:
            return np.ascontiguousarray(read(index).astype(dt))
        layers = range(shape[0])[index[0]]
        out = None
        for j, layer in enumerate(layers):  # one layer's slice on the host at a time
            part = read((layer,) + index[1:])
            if out is None:
                out = np.empty((len(layers),) + part.shape, dt)
            out[j] = part
        return out

    return jax.make_array_from_callback(shape, sharding, callback)


def load_pretrained(
    path: Union[str, os.PathLike],
    dtype: str = "float32",
    param_dtype: str = "float32",
    mesh: Optional[Mesh] = None,
    rules: Sequence[parallel.AxisRule] = parallel.DEFAULT_RULES,
    **runtime: Any,
) -> Qwen3:
    """Load an HF Qwen3 checkpoint directory into a :class:`Qwen3`.

    ``dtype`` is the compute dtype, ``param_dtype`` the storage dtype; ``mesh`` (optional) places
    each weight directly in the sharding its logical axes name. ``runtime`` passes ``scan_layers``,
    ``remat`` and ``attention_block`` through to :class:`Qwen3Config`.
    """
    root = resolve_checkpoint_dir(path)
    cfg = read_config(root, dtype=dtype, param_dtype=param_dtype, **runtime)
    idx = _TensorIndex(root)
    _check_tensors(idx, cfg, root)

    abstract = nnx.eval_shape(lambda: Qwen3(cfg, rngs=nnx.Rngs(0)))
    graphdef, state = nnx.split(abstract)
    target_dtype = as_dtype(param_dtype)
    if mesh is None:
        single = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
        shardings = jax.tree.map(lambda _: single, state, is_leaf=lambda x: isinstance(x, nnx.Variable))
    else:
        shardings = parallel.param_shardings(state, mesh, rules)

    def reader(path_keys: tuple) -> tuple[Callable[[tuple], np.ndarray], bool]:
        if path_keys[0] == "layers":
            ours = path_keys[1]
            return (lambda index: _layer_slice(idx, ours, index[0], index[1:], cfg)), True
        if path_keys[0] == "embed":
            return (lambda index: idx.read("model.embed_tokens.weight", index)), False
        if path_keys[0] == "final_norm":
            return (lambda index: idx.read("model.norm.weight", index)), False
        if path_keys[0] == "lm_head":  # HF [V, D] -> ours [D, V]
            return (lambda index: idx.read("lm_head.weight", (index[1], index[0])).T), False
        raise CheckpointError(f"no HF tensor maps to parameter {'.'.join(map(str, path_keys))}")

    flat_shardings = dict(nnx.to_flat_state(shardings))
    for keys, var in nnx.to_flat_state(state):
        read, stacked = reader(tuple(str(k) for k in keys))
        sharding = flat_shardings[keys]
        sharding = sharding.get_value() if isinstance(sharding, nnx.Variable) else sharding
        var.set_value(_place(var.shape, sharding, target_dtype, read, stacked))
    return nnx.merge(graphdef, state)


# ---------------------------------------------------------------------------------------------
# Save
# ---------------------------------------------------------------------------------------------


def _to_host(x: jax.Array) -> np.ndarray:
    if jax.process_count() > 1 and not x.is_fully_addressable:
        from jax.experimental import multihost_utils

        return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(jax.device_get(x))


def _hf_tensors(model: Qwen3, dt: np.dtype):
    """Yield (HF name, host array) one tensor at a time."""
    cfg = model.config
    yield "model.embed_tokens.weight", _to_host(model.embed[...]).astype(dt)
    for ours, theirs in LAYER_HF.items():
        stacked = getattr(model.layers, ours)[...]
        for i in range(cfg.num_hidden_layers):
            yield f"model.layers.{i}.{theirs}", np.ascontiguousarray(layer_to_hf(ours, _to_host(stacked[i])).astype(dt))
    yield "model.norm.weight", _to_host(model.final_norm[...]).astype(dt)
    if not cfg.tie_word_embeddings:
        yield "lm_head.weight", np.ascontiguousarray(_to_host(model.lm_head[...]).T.astype(dt))


def save_pretrained(model: Qwen3, path: Union[str, os.PathLike], dtype: Optional[str] = None,
                    max_shard_bytes: int = 4 * 1024**3, source: Union[str, os.PathLike, None] = None) -> Path:
    """Write an HF checkpoint directory ``transformers`` loads. ``dtype`` defaults to the param dtype.
    ``source``: the checkpoint the model came from; its ``generation_config.json`` (sampling
    defaults) is copied, else one holding only the bos/eos ids is written.
    Tensors are gathered to the host one at a time; files are written by process 0 only."""
    cfg = model.config
    dtype = dtype or cfg.param_dtype
    out_dtype = np_dtype(dtype)
    root = Path(path)
    is_writer = jax.process_index() == 0
    if is_writer:
        root.mkdir(parents=True, exist_ok=True)
    # Bounded host memory: a shard is written to a temporary file as soon as it is full.
    shard: dict[str, np.ndarray] = {}
    size = 0
    written: list[tuple[str, list[str]]] = []

    def flush() -> None:
        nonlocal shard, size
        if shard and is_writer:
            tmp = f"shard-{len(written):05d}.tmp"
            save_file(shard, str(root / tmp), metadata={"format": "pt"})
            written.append((tmp, list(shard)))
        shard, size = {}, 0

    for name, arr in _hf_tensors(model, out_dtype):
        if size and size + arr.nbytes > max_shard_bytes:
            flush()
        shard[name] = arr
        size += arr.nbytes
    flush()
    if is_writer:
        for stale in list(root.glob("model*.safetensors")) + list(root.glob("model.safetensors.index.json")):
            stale.unlink()
        total = sum((root / tmp).stat().st_size for tmp, _ in written)
        if len(written) == 1:
            (root / written[0][0]).rename(root / "model.safetensors")
        else:
            weight_map = {}
            for i, (tmp, names) in enumerate(written):
                fname = f"model-{i + 1:05d}-of-{len(written):05d}.safetensors"
                (root / tmp).rename(root / fname)
                weight_map.update({n: fname for n in names})
            (root / "model.safetensors.index.json").write_text(json.dumps(
                {"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
        (root / "config.json").write_text(json.dumps(config_to_hf(cfg, dtype), indent=2))
        src_gen = None if source is None else Path(source) / "generation_config.json"
        if src_gen is not None and src_gen.is_file():
            if src_gen.resolve() != (root / "generation_config.json").resolve():
                shutil.copyfile(src_gen, root / "generation_config.json")
        else:
            gen = {k: v for k, v in (("bos_token_id", cfg.bos_token_id), ("eos_token_id", cfg.eos_token_id))
                   if v is not None}
            (root / "generation_config.json").write_text(json.dumps(gen, indent=2))
    return root
