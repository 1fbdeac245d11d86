"""The server keeps answering past the point where a per-request log line would fill a 64 KiB pipe."""

import asyncio
import time

import aiohttp
import pytest
from support.sandbox_server import spawn_server, stop_server


@pytest.mark.slow
def test_server_answers_1500_pings_and_access_log_goes_to_its_file(tmp_path):
    access = tmp_path / "access.log"
    proc, url, log_path = spawn_server(workers=1, extra_args=["--access-log", str(access)])
    try:
        async def pings():
            async with aiohttp.ClientSession() as s:
                sem = asyncio.Semaphore(16)

                async def one():
                    async with sem, s.get(f"{url}/v1/ping", timeout=aiohttp.ClientTimeout(total=30)) as r:
                        return await r.text()

                return await asyncio.gather(*[one() for _ in range(1500)])

        assert asyncio.run(pings()) == ["pong"] * 1500
        assert proc.poll() is None
        deadline = time.monotonic() + 10  # the server writes a line just after answering
        while (n := _aiohttp_pings(access)) < 1500 and time.monotonic() < deadline:
            time.sleep(0.1)
        assert n == 1500
        assert "/v1/ping" not in log_path.read_text()  # nothing per request on the console
    finally:
        stop_server(proc)


def _aiohttp_pings(path):
    return sum("GET /v1/ping" in line and "aiohttp" in line for line in path.read_text().splitlines())
