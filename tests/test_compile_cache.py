"""sod_jax.compile_cache: the cache directory a config names, and compilations counted from JAX's
own events (new programs, their seconds, persistent-cache hits)."""

import json
import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import pytest

from sod_jax import compile_cache
from sod_jax.compile_cache import CompileCounter, resolve_cache_dir


def test_resolve_cache_dir(tmp_path):
    out = str(tmp_path / "run")
    assert resolve_cache_dir("", out) == os.path.join(out, "xla_cache")
    assert resolve_cache_dir("", "runs/sod") == os.path.abspath("runs/sod/xla_cache")
    assert resolve_cache_dir("none", out) is None and resolve_cache_dir("None", out) is None
    assert resolve_cache_dir("gs://bucket/xla", out) == "gs://bucket/xla"
    assert resolve_cache_dir("", "gs://bucket/run/") == "gs://bucket/run/xla_cache"
    assert resolve_cache_dir(str(tmp_path / "c"), out) == str(tmp_path / "c")


def test_the_environment_wins(monkeypatch, tmp_path):
    monkeypatch.setenv("JAX_COMPILATION_CACHE_DIR", str(tmp_path / "env"))
    before = jax.config.jax_compilation_cache_dir
    assert compile_cache.enable("", str(tmp_path / "run")) == str(tmp_path / "env")
    assert jax.config.jax_compilation_cache_dir == before  # untouched: JAX read the variable at import
    assert not (tmp_path / "run").exists()


def test_counts_new_programs_and_not_cached_calls():
    counter = CompileCounter()

    @jax.jit
    def f(x):
        return jnp.sin(x) * 3.0 + jnp.cos(x)

    x = jnp.arange(7.0)
    f(x).block_until_ready()
    first = counter.take()
    assert first.compiles >= 1 and first.seconds > 0
    f(x).block_until_ready()
    assert counter.take().compiles == 0
    f(jnp.arange(9.0)).block_until_ready()  # a new shape: a new program
    assert counter.take().compiles >= 1
    m = first.metrics(cache=False)
    assert set(m) == {"compiles", "compile_s"}
    assert set(first.metrics("startup_")) == {"startup_compiles", "startup_compile_s", "startup_compile_cache_hits",
                                              "startup_compile_cache_misses"}


CHILD = textwrap.dedent("""
    import json, os, sys
    os.environ.pop("JAX_COMPILATION_CACHE_DIR", None)
    import jax, jax.numpy as jnp
    from sod_jax import compile_cache
    used = compile_cache.enable(sys.argv[1], sys.argv[2])
    c = compile_cache.CompileCounter()
    jax.jit(lambda x: jnp.tanh(x) @ x.T + 1.5)(jnp.ones((4, 4))).block_until_ready()
    s = c.take()
    print(json.dumps(dict(dir=used, compiles=s.compiles, hits=s.cache_hits, misses=s.cache_misses)))
""")


@pytest.mark.slow
def test_a_second_process_hits_the_persistent_cache(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("JAX_PERSISTENT_CACHE")}
    env.pop("JAX_COMPILATION_CACHE_DIR", None)
    env["XLA_FLAGS"] = "--xla_force_host_platform_device_count=1"
    out = tmp_path / "run"

    def child():
        p = subprocess.run([sys.executable, "-c", CHILD, "", str(out)], capture_output=True, text=True, env=env,
                           timeout=300, check=True)
        return json.loads(p.stdout.strip().splitlines()[-1])

    first, second = child(), child()
    assert first["dir"] == str(out / "xla_cache") and any((out / "xla_cache").iterdir())
    assert first["compiles"] >= 1 and first["misses"] >= 1 and first["hits"] == 0, first
    assert second["hits"] >= 1 and second["misses"] == 0, second
