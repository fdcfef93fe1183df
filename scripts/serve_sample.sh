#!/usr/bin/env bash
# The main job: set up, then serve the NLB U-Net as a MONAI Label app on the bundled sample studies.
# The server writes into its studies folder (datastore, final labels), so it works on a copy in runs/.
# It listens on 127.0.0.1 only: this machine's users and programs reach it, the network does not.
# To serve other machines, use scripts/serve_proxy.sh (TLS + per-user passwords in front of this
# server); `--host <non-loopback address>` is refused unless MONAI Label's own authentication is on.
set -euo pipefail
cd "$(dirname "$0")/.."

host=127.0.0.1
args=()
while [ $# -gt 0 ]; do
    case "$1" in
        --host|-i) host="${2:?--host needs an address}"; shift 2 ;;
        --host=*) host="${1#--host=}"; shift ;;
        *) args+=("$1"); shift ;;
    esac
done
case "$host" in
    127.*|localhost|::1|\[::1\]) ;;
    *)
        if [ "${MONAI_LABEL_AUTH_ENABLE:-false}" != "true" ]; then
            echo "serve_sample.sh: refusing to listen on $host without authentication: anyone who can reach it" \
                 "could read, change and delete the studies and replace the model." >&2
            echo "  To serve other machines, keep the server on 127.0.0.1 and start the authenticated TLS proxy" \
                 "in front of it: bash scripts/serve_proxy.sh (see docs/app.md, section Security)." >&2
            echo "  Or enable MONAI Label's own authentication: MONAI_LABEL_AUTH_ENABLE=true with a Keycloak" \
                 "realm at MONAI_LABEL_AUTH_REALM_URI." >&2
            exit 2
        fi ;;
esac

# LUNGNLB_SKIP_SETUP=1: the environment is already set up; LUNGNLB_STUDIES: serve that folder instead
[ "${LUNGNLB_SKIP_SETUP:-0}" = 1 ] || bash scripts/setup.sh
studies="${LUNGNLB_STUDIES:-runs/sample_studies}"
[ -d "$studies" ] || { mkdir -p "$(dirname "$studies")" && cp -r sample_data/studies "$studies"; }
# monailabel's launcher runs the first `python` on PATH: make it the venv's.
export PATH="$PWD/.venv/bin:$PATH"
# huge pages for torch's large CPU tensors (lungnlb/runtime.py): fewer page faults per forward, measured in docs/method.md
export THP_MEM_ALLOC_ENABLE="${THP_MEM_ALLOC_ENABLE:-1}"
exec monailabel start_server --app apps/lungnlb --studies "$studies" --host "$host" --conf models all ${args[@]+"${args[@]}"}
