"""The LungNLB app as a real `monailabel start_server` subprocess on a loopback port (for
`benchmarks.server` and the server tests)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import requests

REPO = Path(__file__).resolve().parents[1]
APP_DIR = REPO / "apps" / "lungnlb"
START_TIMEOUT_S = float(os.environ.get("LUNGNLB_SERVER_START_TIMEOUT_S", 180))  # longer on a crowded machine


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def server_command(studies: Path, conf: dict[str, str], port: int, host: str = "127.0.0.1") -> list[str]:
    command = [str(Path(sys.executable).parent / "monailabel"), "start_server", "--app", str(APP_DIR),
               "--studies", str(studies), "--host", host, "--port", str(port)]
    for key, value in conf.items():
        command += ["--conf", key, value]
    return command


def server_env(extra_env: dict[str, str] | None = None) -> dict[str, str]:
    bin_dir = str(Path(sys.executable).parent)  # the monailabel script runs the `python` on PATH
    return {**os.environ, "PATH": bin_dir + os.pathsep + os.environ.get("PATH", ""), "PYTHONPATH": str(REPO),
            "MONAI_LABEL_DATASTORE_AUTO_RELOAD": "false", **(extra_env or {})}


def start_server(
    studies: Path, conf: dict[str, str], log: Path, extra_env: dict[str, str] | None = None,
    command: list[str] | None = None, port: int | None = None,
) -> tuple[subprocess.Popen, str]:
    """Start `monailabel start_server` (or `command`, which listens on `port`) on a free loopback
    port; wait (bounded) until /info answers."""
    port = port or free_port()
    command = command or server_command(studies, conf, port)
    process = subprocess.Popen(command, stdout=log.open("wb"), stderr=subprocess.STDOUT, env=server_env(extra_env),
                               cwd=REPO)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"server exited with {process.returncode}:\n{log.read_text()[-3000:]}")
        try:
            if requests.get(f"{url}/info/", timeout=5).status_code == 200:
                return process, url
        except requests.ConnectionError:
            pass
        time.sleep(1)
    process.kill()
    raise TimeoutError(f"server did not answer within {START_TIMEOUT_S} s:\n{log.read_text()[-3000:]}")


def stop_server(process: subprocess.Popen) -> None:
    process.terminate()
    try:
        process.wait(timeout=20)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(timeout=10)
