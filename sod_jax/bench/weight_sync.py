"""The refresh of the engine's sampling copy after an update, against a host round trip.

The trainer's params (``param_dtype``, fsdp-sharded over the mesh) become the engine's sampling copy
(compute dtype, the sampling layout: no fsdp) after every update (``time/weight_sync`` in a run's
metrics). Ours is :meth:`sod_jax.rollout.engine.Engine.update_params`: one jitted cast + reshard
on the devices. The baseline is what a loop without it does: fetch the params to the host, cast
there and put them back in the sampling layout. Default: the Qwen3-0.6B architecture on the
available (e.g. 8 fake CPU) devices.
"""

from __future__ import annotations

import argparse

import jax
import numpy as np

from sod_jax import parallel
from sod_jax.bench.timing import best_time_pair
from sod_jax.models import init_model, preset
from sod_jax.models.qwen3 import as_dtype
from sod_jax.rollout import Engine


def run(args: argparse.Namespace) -> list[dict]:
    n = min(args.devices, jax.device_count())
    mesh = parallel.make_mesh(1, n, 1, devices=jax.devices()[:n])
    cfg = preset(args.preset).replace(dtype="bfloat16", param_dtype="float32")
    model = parallel.shard_module(init_model(cfg, seed=0), mesh)
    engine = Engine(model, num_slots=n, max_len=64, decode_steps=8, prefill_buckets=(32,))
    w = model.weights()
    target = jax.tree.map(lambda a: a.sharding, engine.params)
    dt = as_dtype(cfg.dtype)

    def ours():
        engine.update_params(w)
        jax.block_until_ready(engine.params)

    def host_round_trip():
        host = jax.device_get(w)
        stacked = host.pop("layers")
        host = {k: np.asarray(v).astype(dt) for k, v in host.items()}
        host["layers"] = [{k: np.asarray(v[i]).astype(dt) for k, v in stacked.items()}
                          for i in range(cfg.num_hidden_layers)]
        jax.block_until_ready(jax.device_put(host, target))

    ours()
    host_round_trip()
    t_ours, t_base = best_time_pair(ours, host_round_trip, args.repeats)
    gb = cfg.num_params() * 4 / 1e9
    return [{"bench": "weight-sync", "preset": args.preset, "devices": n, "params_gb_fp32": round(gb, 2),
             "ours": round(t_ours, 3), "baseline": round(t_base, 3), "ratio": round(t_base / t_ours, 2),
             "unit": "seconds per refresh (lower is better; ratio = baseline / ours)",
             "baseline_impl": "device_get, cast on the host, device_put into the sampling layout",
             "device": jax.devices()[0].platform}]


def add_parser(sub) -> None:
    p = sub.add_parser("weight-sync", help="refresh of the engine's sampling copy vs a host round trip")
    p.add_argument("--preset", default="qwen3-0.6b", help="model architecture (random weights)")
    p.add_argument("--devices", type=int, default=2,
                   help="devices of the fsdp mesh (fake CPU devices hold a full sampling copy each in host RAM)")
    p.add_argument("--repeats", type=int, default=3)
    p.set_defaults(fn=run)
