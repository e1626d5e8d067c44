"""A real `mlflow server` on 127.0.0.1 for the tests (its own sqlite store and artifact directory), and its REST API.

`serve(directory)` starts the server on a free port, waits for `/health` and stops it on exit; `rest(uri,
endpoint, body)` calls the REST API the web UI itself uses (GET without a body, POST with one).
"""

from __future__ import annotations

import contextlib
import json
import socket
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def serve(directory: Path, startup_s: float = 180) -> Iterator[str]:
    """Run `mlflow server` with its store under `directory`; yields its http URI."""
    directory.mkdir(parents=True, exist_ok=True)
    port = free_port()
    log_path = directory / "server.log"
    cmd = [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port),
           "--backend-store-uri", f"sqlite:///{directory / 'mlflow.db'}",
           "--artifacts-destination", str(directory / "artifacts"), "--workers", "1"]  # fmt: skip
    with log_path.open("w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=directory, start_new_session=True)
        uri = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + startup_s
        try:
            while True:
                try:
                    with urllib.request.urlopen(uri + "/health", timeout=2):
                        break
                except OSError:
                    if proc.poll() is not None or time.monotonic() > deadline:
                        raise RuntimeError(f"mlflow server did not start: {log_path.read_text()[-2000:]}") from None
                    time.sleep(0.5)
            yield uri
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def rest(uri: str, endpoint: str, body: dict[str, Any] | None = None, **query: Any) -> dict[str, Any]:
    """Call `<uri>/api/2.0/mlflow/<endpoint>`: POST `body` as JSON, or GET with `query` parameters."""
    url = f"{uri}/api/2.0/mlflow/{endpoint}"
    if body is None:
        request = urllib.request.Request(f"{url}?{urllib.parse.urlencode(query)}" if query else url)
    else:
        data = json.dumps(body).encode()
        request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=60) as answer:
        return json.loads(answer.read().decode() or "{}")
