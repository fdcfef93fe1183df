#!/usr/bin/env bash
# Set up .venv with LungNLB, the MONAI Label app and the test tools. Safe to rerun.
# torch is installed first at the verified version (served from local disk here; a bare
# `pip install torch` would fetch a multi-GB CUDA build).
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/python ] || python3 -m venv .venv
.venv/bin/pip install -q --upgrade pip
.venv/bin/pip install -q torch==2.14.1 torchvision==0.29.1
.venv/bin/pip install -q -e ".[app,test,slicer,pacs]"

# Debian packages a test or script needs, as root with apt-get; their system services are not
# started (a package's service would listen on its default port, on every interface).
apt_install() {
    local policy=/usr/sbin/policy-rc.d made_policy=0
    if [ ! -e "$policy" ]; then
        printf '#!/bin/sh\nexit 101\n' > "$policy" && chmod +x "$policy" && made_policy=1
    fi
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$@" >/dev/null
    [ "$made_policy" = 0 ] || rm -f "$policy"
}
can_apt() { [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; }

# nginx for the authenticated TLS proxy, scripts/serve_proxy.sh, and its tests (serve_proxy.sh runs
# nginx on demand with its own configuration).
if ! command -v nginx >/dev/null 2>&1 && [ ! -x /usr/sbin/nginx ]; then
    if can_apt; then
        apt_install nginx openssl
    else
        echo "setup.sh: nginx is not installed and this is not root with apt-get: install Debian's nginx" \
             "(apt-get install nginx) to use scripts/serve_proxy.sh and to run tests/test_security_proxy.py" >&2
    fi
fi

# Orthanc with its DICOMweb plugin (Debian's orthanc, orthanc-dicomweb) for the local PACS of
# scripts/pacs_orthanc.py, scripts/serve_pacs_sample.sh and tests/test_pacs.py; iproute2 brings up
# the loopback interface of the network namespace Orthanc runs in.
if [ ! -x /usr/sbin/Orthanc ] || [ ! -e /usr/share/orthanc/plugins/libOrthancDicomWeb.so ] || ! command -v ip >/dev/null 2>&1; then
    if can_apt; then
        apt_install orthanc orthanc-dicomweb iproute2
    else
        echo "setup.sh: Orthanc is not installed and this is not root with apt-get: install Debian's orthanc," \
             "orthanc-dicomweb and iproute2 to use scripts/serve_pacs_sample.sh and to run tests/test_pacs.py" >&2
    fi
fi
