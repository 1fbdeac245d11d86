"""``python -m sod_jax.convert {orbax-to-hf,hf-to-orbax}``: training checkpoints <-> HF safetensors.

``orbax-to-hf --ckpt DIR [--step N] --out DIR [--dtype bfloat16|float32]`` exports the student
weights of a training checkpoint (:mod:`sod_jax.checkpoint`, the ``params`` of its state) as an HF
checkpoint ``transformers`` loads: ``model.safetensors`` (or shards of at most ``--max-shard-size``
plus ``model.safetensors.index.json``), ``config.json``, ``generation_config.json`` and the
tokenizer files of the base model. The architecture comes from the checkpoint's ``extra``
(``hf_config``, else the ``config.json`` of the resolved config's ``model.path``); the tokenizer
from ``sft.tokenizer`` / ``model.path`` of that config, or ``--base-model``.

Host memory is bounded by streaming: the safetensors headers are computed from the shapes first,
then one stored array at a time is read from the checkpoint (never the optimizer state), cut into
its HF tensors and written straight into the output file. Peak host memory is about the largest
stored array (with scanned layers, one weight kind across all layers) plus one output tensor.

``hf-to-orbax --hf DIR --out DIR [--step 0] [--dtype float32|bfloat16]`` writes an HF checkpoint
as a checkpoint directory with state ``{"params": ...}`` (restore it with
``Checkpointer.restore({"params": abstract_params})``) and ``extra`` naming the source. It loads
the model with ``load_pretrained`` (each device's shard cut from the memory-mapped file), so the
full model is in device memory, which on a CPU-only host is host memory.

Checkpoint directories (``--ckpt``, hf-to-orbax's ``--out``) may be ``gs://`` URLs, and so may
orbax-to-hf's ``--out`` (written to a local staging directory, then copied there); HF inputs
(``--hf``, ``--base-model``) are local directories.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import struct
import sys
import tempfile
from pathlib import Path
from typing import Any, Optional, Sequence, Union

import ml_dtypes
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx

from sod_jax import paths
from sod_jax.checkpoint import Checkpointer, quiet_orbax_logs
from sod_jax.config import Config
from sod_jax.models.hf import (
    LAYER_HF,
    CheckpointError,
    config_from_hf,
    config_to_hf,
    expected_tensors,
    layer_to_hf,
    load_pretrained,
    read_config,
)

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
                   "vocab.json", "merges.txt", "added_tokens.json")
_ST_DTYPES = {np.dtype(np.float32): "F32", np.dtype(ml_dtypes.bfloat16): "BF16", np.dtype(np.float16): "F16"}


class ConvertError(ValueError):
    """A conversion that cannot be done as asked; the message names the file, key or flag to fix."""


def _np_dtype(name: str) -> np.dtype:
    return np.dtype(ml_dtypes.bfloat16) if name == "bfloat16" else np.dtype(name)


def parse_size(text: str) -> int:
    """``"4GB"``, ``"500MB"``, ``"1024"`` -> bytes."""
    t = str(text).strip().upper()
    for suffix, mult in (("GIB", 1024**3), ("MIB", 1024**2), ("KIB", 1024), ("GB", 10**9), ("MB", 10**6),
                         ("KB", 10**3), ("B", 1)):
        if t.endswith(suffix):
            return int(float(t[: -len(suffix)]) * mult)
    return int(t)


# ---------------------------------------------------------------------------------------------
# Streaming safetensors writer
# ---------------------------------------------------------------------------------------------


class SafetensorsStreamWriter:
    """Write safetensors files whose tensors arrive one at a time, in a known order.

    ``plan`` lists ``(name, shape, dtype)`` in the order :meth:`write` will be called. Files are cut
    when the next tensor would exceed ``max_shard_bytes``; each file's header is written when the
    file is opened (shapes are known), then tensor bytes are appended as they come, so only the
    tensor being written is in memory."""

    def __init__(self, out_dir: Path, plan: Sequence[tuple[str, tuple[int, ...], np.dtype]], max_shard_bytes: int):
        self.out_dir = Path(out_dir)
        self.shards: list[list[tuple[str, tuple[int, ...], np.dtype]]] = [[]]
        size = 0
        for name, shape, dtype in plan:
            nbytes = int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize
            if self.shards[-1] and size + nbytes > max_shard_bytes:
                self.shards.append([])
                size = 0
            self.shards[-1].append((name, tuple(shape), np.dtype(dtype)))
            size += nbytes
        n = len(self.shards)
        self.files = ["model.safetensors"] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
        self._order = [(i, entry) for i, shard in enumerate(self.shards) for entry in shard]
        self._pos = 0
        self._fh = None
        self._file_index = -1
        self.total_bytes = 0

    def _open(self, i: int) -> None:
        if self._fh is not None:
            self._fh.close()
        header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
        offset = 0
        for name, shape, dtype in self.shards[i]:
            nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
            header[name] = {"dtype": _ST_DTYPES[dtype], "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
            offset += nbytes
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)  # data starts 8-byte aligned
        self._fh = open(self.out_dir / (self.files[i] + ".partial"), "wb")
        self._fh.write(struct.pack("<Q", len(raw)))
        self._fh.write(raw)
        self._file_index = i

    def write(self, name: str, array: np.ndarray) -> None:
        i, (want, shape, dtype) = self._order[self._pos]
        if name != want or tuple(array.shape) != shape or array.dtype != dtype:
            raise ConvertError(f"internal: expected tensor {want} {shape} {dtype}, got {name} {array.shape} {array.dtype}")
        if i != self._file_index:
            self._open(i)
        self._fh.write(np.ascontiguousarray(array).reshape(-1).view(np.uint8))  # a view: no copy
        self.total_bytes += array.nbytes
        self._pos += 1

    def close(self) -> None:
        if self._pos != len(self._order):
            raise ConvertError(f"internal: {len(self._order) - self._pos} planned tensors were not written")
        if self._fh is not None:
            self._fh.close()
        for f in self.files:
            (self.out_dir / (f + ".partial")).replace(self.out_dir / f)
        if len(self.files) > 1:
            weight_map = {name: self.files[i] for i, (name, _, _) in self._order}
            (self.out_dir / "model.safetensors.index.json").write_text(json.dumps(
                {"metadata": {"total_size": self.total_bytes}, "weight_map": weight_map}, indent=2))


# ---------------------------------------------------------------------------------------------
# Reading a training checkpoint one array at a time
# ---------------------------------------------------------------------------------------------


def _step_dir(ckpt: paths.AnyPath, step: Optional[int]) -> tuple[int, paths.AnyPath]:
    steps = sorted(int(p.name) for p in ckpt.iterdir() if p.is_dir() and p.name.isdigit()) if ckpt.is_dir() else []
    if paths.is_url(ckpt):  # an unfinished save on gs:// has its final name but no commit marker yet
        steps = [s for s in steps if ocp.path.step.is_path_finalized(ckpt / str(s))]
    if (ckpt / "state").is_dir() and not steps:  # a step directory was given
        return int(ckpt.name) if ckpt.name.isdigit() else 0, ckpt
    if not steps:
        raise ConvertError(f"--ckpt {ckpt}: no checkpoint steps found (expected <dir>/<step>/state)")
    if step is None:
        return steps[-1], ckpt / str(steps[-1])
    if step not in steps:
        raise ConvertError(f"--step {step}: not in {ckpt} (available: {steps})")
    return step, ckpt / str(step)


class _StateReader:
    """The ``params`` arrays of a checkpoint's state item, read one at a time as host numpy arrays."""

    def __init__(self, state_dir: paths.AnyPath):
        quiet_orbax_logs()
        self.dir = state_dir
        self._ocp = ocp
        self._ckptr = ocp.PyTreeCheckpointer()
        try:
            tree = self._ckptr.metadata(state_dir).item_metadata.tree
        except Exception as e:  # noqa: BLE001
            raise ConvertError(f"{state_dir}: cannot read the checkpoint metadata ({type(e).__name__}: {e})") from None
        if not isinstance(tree, dict) or "params" not in tree:
            keys = list(tree) if isinstance(tree, dict) else type(tree).__name__
            raise ConvertError(f"{state_dir}: the state has no 'params' entry (top-level keys: {keys})")
        self.leaves: dict[tuple[str, ...], Any] = {}  # our param path (no trailing 'value') -> metadata

        def walk(node: Any, path: tuple[str, ...]) -> None:
            if isinstance(node, dict):
                for k, v in node.items():
                    walk(v, path + (str(k),))
            else:
                self.leaves[path[:-1] if path and path[-1] == "value" else path] = (node, path)

        walk(tree["params"], ())

    def shape(self, path: tuple[str, ...]) -> tuple[int, ...]:
        return tuple(self.leaves[path][0].shape)

    def read(self, path: tuple[str, ...]) -> np.ndarray:
        ocp = self._ocp
        full = self.leaves[path][1]
        item: Any = 0
        args: Any = ocp.RestoreArgs(restore_type=np.ndarray)
        for k in reversed(("params",) + full):
            item, args = {k: item}, {k: args}
        out = self._ckptr.restore(self.dir, args=ocp.args.PyTreeRestore(item=item, restore_args=args,
                                                                        partial_restore=True))
        for k in ("params",) + full:
            out = out[k]
        return out


