#!/usr/bin/env bash
# Serve other machines: the LungNLB MONAI Label server stays on 127.0.0.1 (scripts/serve_sample.sh)
# behind Debian's nginx with TLS, per-user passwords (HTTP basic auth, SHA-512 crypt hashes) and a
# role table: annotators read, infer, get the next sample and submit labels; admins may also delete,
# train, read /logs and download the dataset (scripts/proxy/nginx.conf.template).
#
#   bash scripts/serve_proxy.sh adduser <name> annotator|admin   # password from stdin (or PROXY_PASSWORD)
#   bash scripts/serve_proxy.sh deluser <name>
#   bash scripts/serve_proxy.sh [serve_sample.sh arguments]      # proxy + server; Ctrl-C stops both
#
# Settings (environment):
#   PROXY_DIR            state: CA, certificate, users, nginx.conf, logs            [runs/proxy]
#   PROXY_LISTEN         address:port the proxy listens on (the exposed one)        [0.0.0.0:8443]
#   PROXY_UPSTREAM_PORT  loopback port of the MONAI Label server behind it          [8000]
#   PROXY_HOSTNAMES      extra names / IP addresses (comma-separated) clients use to reach this machine,
#                        put into the generated certificate besides localhost, 127.0.0.1 and `hostname`;
#                        the server behind accepts these names in the Host header nginx passes on (and
#                        `hostname` and PROXY_LISTEN's address): any other name gets 400
#   PROXY_CERT, PROXY_KEY  your own certificate and key instead of the generated ones
#   PROXY_MAX_BODY       largest upload nginx passes on                               [1g]
# The first start generates a CA (PROXY_DIR/ca.pem: give it to the clients, e.g. Slicer or
# `curl --cacert`) and a server certificate signed by it.
set -euo pipefail
cd "$(dirname "$0")/.."
dir="$(realpath -m "${PROXY_DIR:-runs/proxy}")"
mkdir -p "$dir/tmp"
chmod 700 "$dir"
touch "$dir/users.htpasswd" "$dir/roles.map"

replace_line() {  # replace_line <file> <name> <new line or empty>: atomically, other users kept
    local file="$1" name="$2" line="$3" tmp
    tmp="$(mktemp "$file.XXXXXX")"
    grep -v -E "^${name}[: ]" "$file" > "$tmp" || true
    [ -z "$line" ] || printf '%s\n' "$line" >> "$tmp"
    chmod --reference="$file" "$tmp" 2>/dev/null || true
    mv "$tmp" "$file"
}

reload_running_proxy() {  # the role table is part of nginx's configuration: a running proxy reloads it
    if [ -s "$dir/nginx.pid" ] && kill -0 "$(cat "$dir/nginx.pid")" 2>/dev/null; then
        kill -HUP "$(cat "$dir/nginx.pid")"
    fi
}

case "${1:-}" in
    adduser)
        name="${2:-}"; role="${3:-}"
        [[ "$name" =~ ^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$ ]] || { echo "serve_proxy.sh: user name: 1-64 letters, digits, '.', '_', '-'" >&2; exit 2; }
        [[ "$role" == annotator || "$role" == admin ]] || { echo "serve_proxy.sh: role must be annotator or admin" >&2; exit 2; }
        password="${PROXY_PASSWORD:-}"
        if [ -z "$password" ]; then
            [ -t 0 ] && printf 'password for %s: ' "$name" >&2
            IFS= read -r ${BASH_VERSION:+-s} password || true
            [ -t 0 ] && echo >&2
        fi
        [ "${#password}" -ge 8 ] || { echo "serve_proxy.sh: the password needs at least 8 characters" >&2; exit 2; }
        hash="$(printf '%s\n' "$password" | openssl passwd -6 -stdin)"
        replace_line "$dir/users.htpasswd" "$name" "$name:$hash"
        replace_line "$dir/roles.map" "$name" "$name $role;"
        echo "serve_proxy.sh: $name ($role) saved in $dir/users.htpasswd" >&2
        reload_running_proxy
        exit 0 ;;
    deluser)
        name="${2:?deluser needs a user name}"
        replace_line "$dir/users.htpasswd" "$name" ""
        replace_line "$dir/roles.map" "$name" ""
        reload_running_proxy
        exit 0 ;;
esac

[ -s "$dir/users.htpasswd" ] || {
    echo "serve_proxy.sh: no users yet: add one first, e.g. bash scripts/serve_proxy.sh adduser alice admin" >&2
    exit 2
}
nginx_bin="$(command -v nginx || echo /usr/sbin/nginx)"
[ -x "$nginx_bin" ] || { echo "serve_proxy.sh: nginx is not installed: run bash scripts/setup.sh as root, or apt-get install nginx" >&2; exit 2; }

