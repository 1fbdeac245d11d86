"""Run directories and checkpoints on shared storage (``gs://`` URLs), offline.

The ``fake_gcs`` fixture stands in for one Google Cloud Storage service with two front ends over
the same objects (files under a temporary folder): the ``gs://`` backend of ``etils.epath`` (what
the project's path objects, orbax's directory handling and JAX use) and a loopback HTTP server
speaking the subset of the GCS JSON API that TensorStore's ``gcs`` driver uses (what orbax writes
array data through), reached with ``TENSORSTORE_GCS_HTTP_URL``. So a ``gs://bucket/run`` run
directory, its plots and an orbax save/restore go through exactly the code paths of a pod's run,
and a code path that turned the URL into a local ``pathlib.Path`` would write a local ``gs:``
folder, which every test checks is absent.
"""

from __future__ import annotations

import json
import logging
import os
import pathlib
import threading
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from etils.epath import backend as epath_backend
from etils.epath import gpath

from sod_jax import compile_cache, paths
from sod_jax.checkpoint import Checkpointer
from sod_jax.config import Config
from sod_jax.tracking import RunDir, append_jsonl, read_jsonl, write_jsonl
from sod_jax.tracking import main as tracking_main

BUCKET = "sod-test-bucket"


# ---------------------------------------------------------------------------------------------
# The fake GCS service
# ---------------------------------------------------------------------------------------------


class _StoreBackend(epath_backend._OsPathBackend):
    """epath's ``gs://`` backend over local files: ``gs://b/k`` is ``<root>/b/k``."""

    def __init__(self, root: pathlib.Path):
        self.root = root

    def _p(self, path) -> str:
        s = os.fspath(path)
        assert s.startswith("gs://"), s
        return str(self.root / s[len("gs://"):])

    def _gs(self, local) -> str:
        return "gs://" + os.path.relpath(os.fspath(local), self.root)

    def open(self, path, mode):
        local = self._p(path)
        if "r" not in mode:  # an object store needs no parent folder before a write
            os.makedirs(os.path.dirname(local), exist_ok=True)
        return super().open(local, mode)

    def exists(self, path):
        return super().exists(self._p(path))

    def isdir(self, path):
        return super().isdir(self._p(path))

    def listdir(self, path):
        return super().listdir(self._p(path))

    def glob(self, path):
        return [self._gs(p) for p in super().glob(self._p(path))]

    def walk(self, top, *, top_down=True, on_error=None):
        for root, dirs, files in super().walk(self._p(top), top_down=top_down, on_error=on_error):
            yield self._gs(root), dirs, files

    def makedirs(self, path, *, exist_ok=False, mode=None):
        return super().makedirs(self._p(path), exist_ok=exist_ok)

    def mkdir(self, path, *, exist_ok=False, mode=None):
        return super().mkdir(self._p(path), exist_ok=exist_ok)

    def rmtree(self, path):
        return super().rmtree(self._p(path))

    def remove(self, path):
        return super().remove(self._p(path))

    def rename(self, path, dst):
        return super().rename(self._p(path), self._p(dst))

    def replace(self, path, dst):
        return super().replace(self._p(path), self._p(dst))

    def copy(self, path, dst, overwrite):
        return super().copy(self._p(path), self._p(dst), overwrite=overwrite)

    def stat(self, path):
        return super().stat(self._p(path))


class _Generations:
    """GCS object generations for files that either front end may have written: a file whose
    (mtime, size, inode) changed since it was last seen gets a new generation."""

    def __init__(self):
        self.lock = threading.Lock()
        self.seen: dict[str, tuple[tuple, int]] = {}
        self.counter = 0

    def of(self, f: pathlib.Path) -> int:
        st = f.stat()
        key = (st.st_mtime_ns, st.st_size, st.st_ino)
        with self.lock:
            old = self.seen.get(str(f))
            if old is not None and old[0] == key:
                return old[1]
            self.counter += 1
            self.seen[str(f)] = (key, self.counter)
            return self.counter

    def bump(self, f: pathlib.Path) -> int:
        with self.lock:
            self.seen.pop(str(f), None)
        return self.of(f)


