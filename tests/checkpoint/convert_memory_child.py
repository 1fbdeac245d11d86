"""Peak host memory of ``orbax-to-hf`` in a fresh process (test support).

``make DIR``: write a checkpoint of a Qwen3 whose 8 big tensors (embedding, q, k, v, o, gate, up,
down of one layer; tied head) all have the same size, plus a tiny one for warming up.
``measure DIR OUT {stream,full}``: warm up on the tiny checkpoint, then reset the peak-RSS mark
(/proc/self/clear_refs) and either export DIR with ``orbax_to_hf`` (stream) or restore all its
params at once (full: the non-streaming reference). Prints JSON: peak RSS growth and tracemalloc
peak in bytes, and the size of one big tensor. Run with MALLOC_MMAP_THRESHOLD_ fixed so freed
buffers go back to the OS and RSS follows live memory."""

import json
import sys
import tracemalloc
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

D, WIDE = 512, 8192  # every big tensor is WIDE x D float32 = 16 MiB


def arch(wide: int, d: int, tied_layers: int = 1):
    from sod_jax.models.qwen3 import Qwen3Config

    return Qwen3Config(vocab_size=wide, hidden_size=d, intermediate_size=wide, num_hidden_layers=tied_layers,
                       num_attention_heads=8, num_key_value_heads=8, head_dim=wide // 8, tie_word_embeddings=True,
                       bos_token_id=1, eos_token_id=2)


def make(root: Path) -> None:
    from flax import nnx

    from sod_jax.checkpoint import Checkpointer
    from sod_jax.models.hf import config_to_hf
    from sod_jax.models.qwen3 import init_model

    for name, cfg in (("big", arch(WIDE, D)), ("tiny", arch(64, 16))):
        params = nnx.state(init_model(cfg, seed=0), nnx.Param)
        ck = Checkpointer(root / name, save_every=1, keep=1)
        ck.save(1, {"params": params}, extra={"hf_config": config_to_hf(cfg, "float32")})
        ck.close()


def rss() -> tuple[int, int]:
    fields = dict(line.split(":", 1) for line in open("/proc/self/status"))
    return int(fields["VmRSS"].split()[0]) * 1024, int(fields["VmHWM"].split()[0]) * 1024


def measure(root: Path, out: Path, mode: str) -> None:
    import numpy as np
    import orbax.checkpoint as ocp

    from sod_jax.convert import orbax_to_hf

    orbax_to_hf(root / "tiny", out / "tiny")  # imports, thread pools, tensorstore contexts
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset the peak-RSS mark to the current RSS
    before, _ = rss()
    tracemalloc.start()
    if mode == "stream":
        orbax_to_hf(root / "big", out / "big")
    else:
        meta = ocp.PyTreeCheckpointer().metadata(root / "big" / "1" / "state").item_metadata.tree
        args = {"params": __import__("jax").tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), meta["params"])}
        tree = ocp.PyTreeCheckpointer().restore(root / "big" / "1" / "state", args=ocp.args.PyTreeRestore(
            item={"params": __import__("jax").tree.map(lambda _: 0, meta["params"])}, restore_args=args))
        del tree
    _, traced_peak = tracemalloc.get_traced_memory()
    _, hwm = rss()
    print(json.dumps({"rss_peak_growth": hwm - before, "traced_peak": traced_peak, "tensor_bytes": WIDE * D * 4}))


if __name__ == "__main__":
    if sys.argv[1] == "make":
        make(Path(sys.argv[2]))
    else:
        measure(Path(sys.argv[2]), Path(sys.argv[3]), sys.argv[4])