def _hf_plan(cfg: Any, reader: _StateReader, np_dtype: np.dtype) -> list[tuple[str, tuple[str, ...], Optional[int], tuple]]:
    """``(hf_name, our_path, layer or None, hf_shape)`` in reading order (one stored array after another)."""

    expected = expected_tensors(cfg)
    plan = [("model.embed_tokens.weight", ("embed",), None)]
    for ours, theirs in LAYER_HF.items():
        plan += [(f"model.layers.{i}.{theirs}", ("layers", ours), i) for i in range(cfg.num_hidden_layers)]
    plan.append(("model.norm.weight", ("final_norm",), None))
    if not cfg.tie_word_embeddings:
        plan.append(("lm_head.weight", ("lm_head",), None))
    needed = {p for _, p, _ in plan}
    for path in needed:
        if path not in reader.leaves:
            raise ConvertError(f"{reader.dir}: parameter '{'.'.join(path)}' is missing from the checkpoint "
                               f"(stored: {', '.join('.'.join(p) for p in sorted(reader.leaves))})")
    extra = sorted(set(reader.leaves) - needed)
    if extra:
        raise ConvertError(f"{reader.dir}: parameters {['.'.join(p) for p in extra]} have no HF counterpart in a "
                           f"{'tied' if cfg.tie_word_embeddings else 'untied'} {cfg.num_hidden_layers}-layer Qwen3; "
                           "is hf_config / --base-model the right architecture?")
    out = []
    for name, path, layer in plan:
        out.append((name, path, layer, expected[name]))
    return out