def _gcs_handler(root: pathlib.Path, gens: _Generations, write_lock: threading.Lock, requests: list):
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def handle_one_request(self):
            super().handle_one_request()
            if self.command:
                requests.append((self.command, self.path))

        def log_message(self, *args):  # keep test output clean
            pass

        def _reply(self, code: int, body: bytes = b"", headers: dict | None = None) -> None:
            self.send_response(code)
            for k, v in (headers or {}).items():
                self.send_header(k, v)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if body and self.command != "HEAD":
                self.wfile.write(body)

        def _meta(self, bucket: str, name: str, f: pathlib.Path) -> dict:
            return {"kind": "storage#object", "name": name, "bucket": bucket, "generation": str(gens.of(f)),
                    "metageneration": "1", "size": str(f.stat().st_size), "contentType": "application/octet-stream",
                    "updated": "2026-01-01T00:00:00.000Z"}

        def _parse(self):
            url = urllib.parse.urlsplit(self.path)
            q = {k: v[-1] for k, v in urllib.parse.parse_qs(url.query, keep_blank_values=True).items()}
            parts = url.path.split("/")
            # /storage/v1/b/<bucket>/o[/<object>]  or  /upload/storage/v1/b/<bucket>/o
            upload = parts[1] == "upload"
            if upload:
                parts = parts[1:]
            bucket = parts[4]
            obj = urllib.parse.unquote("/".join(parts[6:])) if len(parts) > 6 else None
            return upload, bucket, obj, q

        def _conditions(self, q: dict, f: pathlib.Path) -> int | None:
            """The status a failed ifGeneration(Not)Match condition gives, else None."""
            live = f.is_file()
            if "ifGenerationMatch" in q:
                want = int(q["ifGenerationMatch"])
                if (want == 0 and live) or (want != 0 and (not live or gens.of(f) != want)):
                    return 412
            if "ifGenerationNotMatch" in q and live and gens.of(f) == int(q["ifGenerationNotMatch"]):
                return 304
            return None

        def do_GET(self):
            _, bucket, obj, q = self._parse()
            base = root / bucket
            if obj is None:  # list objects
                names = sorted(p.relative_to(base).as_posix() for p in base.rglob("*") if p.is_file()) \
                    if base.is_dir() else []
                prefix, start, end = q.get("prefix", ""), q.get("startOffset", ""), q.get("endOffset")
                token = q.get("pageToken")
                names = [n for n in names if n.startswith(prefix) and n >= start and (end is None or n < end)
                         and (token is None or n > token)]
                body = {"kind": "storage#objects", "items": [self._meta(bucket, n, base / n) for n in names]}
                return self._reply(200, json.dumps(body).encode(), {"Content-Type": "application/json"})
            f = base / obj
            with write_lock:
                if "ifGenerationMatch" in q and int(q["ifGenerationMatch"]) == 0 and not f.is_file():
                    return self._reply(204)
                if (code := self._conditions(q, f)) is not None:
                    return self._reply(code)
                if not f.is_file():
                    return self._reply(404)
                if q.get("alt") != "media":
                    return self._reply(200, json.dumps(self._meta(bucket, obj, f)).encode(),
                                       {"Content-Type": "application/json"})
                data, gen = f.read_bytes(), gens.of(f)
            headers = {"Content-Type": "application/octet-stream", "x-goog-generation": str(gen),
                       "x-goog-metageneration": "1"}
            rng = self.headers.get("Range")
            if rng and rng.startswith("bytes="):
                a, _, b = rng[len("bytes="):].partition("-")
                if a == "":
                    lo, hi = max(len(data) - int(b), 0), len(data) - 1
                else:
                    lo, hi = int(a), (int(b) if b else len(data) - 1)
                hi = min(hi, len(data) - 1)
                if lo >= len(data):
                    return self._reply(416)
                headers["Content-Range"] = f"bytes {lo}-{hi}/{len(data)}"
                return self._reply(206, data[lo:hi + 1], headers)
            return self._reply(200, data, headers)

        def do_POST(self):
            upload, bucket, obj, q = self._parse()
            body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
            if not upload or q.get("uploadType") != "media" or not q.get("name"):
                return self._reply(400)
            name = q["name"]
            f = root / bucket / name
            with write_lock:
                if (code := self._conditions(q, f)) is not None:
                    return self._reply(code)
                f.parent.mkdir(parents=True, exist_ok=True)
                tmp = f.with_name(f.name + ".upload")
                tmp.write_bytes(body)
                os.replace(tmp, f)
                gens.bump(f)
                meta = self._meta(bucket, name, f)
            return self._reply(200, json.dumps(meta).encode(), {"Content-Type": "application/json"})

        def do_DELETE(self):
            _, bucket, obj, q = self._parse()
            f = root / bucket / obj
            with write_lock:
                if not f.is_file():
                    return self._reply(404)
                if "ifGenerationMatch" in q and gens.of(f) != int(q["ifGenerationMatch"]):
                    return self._reply(412)
                f.unlink()
            return self._reply(204)

    return Handler


