#!/bin/sh
# Install edgebit as a systemd service (Raspberry Pi OS / Debian with Python >= 3.11).
#
#   sudo ./install.sh [--model PATH|NAME] [--source PIP-SPEC] [--no-start]
#
# Creates the `edgebit` system user, a virtualenv in /opt/edgebit/venv, /etc/edgebit with the
# example configuration (kept if present), the systemd unit, then enables and starts it.
# Re-running upgrades the package and the unit; configuration files are never overwritten.
set -eu

HERE=$(cd "$(dirname "$0")" && pwd)
PREFIX=/opt/edgebit
CONF=/etc/edgebit
SERVICE_USER=edgebit
SOURCE="$HERE/.."
MODEL=""
START=yes

usage() { sed -n '2,9p' "$0" | sed 's/^# \{0,1\}//'; exit "$1"; }

while [ $# -gt 0 ]; do
    case "$1" in
        --model) MODEL="$2"; shift 2 ;;
        --source) SOURCE="$2"; shift 2 ;;
        --no-start) START=no; shift ;;
        -h|--help) usage 0 ;;
        *) echo "unknown option: $1" >&2; usage 2 ;;
    esac
done

[ "$(id -u)" -eq 0 ] || { echo "run as root (sudo $0)" >&2; exit 1; }
command -v systemctl >/dev/null || { echo "systemd is required" >&2; exit 1; }
python3 -c 'import sys; sys.exit(sys.version_info < (3, 11))' \
    || { echo "Python >= 3.11 is required (found $(python3 --version 2>&1))" >&2; exit 1; }
python3 -m venv --help >/dev/null 2>&1 || { echo "install python3-venv first: apt install python3-venv" >&2; exit 1; }

echo "== user $SERVICE_USER"
if ! id -u "$SERVICE_USER" >/dev/null 2>&1; then
    useradd --system --user-group --home-dir /var/lib/edgebit --no-create-home \
        --shell /usr/sbin/nologin --comment "edgebit inference node" "$SERVICE_USER"
fi

echo "== virtualenv $PREFIX/venv"
install -d -m 0755 "$PREFIX"
[ -x "$PREFIX/venv/bin/python" ] || python3 -m venv "$PREFIX/venv"
"$PREFIX/venv/bin/pip" install --quiet --upgrade pip
"$PREFIX/venv/bin/pip" install --quiet --upgrade "$SOURCE"

echo "== configuration $CONF"
install -d -m 0750 -o root -g "$SERVICE_USER" "$CONF"
if [ ! -e "$CONF/edgebit.toml" ]; then
    install -m 0640 -o root -g "$SERVICE_USER" "$HERE/edgebit.toml" "$CONF/edgebit.toml"
    echo "   wrote $CONF/edgebit.toml: set the broker and tasks there"
fi
if [ ! -e "$CONF/edgebit.env" ]; then
    umask 027
    cat > "$CONF/edgebit.env" <<'EOF'
# Environment of the edgebit service (flags > these variables > edgebit.toml > defaults).
# The model: a path, a registry name or a file in /var/lib/edgebit/models (`edgebit models`).
EDGEBIT_MODEL=
# EDGEBIT_THREADS=4
# EDGEBIT_MQTT_HOST=mqtt.local
# EDGEBIT_MQTT_USERNAME=edgebit
# EDGEBIT_MQTT_PASSWORD=
# EDGEBIT_NODE_ID=pi5-a
EOF
    chgrp "$SERVICE_USER" "$CONF/edgebit.env"
    chmod 0640 "$CONF/edgebit.env"
fi
if [ -n "$MODEL" ]; then
    sed -i "s|^EDGEBIT_MODEL=.*|EDGEBIT_MODEL=$MODEL|" "$CONF/edgebit.env"
fi

echo "== systemd unit"
install -m 0644 "$HERE/edgebit.service" /etc/systemd/system/edgebit.service
systemctl daemon-reload
systemctl enable edgebit.service >/dev/null

if grep -q '^EDGEBIT_MODEL=.\+' "$CONF/edgebit.env"; then
    echo "== checking the configuration (as the service will see it)"
    systemd-run --quiet --pipe --wait --collect --uid="$SERVICE_USER" --gid="$SERVICE_USER" \
        -p EnvironmentFile="$CONF/edgebit.env" -p StateDirectory=edgebit -p CacheDirectory=edgebit \
        -E XDG_DATA_HOME=/var/lib -E XDG_CACHE_HOME=/var/cache -E XDG_CONFIG_HOME=/etc \
        "$PREFIX/venv/bin/edgebit" serve --config "$CONF/edgebit.toml" --check
    if [ "$START" = yes ]; then
        systemctl restart edgebit.service
        echo "started: journalctl -u edgebit -f"
    fi
else
    echo "set EDGEBIT_MODEL in $CONF/edgebit.env, then: systemctl start edgebit"
fi
