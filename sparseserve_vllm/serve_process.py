"""Start and stop a real `vllm serve` process on loopback (used by the demo, the tests and CPU benchmarks).

`VllmServer(model, extra_args, env)` runs `vllm serve MODEL --host 127.0.0.1 --port <free port> ...` with its
output in a log file, waits until `/health` answers (or the process dies, or `timeout_s` passes: then the
log's tail is in the raised error), and terminates the whole process group on `stop()` / context exit.
No vLLM import: it drives the `vllm` command that the installed vLLM provides.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class VllmServer:
    def __init__(self, model: str, extra_args: list[str] = (), env: dict[str, str] | None = None,
                 timeout_s: float = 600, log_path: str | Path | None = None) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = Path(log_path or tempfile.mkstemp(prefix="vllm-serve-", suffix=".log")[1])
        exe = shutil.which("vllm", path=str(Path(sys.executable).parent) + os.pathsep + os.environ.get("PATH", ""))
        if exe is None:
            raise RuntimeError("the `vllm` command was not found next to this Python or on PATH")
        self.cmd = [exe, "serve", model, "--host", "127.0.0.1", "--port", str(self.port), *extra_args]
        self.env = {**os.environ, **(env or {})}
        self.env.pop("TRITON_INTERPRET", None)  # a test process may set it for its kernels; vLLM must not see it
        self.timeout_s = timeout_s
        self.proc: subprocess.Popen | None = None

    def __enter__(self) -> "VllmServer":
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def start(self) -> None:
        log = open(self.log_path, "w")
        self.proc = subprocess.Popen(self.cmd, stdout=log, stderr=subprocess.STDOUT, env=self.env,
                                     stdin=subprocess.DEVNULL, start_new_session=True)
        deadline = time.monotonic() + self.timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"vllm serve exited with {self.proc.returncode}:\n{self.log_tail()}")
            try:
                with urllib.request.urlopen(self.url + "/health", timeout=2) as r:
                    if r.status == 200:
                        return
            except OSError:
                pass
            time.sleep(1)
        self.stop()
        raise TimeoutError(f"vllm serve did not become healthy in {self.timeout_s} s:\n{self.log_tail()}")

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        os.killpg(self.proc.pid, signal.SIGINT)
        try:
            self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()

    def log_tail(self, n: int = 60) -> str:
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])

    def post(self, path: str, body: dict, timeout: float = 600) -> dict:
        req = urllib.request.Request(self.url + path, data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return json.loads(r.read())

    def get_text(self, path: str, timeout: float = 30) -> str:
        with urllib.request.urlopen(self.url + path, timeout=timeout) as r:
            return r.read().decode()