@pytest.fixture(scope="module")
def gcs_server(tmp_path_factory):
    """The loopback GCS JSON-API server and its object folder (one per test module: TensorStore
    reads the server's address from the environment)."""
    root = tmp_path_factory.mktemp("gcs_objects")
    requests: list[tuple[str, str]] = []  # (method, path) of every request TensorStore made
    server = ThreadingHTTPServer(("127.0.0.1", 0), _gcs_handler(root, _Generations(), threading.Lock(), requests))
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    env = {"TENSORSTORE_GCS_HTTP_URL": f"http://127.0.0.1:{server.server_address[1]}",
           "GOOGLE_AUTH_TOKEN_FOR_TESTING": "offline-test-token"}
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        yield root, requests
    finally:
        server.shutdown()
        server.server_close()
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@pytest.fixture
def fake_gcs(gcs_server, tmp_path, monkeypatch):
    """``gs://`` works offline: epath's backend and TensorStore's endpoint both reach the fake
    service's objects (returned: the folder holding them). The working directory is an empty
    folder, so a URL mangled into a local path would show up there."""
    root, _ = gcs_server
    monkeypatch.setitem(gpath._PREFIX_TO_BACKEND, "gs", _StoreBackend(root))
    # A bucket-layout query orbax makes through google-cloud-storage: the fake bucket is a plain one.
    from orbax.checkpoint._src.path import gcs_utils

    monkeypatch.setattr(gcs_utils, "is_hierarchical_namespace_enabled", lambda path: False)
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    yield root
    assert not (cwd / "gs:").exists(), f"a gs:// URL was written as a local path: {sorted(os.listdir(cwd))}"
    assert os.listdir(cwd) == [], f"local files were written for a gs:// run: {sorted(os.listdir(cwd))}"


# ---------------------------------------------------------------------------------------------
# Paths
# ---------------------------------------------------------------------------------------------


def test_urls_stay_urls_through_every_path_setting(tmp_path, monkeypatch):
    """Every setting that names a place to write: string in, the same string out."""
    url = f"gs://{BUCKET}/runs/exp-1"
    assert str(pathlib.Path(url)) == f"gs:/{BUCKET}/runs/exp-1"  # why pathlib is not used for these
    for make in (paths.as_path, paths.absolute):
        p = make(url)
        assert str(p) == url and os.fspath(p) == url
        assert str(p / "checkpoints") == url + "/checkpoints"
        assert str(paths.as_path(p)) == url  # a path object passes through
    assert paths.local_path(url) is None and paths.is_url(url) and paths.scheme(url) == "gs"
    cfg = Config()
    cfg.train.out_dir = url
    assert str(paths.as_path(cfg.train.out_dir) / "checkpoints") == url + "/checkpoints"
    assert compile_cache.resolve_cache_dir("", url) == url + "/xla_cache"
    # local paths: exactly as before (pathlib, made absolute where orbax needs it)
    monkeypatch.chdir(tmp_path)
    assert paths.as_path("runs/x") == pathlib.Path("runs/x") and type(paths.as_path("runs/x")) is type(tmp_path)
    assert paths.absolute("runs/x") == tmp_path / "runs" / "x"
    with pytest.raises(ValueError, match="unsupported URL scheme 'nope://'"):
        paths.as_path("nope://bucket/x")


def test_checkpoints_refuse_a_scheme_orbax_cannot_write():
    with pytest.raises(paths.StorageError, match=r"checkpoint directory 's3://b/run': .* gs:// URLs only"):
        Checkpointer("s3://b/run", save_every=1, keep=1)


def test_a_missing_storage_client_is_one_clear_error(monkeypatch, tmp_path):
    def no_client(*a, **k):
        raise ImportError("Install gcsfs to access Google Storage")

    monkeypatch.setitem(gpath._PREFIX_TO_BACKEND, "gs", _StoreBackend(tmp_path))
    monkeypatch.setattr(_StoreBackend, "makedirs", no_client)
    with pytest.raises(paths.StorageError, match=r"cannot use 'gs://b/run/plots' .*pip install gcsfs"):
        RunDir("gs://b/run")


