"""deploy/nginx.conf, as shipped, in front of the server: streams pass through unbuffered
(chunks arrive while the answer is being generated), errors keep their OpenAI-style
bodies, and a client that hangs up at nginx aborts its request on the server."""
import os
import re
import shutil
import subprocess
import time
from pathlib import Path

import httpx
import pytest

pytest.importorskip("fastapi")
openai = pytest.importorskip("openai")

from server import build_app  # noqa: E402
from server.sim import SimBackend  # noqa: E402
from server.thread import free_port, serving  # noqa: E402

NGINX = shutil.which("nginx") or next((p for p in ("/usr/sbin/nginx",) if os.path.exists(p)), None)
RECIPE = Path(__file__).resolve().parents[1] / "deploy" / "nginx.conf"
pytestmark = pytest.mark.skipif(NGINX is None, reason="nginx is not installed (Debian: apt-get "
                                "install nginx-light; .ci/run installs it where apt-get works)")


def start_nginx(tmp: Path, upstream_port: int) -> tuple[subprocess.Popen, int]:
    port = free_port()
    recipe = RECIPE.read_text().replace("127.0.0.1:8000", f"127.0.0.1:{upstream_port}")
    recipe = re.sub(r"listen 80;", f"listen 127.0.0.1:{port};", recipe)
    (tmp / "twinserve.conf").write_text(recipe)
    temps = "\n".join(f"    {kind}_temp_path {tmp}/{kind};"
                      for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"))
    (tmp / "nginx.conf").write_text(f"""
{"user root;" if os.geteuid() == 0 else ""}
worker_processes 1;
daemon off;
pid {tmp}/nginx.pid;
error_log {tmp}/error.log warn;
events {{ worker_connections 256; }}
http {{
    access_log off;
{temps}
    include {tmp}/twinserve.conf;
}}
""")
    process = subprocess.Popen([NGINX, "-p", str(tmp), "-c", str(tmp / "nginx.conf"),
                                "-e", str(tmp / "error.log")])
    deadline = time.monotonic() + 20
    while True:
        try:
            httpx.get(f"http://127.0.0.1:{port}/health", timeout=1)
            return process, port
        except httpx.HTTPError:
            if process.poll() is not None or time.monotonic() > deadline:
                process.kill()
                raise RuntimeError(f"nginx did not start: {(tmp / 'error.log').read_text()}")
            time.sleep(0.05)


def test_streaming_through_nginx(tmp_path):
    backend = SimBackend("qwen3-8b", "h200", num_gpu_blocks=512, max_model_len=1024)   # ~4 ms/token
    aborted = []
    abort = backend.abort
    backend.abort = lambda request_id: aborted.append(abort(request_id)) or aborted[-1]
    with serving(build_app(backend, "twin")) as url:
        upstream = int(url.rsplit(":", 1)[1])
        nginx, port = start_nginx(tmp_path, upstream)
        try:
            proxy = f"http://127.0.0.1:{port}"
            client = openai.OpenAI(base_url=proxy + "/v1", api_key="none", max_retries=0)
            sent = time.perf_counter()
            times = []
            for chunk in client.completions.create(model="twin", prompt="hello", max_tokens=200,
                                                   stream=True, extra_body={"ignore_eos": True}):
                if chunk.choices and chunk.choices[0].text:
                    times.append(time.perf_counter())
            assert len(times) >= 100
            # unbuffered: chunks come one by one as tokens are made (a buffering proxy
            # passes them on in a few bursts of kilobytes)
            gaps = [b - a for a, b in zip(times, times[1:])]
            assert sum(g > 1e-3 for g in gaps) > len(gaps) / 2
            assert times[-1] - times[0] > 0.5 * (times[-1] - sent)
            with pytest.raises(openai.BadRequestError, match="top_p"):
                client.completions.create(model="twin", prompt="x", top_p=3)
            r = httpx.post(f"{proxy}/v1/completions", content=b"{", timeout=10)
            assert r.status_code == 400 and r.json()["error"]["code"] == 400
            # a client that hangs up at nginx aborts its request on the server
            body = {"prompt": "hi", "max_tokens": 1000, "ignore_eos": True, "stream": True}
            with httpx.stream("POST", f"{proxy}/v1/completions", json=body, timeout=30) as s:
                next(line for line in s.iter_lines() if line.startswith("data: {"))
            deadline = time.monotonic() + 20
            while not aborted and time.monotonic() < deadline:
                time.sleep(0.05)
            assert aborted == [True]
        finally:
            nginx.terminate()
            nginx.wait(timeout=10)