def _to_hf_tensor(path: tuple[str, ...], arr: np.ndarray, layer: Optional[int], np_dtype: np.dtype) -> np.ndarray:
    """Our stored array (a whole stacked leaf) -> the HF tensor of ``layer``, contiguous, in ``np_dtype``."""

    if path[0] == "layers":
        t = layer_to_hf(path[1], arr[layer])
    elif path[0] == "lm_head":
        t = arr.T
    else:
        t = arr
    # astype(copy=False) keeps a same-dtype view; ascontiguousarray then copies a transposed view once.
    return np.ascontiguousarray(t.astype(np_dtype, copy=False))


def _load_extra(step_dir: paths.AnyPath) -> dict:
    f = step_dir / "extra" / "metadata"
    if not f.is_file():
        return {}
    try:
        return json.loads(f.read_text())
    except json.JSONDecodeError as e:
        raise ConvertError(f"{f}: not valid JSON ({e})") from None


def orbax_to_hf(ckpt: Union[str, os.PathLike], out: Union[str, os.PathLike], *, step: Optional[int] = None,
                dtype: Optional[str] = None, base_model: Optional[str] = None,
                max_shard_bytes: int = 4 * 1024**3, progress: bool = False) -> paths.AnyPath:
    """Export the params of checkpoint ``step`` (default: newest) in ``ckpt`` to an HF directory ``out``."""

    step, step_dir = _step_dir(paths.absolute(ckpt), step)  # orbax reads only absolute local paths
    extra = _load_extra(step_dir)
    run_cfg = extra.get("config") or {}
    model_path = base_model or (run_cfg.get("model") or {}).get("path")
    if extra.get("hf_config"):
        cfg = config_from_hf(extra["hf_config"], f"{step_dir}/extra (hf_config)")
    elif model_path:
        cfg = read_config(model_path)
    else:
        raise ConvertError(f"{step_dir}: the checkpoint names no architecture (no hf_config in extra, no model.path "
                           "in its config); pass --base-model DIR (the HF model it was trained from)")
    reader = _StateReader(step_dir / "state")
    stored = np.dtype(reader.leaves[("embed",)][0].dtype) if ("embed",) in reader.leaves else np.dtype("float32")
    np_dtype = _np_dtype(dtype) if dtype else stored
    dtype_name = "bfloat16" if np_dtype == np.dtype(ml_dtypes.bfloat16) else np_dtype.name
    plan = _hf_plan(cfg, reader, np_dtype)
    for name, path, layer, hf_shape in plan:  # shapes agree before anything is written
        s = reader.shape(path)
        got = s[1:] if layer is not None else s
        want_elems = int(np.prod(hf_shape))
        if int(np.prod(got)) != want_elems or (layer is not None and s[0] != cfg.num_hidden_layers):
            raise ConvertError(f"{reader.dir}: parameter '{'.'.join(path)}' has shape {s}, which does not fit HF "
                               f"tensor {name} {hf_shape} of the architecture; wrong hf_config / --base-model?")

    dest = paths.as_path(out)
    if paths.local_path(dest) is None:  # safetensors are written locally, then copied to the URL
        with tempfile.TemporaryDirectory(prefix="sod_jax_convert_") as tmp:
            _write_hf(reader, plan, cfg, np_dtype, dtype_name, Path(tmp), run_cfg, model_path, base_model,
                      max_shard_bytes, progress)
            return paths.upload_dir(Path(tmp), dest)
    dest.mkdir(parents=True, exist_ok=True)
    for stale in list(dest.glob("model*.safetensors")) + list(dest.glob("model.safetensors.index.json")):
        stale.unlink()
    return _write_hf(reader, plan, cfg, np_dtype, dtype_name, dest, run_cfg, model_path, base_model, max_shard_bytes,
                     progress)