if [ -n "${PROXY_CERT:-}" ]; then
    cert="$PROXY_CERT"; key="${PROXY_KEY:?PROXY_KEY must name the key of PROXY_CERT}"
else
    cert="$dir/server.pem"; key="$dir/server.key"
    if [ ! -s "$dir/ca.pem" ]; then
        openssl req -x509 -newkey rsa:3072 -nodes -sha256 -days 3650 -subj "/CN=LungNLB proxy CA" \
            -keyout "$dir/ca.key" -out "$dir/ca.pem" \
            -addext "basicConstraints=critical,CA:TRUE" -addext "keyUsage=critical,keyCertSign,cRLSign" 2>/dev/null
        rm -f "$cert" "$key"
    fi
    if [ ! -s "$cert" ]; then
        san="DNS:localhost,IP:127.0.0.1,DNS:$(hostname)"
        IFS=',' read -r -a extra <<< "${PROXY_HOSTNAMES:-}"
        for name in "${extra[@]}"; do
            name="${name// /}"; [ -n "$name" ] || continue
            if [[ "$name" =~ ^[0-9.]+$ || "$name" == *:* ]]; then san="$san,IP:$name"; else san="$san,DNS:$name"; fi
        done
        openssl req -newkey rsa:3072 -nodes -sha256 -subj "/CN=$(hostname)" -keyout "$key" -out "$dir/server.csr" 2>/dev/null
        printf 'subjectAltName=%s\nbasicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature,keyEncipherment\nextendedKeyUsage=serverAuth\nsubjectKeyIdentifier=hash\nauthorityKeyIdentifier=keyid\n' "$san" > "$dir/server.ext"
        openssl x509 -req -sha256 -days 825 -in "$dir/server.csr" -CA "$dir/ca.pem" -CAkey "$dir/ca.key" \
            -CAcreateserial -extfile "$dir/server.ext" -out "$cert" 2>/dev/null
    fi
    chmod 600 "$dir/ca.key" "$key"
fi

listen="${PROXY_LISTEN:-0.0.0.0:8443}"
upstream="${PROXY_UPSTREAM_PORT:-8000}"
user_line=""
if [ "$(id -u)" = 0 ]; then  # workers drop root; they read the users file and write request temp files
    chgrp nogroup "$dir" "$dir/users.htpasswd" "$dir/roles.map" && chmod 750 "$dir" && chmod 640 "$dir/users.htpasswd" "$dir/roles.map"
    chown -R nobody:nogroup "$dir/tmp"
    if setpriv --reuid=nobody --regid=nogroup --clear-groups test -r "$dir/users.htpasswd" 2>/dev/null; then
        user_line="user nobody nogroup;"
    else
        user_line="user root root;"
        echo "serve_proxy.sh: warning: user nobody cannot reach $dir (a parent folder is closed to it), so nginx's" \
             "workers run as root; put PROXY_DIR in a folder others may traverse to have them drop root" >&2
    fi
fi
sed -e "s|@DIR@|$dir|g" -e "s|@LISTEN@|$listen|g" -e "s|@CERT@|$cert|g" -e "s|@KEY@|$key|g" \
    -e "s|@UPSTREAM@|$upstream|g" -e "s|@MAX_BODY@|${PROXY_MAX_BODY:-1g}|g" -e "s|@USER@|$user_line|g" \
    scripts/proxy/nginx.conf.template > "$dir/nginx.conf"
"$nginx_bin" -t -q -e "$dir/error.log" -p "$dir/" -c "$dir/nginx.conf"

"$nginx_bin" -e "$dir/error.log" -p "$dir/" -c "$dir/nginx.conf" -g "daemon off;" &
nginx_pid=$!
trap 'kill "$nginx_pid" ${server_pid:-} 2>/dev/null || true' EXIT
trap 'exit 143' TERM
trap 'exit 130' INT
echo "serve_proxy.sh: https://$listen/ (CA: $dir/ca.pem) -> MONAI Label server on http://127.0.0.1:$upstream/" >&2
# the names clients reach the proxy by: nginx passes the client's Host on, and the server refuses
# other names (a DNS-rebinding page carries its own)
hosts="$(hostname)"
[ -z "${PROXY_HOSTNAMES:-}" ] || hosts="$hosts,${PROXY_HOSTNAMES// /}"
case "${listen%:*}" in 0.0.0.0|\[::\]|"") ;; *) hosts="$hosts,${listen%:*}" ;; esac
bash scripts/serve_sample.sh --host 127.0.0.1 --port "$upstream" --conf allowed_hosts "$hosts" "$@" &
server_pid=$!
wait "$server_pid"
