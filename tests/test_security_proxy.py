"""The authenticated TLS proxy (`scripts/serve_proxy.sh`: Debian's nginx in front of the loopback
server) started as documented: no credentials -> 401, annotators get 403 on deleting, training,
/logs and the dataset, admins get through, and the client verifies TLS against the generated CA."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import psutil
import pytest
import requests

from benchmarks.app_server import REPO, free_port, server_env

NGINX = shutil.which("nginx") or "/usr/sbin/nginx"
PROXY_NAME = "ct-lab.example"  # a name clients reach the proxy by (PROXY_HOSTNAMES)
USERS = {"ada": ("admin", "admin-password-1"), "ann": ("annotator", "annotator-password-1")}


@pytest.fixture(scope="module")
def proxy(tmp_path_factory):
    assert Path(NGINX).is_file(), "nginx is not installed: `bash scripts/setup.sh` as root installs Debian's nginx"
    root = tmp_path_factory.mktemp("proxy")
    port, upstream = free_port(), free_port()
    env = server_env({"PROXY_DIR": str(root / "proxy"), "PROXY_LISTEN": f"127.0.0.1:{port}",
                      "PROXY_UPSTREAM_PORT": str(upstream), "LUNGNLB_SKIP_SETUP": "1",
                      "LUNGNLB_STUDIES": str(root / "studies"), "PROXY_HOSTNAMES": PROXY_NAME})
    refused = subprocess.run(["bash", "scripts/serve_proxy.sh"], cwd=REPO, env=env, capture_output=True, text=True, timeout=60)
    assert refused.returncode == 2 and "no users yet" in refused.stderr  # never an open proxy
    for name, (role, password) in USERS.items():
        subprocess.run(["bash", "scripts/serve_proxy.sh", "adduser", name, role], cwd=REPO, env=env, input=password + "\n",
                       text=True, check=True, capture_output=True, timeout=60)
    log = root / "proxy.log"
    process = subprocess.Popen(["bash", "scripts/serve_proxy.sh", "--conf", "model_dir", str(root / "model")], cwd=REPO,
                               env=env, stdout=log.open("wb"), stderr=subprocess.STDOUT, start_new_session=True)
    url, ca = f"https://127.0.0.1:{port}", root / "proxy" / "ca.pem"
    deadline = time.monotonic() + 240
    try:
        while True:
            assert process.poll() is None, f"serve_proxy.sh exited:\n{log.read_text()[-3000:]}"
            assert time.monotonic() < deadline, f"proxy did not answer:\n{log.read_text()[-3000:]}"
            try:
                if ca.is_file() and requests.get(f"{url}/info/", auth=("ada", USERS["ada"][1]), verify=ca, timeout=5).status_code == 200:
                    break
            except requests.ConnectionError:
                pass
            time.sleep(1)
        yield {"url": url, "ca": ca, "root": root, "process": process, "upstream": upstream}
    finally:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=10)


def _as(proxy, user: str | None, method: str, path: str, **kwargs) -> requests.Response:
    auth = (user, USERS[user][1]) if user else None
    return requests.request(method, proxy["url"] + path, auth=auth, verify=proxy["ca"], timeout=120, **kwargs)


def test_no_or_wrong_credentials_get_401(proxy):
    for path in ("/info/", "/datastore/?output=all", "/logs/"):
        response = _as(proxy, None, "GET", path)
        assert response.status_code == 401 and "Basic" in response.headers.get("www-authenticate", ""), path
    wrong = requests.get(proxy["url"] + "/info/", auth=("ada", "not-the-password"), verify=proxy["ca"], timeout=30)
    assert wrong.status_code == 401


def test_annotator_reads_infers_and_submits_but_may_not_administer(proxy):
    images = _as(proxy, "ada", "GET", "/datastore/?output=all").json()["objects"]
    image_id = sorted(images)[0]
    assert _as(proxy, "ann", "GET", "/info/").status_code == 200
    assert _as(proxy, "ann", "GET", f"/datastore/image/info?image={image_id}").status_code == 200
    assert _as(proxy, "ann", "POST", "/activelearning/random", json={}).status_code == 200
    infer = _as(proxy, "ann", "POST", f"/infer/lung_watershed?image={image_id}&output=image",
                data={"params": json.dumps({"box": [100, 100, 140, 140]})})
    assert infer.status_code == 200, infer.text
    submit = _as(proxy, "ann", "PUT", f"/datastore/label?image={image_id}&tag=final",
                 files={"label": ("label.nii.gz", infer.content)}, data={"params": json.dumps({"user": "ann"})})
    assert submit.status_code == 200, submit.text
    forbidden = [
        ("DELETE", f"/datastore/image?id={image_id}"), ("DELETE", f"/datastore/label?id={image_id}&tag=final"),
        ("POST", "/train/lung_nlb_seg"), ("DELETE", "/train/"), ("GET", "/logs/"), ("GET", "/logs/?lines=10"),
        ("GET", "/datastore/dataset"), ("PUT", "/datastore/image?image=new_one"), ("POST", "/scoring/lung_nlb_scores"),
        ("GET", "//logs/"), ("GET", "/datastore/%64ataset"), ("GET", "/info/../logs/"), ("POST", "/batch/infer/lung_nlb_seg"),
    ]
    for method, path in forbidden:
        response = _as(proxy, "ann", method, path)
        assert response.status_code == 403, f"annotator {method} {path}: {response.status_code} {response.text[:200]}"
        assert "may not" in response.json()["detail"]
    assert image_id in _as(proxy, "ada", "GET", "/datastore/?output=all").json()["objects"]  # nothing was deleted


def test_admin_is_allowed_what_annotators_are_not(proxy):
    assert _as(proxy, "ada", "DELETE", "/datastore/image?id=no_such_image").status_code == 404  # reached the server
    assert _as(proxy, "ada", "GET", "/logs/").status_code == 200
    checked = _as(proxy, "ada", "POST", "/train/lung_nlb_seg", json={"max_epochs": 0})
    assert checked.status_code == 400 and "max_epochs" in checked.json()["detail"]  # reached the server's checks
    dataset = _as(proxy, "ada", "GET", "/datastore/dataset")
    assert dataset.status_code == 200 and dataset.content[:2] == b"PK"


def test_tls_is_verified_against_the_generated_ca(proxy):
    with pytest.raises(requests.exceptions.SSLError):
        requests.get(proxy["url"] + "/info/", auth=("ada", USERS["ada"][1]), timeout=30)  # the system's CAs do not know it
    response = requests.get(proxy["url"] + "/info/", auth=("ada", USERS["ada"][1]), verify=proxy["ca"], timeout=30)
    assert response.status_code == 200
    plain = requests.get(proxy["url"].replace("https://", "http://") + "/info/", timeout=30)
    assert plain.status_code == 400  # nginx: plain HTTP to the TLS port; nothing is served unencrypted


def test_the_server_behind_the_proxy_listens_on_loopback_only(proxy):
    listening = set()
    for process in psutil.Process(proxy["process"].pid).children(recursive=True):
        for connection in process.net_connections(kind="inet"):
            if connection.status == psutil.CONN_LISTEN and connection.laddr.port == proxy["upstream"]:
                listening.add(connection.laddr.ip)
    assert listening == {"127.0.0.1"}


def test_the_proxy_passes_a_host_the_server_accepts(proxy):
    """nginx passes the client's Host on; the server behind accepts the proxy's names (PROXY_HOSTNAMES,
    localhost) and refuses any other (a DNS-rebinding page's own name)."""
    port = proxy["url"].rsplit(":", 1)[1]
    for host in (f"{PROXY_NAME}:{port}", f"localhost:{port}"):
        response = _as(proxy, "ann", "GET", "/info/", headers={"Host": host})
        assert response.status_code == 200, (host, response.text[:300])
    foreign = _as(proxy, "ann", "GET", "/info/", headers={"Host": f"evil.example:{port}"})
    assert foreign.status_code == 400 and "is not a name of this server" in foreign.json()["detail"]