def _write_hf(reader: "_StateReader", plan: list, cfg: Any, np_dtype: np.dtype, dtype_name: str, out: Path,
              run_cfg: dict, model_path: Optional[str], base_model: Optional[str], max_shard_bytes: int,
              progress: bool) -> Path:
    """The HF directory ``out`` (local) from the checkpoint arrays: safetensors, config, tokenizer."""
    writer = SafetensorsStreamWriter(out, [(n, shp, np_dtype) for n, _, _, shp in plan], max_shard_bytes)
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(plan), unit="tensor", desc="orbax-to-hf")
    current: tuple[Optional[tuple], Optional[np.ndarray]] = (None, None)
    for name, path, layer, _ in plan:
        if current[0] != path:
            current = (None, None)  # release the previous stored array before reading the next
            current = (path, reader.read(path))
        t = _to_hf_tensor(path, current[1], layer, np_dtype)
        if layer is None or layer == cfg.num_hidden_layers - 1:
            current = (None, None)
        writer.write(name, t)
        del t
        if bar is not None:
            bar.update(1)
    writer.close()
    if bar is not None:
        bar.close()

    (out / "config.json").write_text(json.dumps(config_to_hf(cfg, dtype_name), indent=2))
    tok_dir = _tokenizer_source(run_cfg, base_model)
    gen_src = Path(model_path) / "generation_config.json" if model_path else None
    if gen_src is not None and gen_src.is_file():
        shutil.copy2(gen_src, out / "generation_config.json")
    else:
        gen = {"bos_token_id": cfg.bos_token_id, "eos_token_id": cfg.eos_token_id, "do_sample": True,
               "temperature": 0.6, "top_p": 0.95, "top_k": 20}
        (out / "generation_config.json").write_text(json.dumps(gen, indent=2))
    copied = []
    if tok_dir is not None:
        for f in TOKENIZER_FILES:
            if (Path(tok_dir) / f).is_file():
                shutil.copy2(Path(tok_dir) / f, out / f)
                copied.append(f)
    if not copied:
        print(f"warning: no tokenizer files copied (looked in {tok_dir or 'nothing: no model.path / sft.tokenizer'}); "
              "pass --base-model DIR to include them", file=sys.stderr)
    return out


