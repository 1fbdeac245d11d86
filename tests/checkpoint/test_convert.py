"""python -m sod_jax.convert: orbax-to-hf loads in transformers with our logits, hf-to-orbax then
orbax-to-hf is the identity on every tensor, sharded output with its index, bounded host memory."""

import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from safetensors.numpy import load_file

from sod_jax.checkpoint import Checkpointer
from sod_jax.convert import ConvertError, main, orbax_to_hf
from sod_jax.models.hf import config_to_hf
from sod_jax.models.qwen3 import Qwen3Config, init_model

REPO = Path(__file__).resolve().parents[2]

UNTIED = Qwen3Config(vocab_size=160, hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
                     num_key_value_heads=2, head_dim=24, tie_word_embeddings=False, rope_theta=1e6,
                     bos_token_id=1, eos_token_id=2, max_position_embeddings=512)


def _hf_tensors(d: Path) -> dict:
    out = {}
    for f in sorted(d.glob("*.safetensors")):
        out.update(load_file(f))
    return out


@pytest.fixture(scope="module")
def trained_ckpt(tmp_path_factory, tokenizer_dir):
    """A training-style checkpoint (step, params, opt_state-like entry, rng) of our own random model."""
    root = tmp_path_factory.mktemp("ckpt")
    model = init_model(UNTIED, seed=3)
    params = nnx.state(model, nnx.Param)
    params = jax.tree.map(lambda x: x + 0.01 * jnp.arange(x.size, dtype=x.dtype).reshape(x.shape) / x.size, params)
    nnx.update(model, params)
    state = {"step": jnp.int32(7), "params": params, "opt_state": {"mu": params},
             "rng": jax.random.key_data(jax.random.PRNGKey(0))}
    extra = {"config": {"model": {"path": None}, "sft": {"tokenizer": str(tokenizer_dir)}},
             "hf_config": config_to_hf(UNTIED, "float32")}
    ck = Checkpointer(root, save_every=1, keep=2)
    ck.save(7, state, extra=extra)
    ck.close()
    return root, model


def test_orbax_to_hf_loads_in_transformers_with_our_logits(trained_ckpt, tmp_path, tokenizer_dir):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    root, model = trained_ckpt
    out = tmp_path / "hf"
    # small shards: several files plus the index, as for a real model above the size limit
    assert main(["orbax-to-hf", "--ckpt", str(root), "--out", str(out), "--max-shard-size", "60KB",
                 "--no-progress"]) == 0
    index = json.loads((out / "model.safetensors.index.json").read_text())
    files = sorted({f for f in index["weight_map"].values()})
    assert len(files) > 2 and all((out / f).is_file() for f in files) and not (out / "model.safetensors").exists()
    for f in ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json"):
        assert (out / f).is_file(), f
    AutoTokenizer.from_pretrained(out)

    hf = AutoModelForCausalLM.from_pretrained(out, torch_dtype=torch.float32, attn_implementation="eager").eval()
    ids = np.random.default_rng(0).integers(0, UNTIED.vocab_size, (2, 17))
    with torch.no_grad():
        theirs = hf(torch.tensor(ids)).logits.numpy()
    ours = np.asarray(model(jnp.asarray(ids, jnp.int32)))
    np.testing.assert_allclose(ours, theirs, atol=1e-4, rtol=0)


def test_bfloat16_export(trained_ckpt, tmp_path, monkeypatch):
    import ml_dtypes

    root, model = trained_ckpt
    # a relative --ckpt, as `demo compare` passes it (orbax itself reads only absolute local paths)
    monkeypatch.chdir(root.parent)
    orbax_to_hf(root.name, tmp_path, step=7, dtype="bfloat16")
    t = load_file(tmp_path / "model.safetensors")
    assert json.loads((tmp_path / "config.json").read_text())["torch_dtype"] == "bfloat16"
    want = np.asarray(model.embed[...]).astype(ml_dtypes.bfloat16)
    assert t["model.embed_tokens.weight"].dtype == want.dtype
    np.testing.assert_array_equal(t["model.embed_tokens.weight"], want)


def test_hf_to_orbax_to_hf_is_identity(hf_checkpoints, tmp_path):
    for name in ("untied_gqa2_hd24", "tied_gqa4_hd32"):
        src, _ = hf_checkpoints[name]
        ck, back = tmp_path / name / "ck", tmp_path / name / "hf"
        assert main(["hf-to-orbax", "--hf", str(src), "--out", str(ck), "--step", "0"]) == 0
        assert main(["orbax-to-hf", "--ckpt", str(ck), "--out", str(back), "--no-progress"]) == 0
        a, b = _hf_tensors(src), _hf_tensors(back)
        if json.loads((src / "config.json").read_text())["tie_word_embeddings"]:
            a.pop("lm_head.weight", None)
        assert a.keys() == b.keys()
        for k in a:
            assert a[k].dtype == b[k].dtype and np.array_equal(a[k], b[k]), k
        restored = Checkpointer(ck, save_every=0, keep=1).restore_extra()
        assert restored[0] == 0 and restored[1]["config"]["model"]["path"] == str(src.absolute())


def test_errors_name_what_to_fix(trained_ckpt, tmp_path, capsys):
    root, _ = trained_ckpt
    assert main(["orbax-to-hf", "--ckpt", str(root), "--step", "3", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "--step 3: not in" in err and "available: [7]" in err
    with pytest.raises(ConvertError, match="no checkpoint steps found"):
        orbax_to_hf(tmp_path / "nothing", tmp_path / "o")
    ck = Checkpointer(tmp_path / "noarch", save_every=1, keep=1)
    ck.save(1, {"params": {"embed": jnp.zeros((4, 2))}}, extra={})
    ck.close()
    with pytest.raises(ConvertError, match="--base-model"):
        orbax_to_hf(tmp_path / "noarch", tmp_path / "o")


def test_help():
    p = subprocess.run([sys.executable, "-m", "sod_jax.convert", "orbax-to-hf", "--help"], cwd=REPO,
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 0 and "--max-shard-size" in p.stdout


@pytest.mark.slow
def test_orbax_to_hf_peak_host_memory_below_three_tensors(tmp_path):
    """8 equal 16 MiB tensors: the streamed export peaks below 3 of them (RSS and tracemalloc), while
    restoring all params at once (the reference) needs more than 6, so the measurement can tell."""
    child = Path(__file__).with_name("convert_memory_child.py")
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env.update(JAX_PLATFORMS="cpu", MALLOC_MMAP_THRESHOLD_="131072", PYTHONPATH=str(REPO))

    def run(*args) -> str:
        p = subprocess.run([sys.executable, str(child), *map(str, args)], cwd=REPO, env=env, capture_output=True,
                           text=True, timeout=600)
        assert p.returncode == 0, p.stderr[-3000:]
        return p.stdout

    run("make", tmp_path / "ck")
    stream = json.loads(run("measure", tmp_path / "ck", tmp_path / "out", "stream").splitlines()[-1])
    full = json.loads(run("measure", tmp_path / "ck", tmp_path / "out_full", "full").splitlines()[-1])
    t = stream["tensor_bytes"]
    assert stream["rss_peak_growth"] < 3 * t, stream
    assert stream["traced_peak"] < 3 * t, stream
    assert full["rss_peak_growth"] > 6 * t, full
    assert len(load_file(tmp_path / "out" / "big" / "model.safetensors")) == 8 + 5  # 8 big tensors, 5 norms
