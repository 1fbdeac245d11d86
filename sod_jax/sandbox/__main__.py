"""``python -m sod_jax.sandbox serve``: the local executor over HTTP (SandboxFusion API)."""

from __future__ import annotations

import argparse
import logging
import sys


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m sod_jax.sandbox",
                                description="Sandbox tools. `serve` exposes the isolated local executor over "
                                            "SandboxFusion's HTTP API (POST /run_code, GET /v1/ping).")
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("serve", help="serve the local executor over HTTP")
    s.add_argument("--host", default="127.0.0.1", help="bind address (default loopback: it runs arbitrary code)")
    s.add_argument("--port", type=int, default=8080)
    s.add_argument("--workers", type=int, default=8, help="executions at once")
    s.add_argument("--run-timeout", type=float, default=10.0, help="default wall-clock seconds per run")
    s.add_argument("--memory-limit-mb", type=int, default=1024, help="default address-space limit")
    s.add_argument("--mode", choices=["warm", "cold"], default="warm",
                   help="warm: fork each run from a pre-started isolated interpreter (default); cold: a new sandbox "
                        "and interpreter per run")
    s.add_argument("--access-log", metavar="PATH", default=None,
                   help="append one line per request to this file (default: no request log)")
    s.add_argument("--allow-unconfined", action="store_true",
                   help="run without isolation if bubblewrap is unavailable (trusted code only)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", force=True)
    from sod_jax.sandbox.local import LocalSandbox, LocalSandboxConfig
    from sod_jax.sandbox.protocol import SandboxUnavailable
    from sod_jax.sandbox.server import serve

    try:
        sandbox = LocalSandbox(LocalSandboxConfig(mode=args.mode, workers=args.workers, run_timeout=args.run_timeout,
                                                  memory_limit_mb=args.memory_limit_mb,
                                                  allow_unconfined=args.allow_unconfined))
    except SandboxUnavailable as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    logging.getLogger(__name__).info("sandbox: %d %s workers, %s", args.workers, sandbox.mode,
                                     "bubblewrap isolation" if sandbox.confined else "UNCONFINED")
    serve(sandbox, args.host, args.port, access_log=args.access_log)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