def _tokenizer_source(run_cfg: dict, base_model: Optional[str]) -> Optional[str]:
    if base_model:
        return base_model
    sft = run_cfg.get("sft") or {}
    return sft.get("tokenizer") or (run_cfg.get("model") or {}).get("path")


# ---------------------------------------------------------------------------------------------
# HF -> orbax
# ---------------------------------------------------------------------------------------------


def hf_to_orbax(hf: Union[str, os.PathLike], out: Union[str, os.PathLike], *, step: int = 0,
                dtype: str = "float32") -> paths.AnyPath:
    """Write the HF checkpoint ``hf`` as checkpoint ``step`` of ``out`` (state ``{"params": ...}``)."""

    model = load_pretrained(hf, dtype=dtype, param_dtype=dtype)
    params = nnx.state(model, nnx.Param)
    run_cfg = Config().to_dict()
    run_cfg["model"].update(path=str(Path(hf).absolute()), param_dtype=dtype)
    extra = {"config": run_cfg, "hf_config": config_to_hf(model.config, dtype), "source": {"hf": str(Path(hf).absolute())}}
    ckpt = Checkpointer(out, save_every=0, keep=1_000_000, async_save=False)
    if step in ckpt.all_steps():
        raise ConvertError(f"--out {out}: step {step} already exists; pick another --step or directory")
    ckpt.save(step, {"params": params}, extra=extra, force=True)
    ckpt.close()
    return paths.as_path(out) / str(step)


# ---------------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m sod_jax.convert", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    a = sub.add_parser("orbax-to-hf", help="export a training checkpoint's params as an HF safetensors checkpoint")
    a.add_argument("--ckpt", required=True, help="checkpoint directory (holding <step>/ dirs) or one step directory")
    a.add_argument("--step", type=int, default=None, help="step to export (default: the newest)")
    a.add_argument("--out", required=True, help="output directory (created; old model*.safetensors are replaced)")
    a.add_argument("--dtype", choices=("bfloat16", "float32"), default=None, help="tensor dtype (default: as stored)")
    a.add_argument("--base-model", default=None,
                   help="HF directory of the base model: architecture when the checkpoint names none, and the "
                        "tokenizer files (default: the run config's sft.tokenizer / model.path)")
    a.add_argument("--max-shard-size", default="4GB", help="cut safetensors files above this size (e.g. 4GB, 500MB)")
    a.add_argument("--no-progress", action="store_true", help="no progress bar")
    b = sub.add_parser("hf-to-orbax", help="import an HF Qwen3 checkpoint as a checkpoint directory")
    b.add_argument("--hf", required=True, help="HF checkpoint directory (config.json + safetensors)")
    b.add_argument("--out", required=True, help="checkpoint directory to write <step>/ into")
    b.add_argument("--step", type=int, default=0, help="step number to store it as (default 0)")
    b.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32", help="stored param dtype")
    return p


def main(argv: Optional[list[str]] = None) -> int:
    args = build_parser().parse_args(argv)

    try:
        if args.command == "orbax-to-hf":
            out = orbax_to_hf(args.ckpt, args.out, step=args.step, dtype=args.dtype, base_model=args.base_model,
                              max_shard_bytes=parse_size(args.max_shard_size), progress=not args.no_progress)
        else:
            out = hf_to_orbax(args.hf, args.out, step=args.step, dtype=args.dtype)
    except (ConvertError, CheckpointError, FileNotFoundError, paths.StorageError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