# ---------------------------------------------------------------------------------------------
# The run directory
# ---------------------------------------------------------------------------------------------


def test_run_dir_metrics_plots_and_resume_on_gs(fake_gcs, caplog):
    url = f"gs://{BUCKET}/runs/rundir"
    with caplog.at_level(logging.WARNING, logger="sod_jax.tracking"):
        rd = RunDir(url, tensorboard=True)
    assert "no TensorBoard events" in caplog.text
    assert str(rd.path) == url
    rd.write_text("config.yaml", "algo:\n  name: sod\n")
    for step in (1, 2, 3):
        rd.log_metrics(step, {"reward_mean": 0.1 * step, "acc": 0.5, "kl_k1": np.float32(0.01),
                              "step_w_mean_by_k": [1.0, 0.9], "step_d_mean_by_k": [0.2, 0.3],
                              "step_count_by_k": [4, 2]})
    rd.log_eval(2, {"aime24": {"acc": 0.25}})
    rd.log_step_weights(2, [{"d": [0.1, 0.2], "w": [1.0, 0.5]}])
    local = fake_gcs / BUCKET / "runs" / "rundir"
    assert (local / "config.yaml").read_text() == "algo:\n  name: sod\n"
    assert [r["step"] for r in read_jsonl(url + "/metrics.jsonl")] == [1, 2, 3]
    # resume at step 2: later records dropped in place
    rd.truncate_after(2)
    assert [r["step"] for r in read_jsonl(local / "metrics.jsonl")] == [1, 2]
    written = rd.plot()
    assert written and all(str(p).startswith(url + "/plots/") for p in written)
    for p in written:
        assert (local / "plots" / p.name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert {"reward.png", "eval_acc.png", "step_weights.png"} <= {p.name for p in written}
    rd.close()
    # the plot CLI reads a gs:// run directory
    (local / "plots" / "reward.png").unlink()
    tracking_main(["plot", url])
    assert (local / "plots" / "reward.png").is_file()


def test_jsonl_append_and_replace_on_gs(fake_gcs):
    url = f"gs://{BUCKET}/runs/jsonl/generations.jsonl"
    append_jsonl(url, [{"a": 1}], sync=True)
    append_jsonl(url, [{"a": 2}, {"a": float("nan")}])
    assert read_jsonl(url) == [{"a": 1}, {"a": 2}, {"a": None}]
    write_jsonl(url, [{"a": 3}])
    assert read_jsonl(url) == [{"a": 3}]
    assert sorted(os.listdir(fake_gcs / BUCKET / "runs" / "jsonl")) == ["generations.jsonl"]  # no temp file left


def test_hf_export_upload_replaces_stale_weights(fake_gcs, tmp_path):
    dest = f"gs://{BUCKET}/runs/sft/model"
    old = fake_gcs / BUCKET / "runs" / "sft" / "model"
    old.mkdir(parents=True)
    for name in ("model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors",
                 "model.safetensors.index.json"):
        (old / name).write_bytes(b"old")
    staging = tmp_path / "staging"
    staging.mkdir()
    (staging / "model.safetensors").write_bytes(b"weights")
    (staging / "config.json").write_text("{}")
    got = paths.upload_dir(staging, dest)
    assert str(got) == dest
    assert sorted(os.listdir(old)) == ["config.json", "model.safetensors"]
    assert (old / "model.safetensors").read_bytes() == b"weights"


# ---------------------------------------------------------------------------------------------
# Checkpoints
# ---------------------------------------------------------------------------------------------


class _CkptCfg:
    dir = None
    save_every = 1
    keep = 2
    async_save = True
    resume = True


def test_orbax_checkpoints_save_restore_and_rotate_on_gs(fake_gcs, gcs_server):
    requests = gcs_server[1]
    run = f"gs://{BUCKET}/runs/ckpt"
    ckpt = Checkpointer.from_config(_CkptCfg(), run)
    assert str(ckpt.directory) == run + "/checkpoints"
    assert ckpt.all_steps() == [] and ckpt.restore({"w": jnp.zeros(3)}) is None

    def state(step: int) -> dict:
        return {"w": jnp.arange(6, dtype=jnp.float32).reshape(2, 3) * step, "step": jnp.asarray(step, jnp.int32),
                "rng": jax.random.key_data(jax.random.key(step))}

    for step in (1, 2, 3):
        assert ckpt.save(step, state(step), extra={"loader": {"epoch": 0, "pos": step}, "config": {"a": step}})
    ckpt.wait()
    assert ckpt.all_steps() == [2, 3]  # keep=2: step 1 was deleted from the bucket
    # the arrays went through TensorStore's gcs driver (uploads to the JSON API), not a local file
    uploads = [p for m, p in requests if m == "POST" and "runs/ckpt/checkpoints/" in urllib.parse.unquote(p)]
    assert len(uploads) >= 3, requests[-5:]
    steps_in_bucket = sorted(os.listdir(fake_gcs / BUCKET / "runs" / "ckpt" / "checkpoints"))
    assert "1" not in steps_in_bucket and {"2", "3"} <= set(steps_in_bucket)
    ckpt.close()

    # a new process resumes from the bucket
    again = Checkpointer.from_config(_CkptCfg(), run)
    n_before = len(requests)
    got = again.restore(jax.tree.map(jnp.zeros_like, state(0)))
    assert any(m == "GET" for m, _ in requests[n_before:])  # read back through the JSON API
    assert got is not None
    step, restored, extra = got
    assert step == 3 and extra == {"loader": {"epoch": 0, "pos": 3}, "config": {"a": 3}}
    for k, v in state(3).items():
        np.testing.assert_array_equal(np.asarray(restored[k]), np.asarray(v))
    assert again.restore_extra(2) == (2, {"loader": {"epoch": 0, "pos": 2}, "config": {"a": 2}})
    again.close()


# ---------------------------------------------------------------------------------------------
# A whole (tiny) training run on gs://
# ---------------------------------------------------------------------------------------------


TINY = dict(vocab_size=640, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, head_dim=8, rope_theta=10000.0, dtype="float32", param_dtype="float32",
            remat="none")


def test_sft_run_writes_checkpoints_exports_and_resumes_on_gs(fake_gcs, tokenizer_dir):
    """The SFT loop with its checkpoint hook and final HF export, ``sft.out_dir`` a gs:// URL; a
    second run resumes from the bucket."""
    from support.sft_conversations import make_rows

    from sod_jax.chat import ChatTokenizer
    from sod_jax.config import load_config
    from sod_jax.loop import CheckpointHook
    from sod_jax.models import Qwen3Config, init_model
    from sod_jax.sft.step import prepare_examples
    from sod_jax.sft.trainer import SFTTrainer

    url = f"gs://{BUCKET}/runs/sft"
    exs, _ = prepare_examples(make_rows(4, seed=5), ChatTokenizer.from_dir(tokenizer_dir), max_length=1024)

    def run(max_steps: int):
        cfg = load_config(overrides=[f"sft.out_dir={url}", "sft.batch_size=2", "sft.epochs=2",
                                     f"sft.max_steps={max_steps}", "checkpoint.save_every=1", "sft.lr=1e-3",
                                     "model.logprob_chunk=64", "logging.plots=true", "sft.max_length=1024"], job="sft")
        hook = CheckpointHook(Checkpointer.from_config(cfg.checkpoint, cfg.sft.out_dir), save_every=1, resume=True)
        trainer = SFTTrainer(cfg, init_model(Qwen3Config(**TINY), seed=0), exs, (), tokenizer_dir=str(tokenizer_dir),
                             hooks=[hook], progress=False)
        return trainer.run()

    first = run(2)
    assert first.steps == 2 and str(first.model_dir) == url + "/model"
    bucket_run = fake_gcs / BUCKET / "runs" / "sft"
    assert {"1", "2"} <= set(os.listdir(bucket_run / "checkpoints"))
    assert {"model.safetensors", "config.json", "tokenizer.json"} <= set(os.listdir(bucket_run / "model"))
    assert (bucket_run / "plots" / "sft_loss.png").read_bytes()[:4] == b"\x89PNG"

    second = run(3)  # restores step 2 from the bucket, trains step 3
    assert second.steps == 3
    assert [r["step"] for r in read_jsonl(url + "/metrics.jsonl")] == [1, 2, 3]  # continued in the bucket
    assert "3" in os.listdir(bucket_run / "checkpoints")
