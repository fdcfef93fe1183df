"""A local Orthanc PACS with DICOMweb, reachable from this machine only (for trying and testing the
app's PACS datastore).

    python scripts/pacs_orthanc.py --storage runs/pacs [--port 8042] [--user alice:secret] [--upload FOLDER ...]

Prints `ORTHANC READY http://127.0.0.1:<port>/dicom-web` once it answers (after uploading the DICOM
files found under each `--upload` folder) and runs until stopped (SIGTERM / Ctrl-C).

Debian's Orthanc (1.10) always listens on every network interface (a bind address came in a later
release), so it runs in a network namespace of its own that has only a loopback interface: nothing
outside this machine can reach it, not even another address of this machine. This process listens
on 127.0.0.1:<port> in the machine's namespace and relays each connection to Orthanc inside.
`--port 0` picks a free port. Orthanc's DICOM (DIMSE) server is off; with `--user` its REST and
DICOMweb API need HTTP basic auth.

Needs Debian's `orthanc` and `orthanc-dicomweb` (`scripts/setup.sh` installs them when run as root)
and either root or unprivileged user namespaces (`unshare --net`).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

DICOMWEB_PLUGIN = Path("/usr/share/orthanc/plugins/libOrthancDicomWeb.so")
INNER_PORT = 8042


def orthanc_binary() -> str:
    found = shutil.which("Orthanc") or ("/usr/sbin/Orthanc" if os.access("/usr/sbin/Orthanc", os.X_OK) else None)
    if not found or not DICOMWEB_PLUGIN.is_file():
        raise SystemExit("pacs_orthanc: Debian's orthanc and orthanc-dicomweb packages are needed "
                         "(run scripts/setup.sh as root, or apt-get install orthanc orthanc-dicomweb)")
    return found


def write_config(storage: Path, users: dict[str, str]) -> Path:
    storage.mkdir(parents=True, exist_ok=True)
    config = {
        "Name": "LungNLB local PACS",
        "StorageDirectory": str(storage / "db"),
        "IndexDirectory": str(storage / "db"),
        "HttpPort": INNER_PORT,
        "HttpServerEnabled": True,
        "DicomServerEnabled": False,
        "RemoteAccessAllowed": False,
        "AuthenticationEnabled": bool(users),
        "RegisteredUsers": users,
        "Plugins": [str(DICOMWEB_PLUGIN)],
        "DicomWeb": {"Enable": True, "Root": "/dicom-web/", "EnableWado": True, "Ssl": False,
                     "StudiesMetadata": "Full", "SeriesMetadata": "Full"},
        "StableAge": 1,
        "SaveJobs": False,
        "HttpTimeout": 60,
    }
    path = storage / "orthanc.json"
    path.write_text(json.dumps(config, indent=2), encoding="utf-8")
    return path


# ---- inside the namespace: Orthanc and the relay --------------------------------------------------
def _pump(source: socket.socket, sink: socket.socket) -> None:
    try:
        while True:
            data = source.recv(1 << 16)
            if not data:
                break
            sink.sendall(data)
    except OSError:
        pass
    finally:
        for sock, how in ((sink, socket.SHUT_WR), (source, socket.SHUT_RD)):
            try:
                sock.shutdown(how)
            except OSError:
                pass


def _serve_connection(client: socket.socket) -> None:
    try:
        upstream = socket.create_connection(("127.0.0.1", INNER_PORT), timeout=10)
    except OSError:
        client.close()
        return
    upstream.settimeout(None)
    threads = [threading.Thread(target=_pump, args=(client, upstream), daemon=True),
               threading.Thread(target=_pump, args=(upstream, client), daemon=True)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    client.close()
    upstream.close()


def inner_main(listen_fd: int, command: list[str]) -> int:
    subprocess.run(["ip", "link", "set", "lo", "up"], check=True)
    server = subprocess.Popen(command)

    def stop(*_):
        server.terminate()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    listener = socket.socket(fileno=listen_fd)

    def accept_loop() -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return
            threading.Thread(target=_serve_connection, args=(client,), daemon=True).start()

    threading.Thread(target=accept_loop, daemon=True).start()
    return server.wait()


# ---- outside: the loopback socket, the namespace, readiness and uploads ---------------------------
def _namespace_prefix() -> list[str]:
    for prefix in (["unshare", "--net"], ["unshare", "--map-root-user", "--net"]):
        if shutil.which("unshare") and subprocess.run([*prefix, "true"], capture_output=True, check=False).returncode == 0:
            return prefix
    raise SystemExit("pacs_orthanc: cannot create a network namespace (`unshare --net` needs root or unprivileged "
                     "user namespaces); Orthanc 1.10 would listen on every interface, so it is not started")


def wait_ready(url: str, auth: tuple[str, str] | None, process: subprocess.Popen, timeout_s: float = 60) -> None:
    import requests

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit(f"pacs_orthanc: Orthanc exited with {process.returncode}")
        try:
            if requests.get(f"{url}/system", auth=auth, timeout=5).status_code == 200:
                return
        except requests.RequestException:
            pass
        time.sleep(0.3)
    raise SystemExit(f"pacs_orthanc: Orthanc did not answer within {timeout_s:.0f} s")


def upload(url: str, auth: tuple[str, str] | None, folders: list[Path]) -> int:
    """POST every DICOM file (preamble `DICM`) under `folders` to Orthanc's REST API; the count."""
    import requests

    count = 0
    for folder in folders:
        for path in sorted(p for p in Path(folder).rglob("*") if p.is_file()):
            with path.open("rb") as stream:
                if stream.read(132)[128:] != b"DICM":
                    continue
            response = requests.post(f"{url}/instances", data=path.read_bytes(), auth=auth, timeout=60)
            response.raise_for_status()
            count += 1
    return count


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--storage", type=Path, required=True, help="folder for Orthanc's database and configuration")
    parser.add_argument("--port", type=int, default=8042, help="port on 127.0.0.1 (0: a free one)")
    parser.add_argument("--user", action="append", default=[], help="USER:PASSWORD for HTTP basic auth (repeatable)")
    parser.add_argument("--upload", action="append", default=[], type=Path, help="folder of DICOM files to upload")
    parser.add_argument("--inner", type=int, help=argparse.SUPPRESS)  # the listening socket's fd, in the namespace
    args, command = parser.parse_known_args(argv)
    if args.inner is not None:
        return inner_main(args.inner, command[1:] if command[:1] == ["--"] else command)

    users = dict(user.split(":", 1) for user in args.user)
    config = write_config(args.storage.resolve(), users)
    prefix = _namespace_prefix()
    listener = socket.socket()
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind(("127.0.0.1", args.port))
    listener.listen(64)
    port = listener.getsockname()[1]
    fd = listener.fileno()
    os.set_inheritable(fd, True)
    process = subprocess.Popen([*prefix, sys.executable, os.path.abspath(__file__), "--storage", str(args.storage),
                                "--inner", str(fd), "--", orthanc_binary(), str(config)], pass_fds=(fd,))
    listener.close()
    signal.signal(signal.SIGTERM, lambda *_: process.terminate())
    base = f"http://127.0.0.1:{port}"
    auth = next(iter(users.items())) if users else None
    try:
        wait_ready(base, auth, process)
        if args.upload:
            print(f"uploaded {upload(base, auth, args.upload)} DICOM file(s)", flush=True)
        print(f"ORTHANC READY {base}/dicom-web", flush=True)
        return process.wait()
    except KeyboardInterrupt:
        return 0
    finally:
        if process.poll() is None:
            process.terminate()
            try:
                process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                process.kill()


if __name__ == "__main__":
    sys.exit(main())
