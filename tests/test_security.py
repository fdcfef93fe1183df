"""Closed by default: the README's command listens on loopback only, an exposed server without
authentication refuses to start, and no foreign web origin is allowed unless configured."""

from __future__ import annotations

import os
import subprocess

import psutil
import pytest
import requests

from app_support import in_process_client
from benchmarks.app_server import REPO, free_port, server_command, server_env, start_server, stop_server
from benchmarks.app_studies import build_studies, tiny_checkpoint

FOREIGN = "http://evil.example"


@pytest.mark.parametrize("host_args", [["--host", "0.0.0.0"], ["--host=10.1.2.3"], ["-i", "::"]])
def test_serve_sample_refuses_an_exposed_host_without_authentication(host_args):
    env = {**os.environ, "MONAI_LABEL_AUTH_ENABLE": "false"}
    result = subprocess.run(["bash", "scripts/serve_sample.sh", *host_args], cwd=REPO, env=env,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2, result.stdout + result.stderr
    assert "refusing to listen on" in result.stderr
    assert "scripts/serve_proxy.sh" in result.stderr and "MONAI_LABEL_AUTH_ENABLE" in result.stderr


def test_monailabel_start_server_on_all_interfaces_refuses_to_start(tmp_path):
    """The app itself refuses (for `monailabel start_server` run directly, whose default is 0.0.0.0)."""
    build_studies(tmp_path / "studies", slices_per_file=1, files=1)
    port = free_port()
    conf = {"checkpoint": "none", "model_dir": str(tmp_path / "model")}
    log = tmp_path / "server.log"
    command = server_command(tmp_path / "studies", conf, port, host="0.0.0.0")
    with log.open("wb") as stream:
        result = subprocess.run(command, stdout=stream, stderr=subprocess.STDOUT, env=server_env(), cwd=REPO, timeout=240)
    text = log.read_text(errors="replace")
    assert result.returncode != 0, text[-3000:]
    assert "refusing to listen on 0.0.0.0 without authentication" in text and "serve_proxy.sh" in text
    with pytest.raises(requests.ConnectionError):
        requests.get(f"http://127.0.0.1:{port}/info/", timeout=5)


@pytest.fixture(scope="module")
def sample_server(tmp_path_factory):
    """`scripts/serve_sample.sh` as the README runs it (set-up already done), on a copy of the samples."""
    root = tmp_path_factory.mktemp("serve_sample")
    port = free_port()
    command = ["bash", "scripts/serve_sample.sh", "--port", str(port), "--conf", "model_dir", str(root / "model")]
    env = {"LUNGNLB_SKIP_SETUP": "1", "LUNGNLB_STUDIES": str(root / "studies")}
    process, url = start_server(root / "studies", {}, root / "server.log", extra_env=env, command=command, port=port)
    try:
        yield {"url": url, "process": process, "root": root, "port": port}
    finally:
        stop_server(process)


def _listening(pid: int) -> set[str]:
    addresses = set()
    for process in [psutil.Process(pid), *psutil.Process(pid).children(recursive=True)]:
        for connection in process.net_connections(kind="inet"):
            if connection.status == psutil.CONN_LISTEN:
                addresses.add(connection.laddr.ip)
    return addresses


def test_serve_sample_listens_on_loopback_only(sample_server):
    assert _listening(sample_server["process"].pid) == {"127.0.0.1"}


def test_foreign_origins_are_refused_and_get_no_cors_headers(sample_server):
    url = sample_server["url"]
    before = sorted(p.name for p in (sample_server["root"] / "studies").rglob("*"))
    read = requests.get(f"{url}/info/", headers={"Origin": FOREIGN}, timeout=30)
    assert read.status_code == 403 and "MONAI_LABEL_CORS_ORIGINS" in read.json()["detail"]
    assert "access-control-allow-origin" not in read.headers
    preflight = requests.options(f"{url}/datastore/image?id=x", timeout=30,
                                 headers={"Origin": FOREIGN, "Access-Control-Request-Method": "DELETE"})
    assert preflight.status_code == 403 and "access-control-allow-origin" not in preflight.headers
    image = next((sample_server["root"] / "studies").glob("*.nii.gz"))
    with image.open("rb") as stream:  # a foreign page's form POST needs no preflight: it must not run
        form = requests.post(f"{url}/datastore/image?image=planted", files={"file": ("x.nii.gz", stream)},
                             headers={"Origin": FOREIGN}, timeout=30)
    assert form.status_code == 403
    assert sorted(p.name for p in (sample_server["root"] / "studies").rglob("*")) == before
    own = requests.get(f"{url}/info/", headers={"Origin": url}, timeout=30)
    assert own.status_code == 200  # the server's own pages (same origin) still work


def test_configured_origin_is_allowed_and_others_still_refused(tmp_path):
    build_studies(tmp_path / "studies", slices_per_file=1, files=1)
    conf = {"checkpoint": str(tiny_checkpoint(tmp_path / "ckpt" / "tiny")), "model_dir": str(tmp_path / "model"),
            "device": "cpu"}
    allowed = "http://annotate.example:8080"
    with in_process_client(tmp_path / "studies", conf, MONAI_LABEL_CORS_ORIGINS=[allowed]) as client:
        response = client.get("/info/", headers={"Origin": allowed})
        assert response.status_code == 200 and response.headers["access-control-allow-origin"] == allowed
        preflight = client.options("/datastore/label", headers={"Origin": allowed, "Access-Control-Request-Method": "PUT"})
        assert preflight.status_code == 200 and preflight.headers["access-control-allow-origin"] == allowed
        assert client.get("/info/", headers={"Origin": FOREIGN}).status_code == 403
    with in_process_client(tmp_path / "studies", conf) as client:  # not configured: that origin is foreign too
        response = client.get("/info/", headers={"Origin": allowed})
        assert response.status_code == 403 and "access-control-allow-origin" not in response.headers


# ---- Host header (DNS rebinding) ---------------------------------------------------------------
def test_a_foreign_host_name_is_refused(sample_server):
    """A page whose DNS name was rebound to 127.0.0.1 reaches the loopback server with its own name
    in the Host header (and, being same-origin to itself, passes the origin check): 400."""
    url, port, studies = sample_server["url"], sample_server["port"], sample_server["root"] / "studies"
    before = sorted(p.name for p in studies.rglob("*"))
    for name in ("evil.example", "localhost.evil.example", "127.0.0.1.nip.io", "0.0.0.0"):
        host = f"{name}:{port}"
        response = requests.get(f"{url}/info/", headers={"Host": host, "Origin": f"http://{host}"}, timeout=30)
        assert response.status_code == 400, (host, response.status_code, response.text[:200])
        assert "is not a name of this server" in response.json()["detail"] and "allowed_hosts" in response.json()["detail"]
    image = next(studies.glob("*.nii.gz"))
    with image.open("rb") as stream:
        planted = requests.put(f"{url}/datastore/image?image=planted", files={"file": ("x.nii.gz", stream)},
                               headers={"Host": f"evil.example:{port}"}, timeout=30)
    assert planted.status_code == 400
    assert requests.delete(f"{url}/datastore/image?id={image.name[:-7]}", headers={"Host": "evil.example"},
                           timeout=30).status_code == 400
    assert sorted(p.name for p in studies.rglob("*")) == before
    for host in (f"localhost:{port}", f"127.0.0.1:{port}", f"[::1]:{port}", "LOCALHOST"):
        assert requests.get(f"{url}/info/", headers={"Host": host}, timeout=30).status_code == 200, host


def test_configured_host_names_are_accepted(tmp_path):
    build_studies(tmp_path / "studies", slices_per_file=1, files=1)
    conf = {"checkpoint": "none", "model_dir": str(tmp_path / "model"), "allowed_hosts": "ct-lab.example,192.0.2.10"}
    with in_process_client(tmp_path / "studies", conf) as client:
        for host in ("ct-lab.example:8443", "CT-LAB.example", "192.0.2.10:8443", "127.0.0.1"):
            assert client.get("/info/", headers={"Host": host}).status_code == 200, host
        refused = client.get("/info/", headers={"Host": "other.example:8443"})
        assert refused.status_code == 400 and "ct-lab.example" in refused.json()["detail"]


def test_a_malformed_allowed_hosts_setting_is_refused(tmp_path):
    from lib.conf import parse_conf

    with pytest.raises(ValueError, match="allowed_hosts"):
        parse_conf(tmp_path, tmp_path, {"allowed_hosts": "ct-lab.example,bad name/x"})
