#!/usr/bin/env bash
# lockgw installer: install, upgrade, rollback, uninstall on Debian 12 and Raspberry Pi OS
# bookworm (arm64, armhf, amd64). Run as root from a release bundle (packaging/build.sh):
#
#   sudo ./install.sh [install]          install or upgrade to this bundle's release (idempotent)
#   sudo ./install.sh reconfigure        re-admit the configured broker (IPAddressAllow= drop-in)
#   sudo ./install.sh rollback           back to the release that ran before the last upgrade
#   sudo ./install.sh uninstall [--purge]   remove the program; --purge also the data and user
#   sudo ./install.sh status
#
# Layout (docs/install.md): /opt/lockgw/releases/RELEASE (a production-only venv: no dev tools),
# /opt/lockgw/current and /opt/lockgw/previous (symlinks), /etc/lockgw (0750 root:lockgw),
# /var/lib/lockgw (0700 lockgw, the data: never touched by upgrades), the unit and its drop-in
# in /etc/systemd/system, the BlueZ settings in /etc/bluetooth/main.conf.
#
# Environment: DESTDIR=DIR installs into a scratch root (no apt, no systemctl; users through
# useradd --prefix), LOCKGW_OFFLINE=1 installs the wheels from uv's cache only, UV=PATH uses
# that uv (else uv on PATH, else pip in the new venv), PYTHON=python3.11, LOCKGW_NO_APT=1,
# LOCKGW_NO_BLUEZ=1 leaves /etc/bluetooth/main.conf alone.
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
SWITCHED=""
R=${DESTDIR:-}
R=${R%/}
OPT=/opt/lockgw
UNIT=/etc/systemd/system/lockgw.service
DROPIN_DIR=/etc/systemd/system/lockgw.service.d
CONF=/etc/lockgw/lockgw.toml
DATA=/var/lib/lockgw
MAIN_CONF=/etc/bluetooth/main.conf

say() { echo "install.sh: $*" >&2; }
die() { say "$*"; exit 1; }
# A venv built under a root whose path holds whitespace gets /bin/sh trampolines naming that
# path (no shebang can), which would not run once installed: refused, not built broken.
case $R in *[[:space:]]*) die "DESTDIR must not contain whitespace: ${R@Q}" ;; esac
live() { [ -z "$R" ]; }   # installing onto the running system (not a scratch root)
have_systemd() { live && [ -d /run/systemd/system ] && command -v systemctl >/dev/null 2>&1; }

[ "$(id -u)" = 0 ] || die "run as root (sudo $0 $*)"

# --- bundle ---------------------------------------------------------------------------------

bundle_check() {
    if [ ! -f "$here/RELEASE" ]; then
        # Run from a source checkout: build the bundle first, then run its installer.
        if [ -x "$here/build.sh" ]; then
            local stage
            stage=$("$here/build.sh" --out "$here/../dist" | tail -1)
            exec "$stage/install.sh" install "$@"
        fi
        die "no RELEASE file next to install.sh: run it from a bundle made by packaging/build.sh"
    fi
    (cd "$here" && sha256sum --quiet -c SHA256SUMS) || die "bundle damaged: SHA256SUMS do not match"
    RELEASE=$(cat "$here/RELEASE")
    case "$RELEASE" in *[!A-Za-z0-9.+_-]*|"") die "bad RELEASE: $RELEASE" ;; esac
}

# --- users and groups -----------------------------------------------------------------------

prefix_args=()
[ -n "$R" ] && prefix_args=(--prefix "$R")

has_group() { grep -q "^$1:" "$R/etc/group"; }
has_user() { grep -q "^$1:" "$R/etc/passwd"; }
uid_of() { awk -F: -v n="$1" '$1 == n { print $3 }' "$R/etc/passwd"; }
gid_of() { awk -F: -v n="$1" '$1 == n { print $3 }' "$R/etc/group"; }
in_group() { awk -F: -v g="$1" -v u="$2" '$1 == g { n = split($4, m, ","); for (i = 1; i <= n; i++) if (m[i] == u) f = 1 } END { exit !f }' "$R/etc/group"; }

ensure_users() {
    # bluetooth: BlueZ's D-Bus policy on Debian lets this group talk to org.bluez (bluez's
    # postinst makes it; made here too for a scratch root or a machine without bluez yet).
    has_group bluetooth || groupadd "${prefix_args[@]}" --system bluetooth
    has_group lockgw || groupadd "${prefix_args[@]}" --system lockgw
    if ! has_user lockgw; then
        useradd "${prefix_args[@]}" --system --gid lockgw --groups bluetooth \
            --home-dir "$DATA" --no-create-home --shell /usr/sbin/nologin \
            --comment "lockgw gateway daemon" lockgw
    elif ! in_group bluetooth lockgw; then
        usermod "${prefix_args[@]}" --append --groups bluetooth lockgw
    fi
}

# --- packages -------------------------------------------------------------------------------

arch() { uname -m; }

apt_deps() {
    live && [ -z "${LOCKGW_NO_APT:-}" ] && command -v apt-get >/dev/null 2>&1 || return 0
    local pkgs=(python3 python3-venv bluez)
    if [ "$(arch)" = armv7l ] || [ "$(arch)" = armv6l ]; then
        # uv.lock has no armv7l wheels for cffi, pynacl, dbus-fast and wcwidth (built here
        # from their hash-pinned sdists), and none at all for libusb-package (left out: Bumble
        # falls back to Debian's libusb). docs/install.md, Wheels.
        pkgs+=(build-essential python3-dev libffi-dev libsodium-dev pkg-config libusb-1.0-0)
    fi
    local missing=()
    for p in "${pkgs[@]}"; do dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p"); done
    [ ${#missing[@]} -eq 0 ] && return 0
    say "installing Debian packages: ${missing[*]}"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
}

python_bin() {
    local py
    for py in ${PYTHON:-} python3.13 python3.12 python3.11 python3; do
        if command -v "$py" >/dev/null 2>&1 &&
            "$py" -c 'import sys, venv; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
            command -v "$py"
            return 0
        fi
    done
    die "Python 3.11 or newer with venv is required (apt-get install python3-venv)"
}

requirements_for_arch() {
    # The locked requirements; on 32-bit ARM without libusb-package (no wheel, no sdist).
    if [ "$(arch)" = armv7l ] || [ "$(arch)" = armv6l ]; then
        awk '/^[a-z]/ { skip = ($1 ~ /^libusb-package==/) } !skip' "$here/requirements.txt"
    else
        cat "$here/requirements.txt"
    fi
}

build_release() {
    local rel=$OPT/releases/$RELEASE dir
    dir="$R$rel"
    if [ -f "$dir/.complete" ]; then
        say "release $RELEASE already installed in $rel"
        return 0
    fi
    rm -rf "$dir"   # a half-built one from an interrupted run
    mkdir -p "$R$OPT/releases"
    local py uv req wheel
    py=$(python_bin)
    uv=${UV:-$(command -v uv || true)}
    req="$R$OPT/releases/.requirements-$RELEASE.txt"
    requirements_for_arch > "$req"
    wheel=$(ls "$here"/lockgw-*.whl)
    export SODIUM_INSTALL=system   # pynacl from source (armv7l) links Debian's libsodium
    if [ -n "$uv" ]; then
        "$py" -m venv --without-pip "$dir"
        local flags=(--python "$dir/bin/python" --no-deps -q)
        [ -n "${LOCKGW_OFFLINE:-}" ] && flags+=(--offline)
        UV_PYTHON_DOWNLOADS=never "$uv" pip install "${flags[@]}" --require-hashes -r "$req"
        UV_PYTHON_DOWNLOADS=never "$uv" pip install "${flags[@]}" "$wheel"
    else
        "$py" -m venv "$dir"
        "$dir/bin/pip" install -q --no-deps --require-hashes -r "$req"
        "$dir/bin/pip" install -q --no-deps "$wheel"
    fi
    rm -f "$req"
    if [ -n "$R" ]; then
        # Built under DESTDIR: the scripts must name the venv where it will run.
        # Compared and cut as literal text, not a sed expression: DESTDIR may hold | or regex
        # characters. Written back through cat, which keeps the file's mode.
        local f first
        for f in "$dir"/bin/*; do
            [ -f "$f" ] && [ ! -L "$f" ] || continue
            first=$(head -n 1 "$f")
            if [[ $first == "#!$R/"* ]]; then
                { printf '#!/%s\n' "${first#"#!$R/"}"; tail -n +2 "$f"; } > "$f.lockgw-tmp"
                cat "$f.lockgw-tmp" > "$f"
                rm -f "$f.lockgw-tmp"
            fi
        done
    fi
    mkdir -p "$dir/doc" "$dir/config"
    cp "$here"/doc/*.md "$dir/doc/"
    cp "$here"/config/* "$dir/config/"
    cp "$here/RELEASE" "$dir/RELEASE"
    cp "$here/install.sh" "$dir/install.sh"   # rollback and uninstall without the bundle
    "$dir/bin/python" -c 'import gateway.cli.main, nacl.signing, bumble, cryptography' ||
        die "the new release does not import; left in $rel (not made current)"
    chmod -R go-w "$dir"
    touch "$dir/.complete"
    say "built release $RELEASE in $rel"
}

# --- files ----------------------------------------------------------------------------------

install_files() {
    local uid gid
    uid=$(uid_of lockgw)
    gid=$(gid_of lockgw)
    install -d -m 0750 -o 0 -g "$gid" "$R/etc/lockgw"
    if [ ! -e "$R$CONF" ]; then
        install -m 0640 -o 0 -g "$gid" "$here/config/lockgw.toml" "$R$CONF"
        say "wrote the example configuration to $CONF: edit [gateway], [mqtt], [trust]"
    fi
    if [ ! -d "$R$DATA" ]; then
        install -d -m 0700 -o "$uid" -g "$gid" "$R$DATA"
    else
        chown "$uid:$gid" "$R$DATA"   # the directory only: the data is never rewritten
    fi
    install -d -m 0755 "$R/usr/local/bin"
    ln -sfn "$OPT/current/bin/lockgw" "$R/usr/local/bin/lockgw"   # the technician's command
    install -d -m 0755 "$R/etc/systemd/system"
    install -m 0644 "$here/config/lockgw.service" "$R$UNIT"
    write_network_dropin
}

write_network_dropin() {
    install -d -m 0755 "$R$DROPIN_DIR"
    local py=$R$OPT/current/bin/python tmp
    [ -x "$py" ] || py=$R$OPT/releases/$RELEASE/bin/python
    tmp=$(mktemp)
    if "$py" -m gateway.cli.hostsetup network-dropin "$R$CONF" --resolv-conf "$R/etc/resolv.conf" > "$tmp"; then
        local content
        content=$(<"$tmp")  # the root path replaced literally (not a sed expression: DESTDIR may hold |)
        printf '%s\n' "${content//"$R$CONF"/"$CONF"}" > "$tmp"
        install -m 0644 "$tmp" "$R$DROPIN_DIR/50-broker.conf"
    else
        say "could not write $DROPIN_DIR/50-broker.conf (see above); the unit admits localhost only"
    fi
    rm -f "$tmp"
}

bluez_settings() {
    [ -n "${LOCKGW_NO_BLUEZ:-}" ] && return 0
    if [ ! -f "$R$MAIN_CONF" ]; then
        say "$MAIN_CONF not found: BlueZ settings not applied (install bluez, run install.sh again)"
        return 0
    fi
    [ -e "$R$MAIN_CONF.lockgw-orig" ] || cp -p "$R$MAIN_CONF" "$R$MAIN_CONF.lockgw-orig"
    local before
    before=$(sha256sum < "$R$MAIN_CONF")
    "$R$OPT/current/bin/python" -m gateway.cli.hostsetup bluez "$R$MAIN_CONF" >&2
    if [ "$before" != "$(sha256sum < "$R$MAIN_CONF")" ] && have_systemd; then
        systemctl try-restart bluetooth.service || say "restart bluetooth yourself: systemctl restart bluetooth"
    fi
}

switch_to() {
    # Atomically point current at release $1, remembering the one it replaces as previous.
    # Relative links: they hold inside a scratch root (DESTDIR) as on the machine.
    local target=releases/$1 old
    old=$(readlink "$R$OPT/current" 2>/dev/null || true)
    if [ "$old" != "$target" ]; then
        SWITCHED=1
        [ -n "$old" ] && ln -sfn "$old" "$R$OPT/previous"
        ln -sfn "$target" "$R$OPT/current.new"
        mv -T "$R$OPT/current.new" "$R$OPT/current"
        say "current → $OPT/$target${old:+ (previous: $OPT/$old)}"
    fi
}

restart_or_roll_back() {
    have_systemd || return 0
    systemctl daemon-reload
    systemctl enable lockgw.service >/dev/null 2>&1
    # Credentials (LoadCredential=NAME:/etc/lockgw/NAME) are files in /etc/lockgw outside the unit.
    if ! CREDENTIALS_DIRECTORY=/etc/lockgw "$OPT/current/bin/lockgw" --config "$CONF" config check >/dev/null 2>&1; then
        say "$CONF does not pass 'lockgw config check' yet: edit it, then: systemctl restart lockgw"
        return 0
    fi
    if [ -z "${SWITCHED:-}" ] && systemctl is-active --quiet lockgw.service; then
        say "lockgw is already running $RELEASE: not restarted"
        return 0
    fi
    # Type=notify: restart returns once the daemon said READY=1, or fails.
    if systemctl restart lockgw.service; then
        say "lockgw is running $(cat "$OPT/current/RELEASE"); check it with: lockgw doctor"
    elif [ -L "$OPT/previous" ] && [ "$(readlink "$OPT/previous")" != "$(readlink "$OPT/current")" ]; then
        say "the new release did not start: rolling back"
        rollback
        exit 1
    else
        die "lockgw did not start: journalctl -u lockgw"
    fi
}

# --- commands -------------------------------------------------------------------------------

cmd_install() {
    bundle_check "$@"
    apt_deps
    ensure_users
    build_release
    switch_to "$RELEASE"
    install_files
    bluez_settings
    restart_or_roll_back
}

cmd_reconfigure() {
    [ -x "$R$OPT/current/bin/python" ] || die "lockgw is not installed"
    write_network_dropin
    have_systemd && systemctl daemon-reload && systemctl try-restart lockgw.service
    say "wrote $DROPIN_DIR/50-broker.conf"
}

rollback() {
    local prev
    prev=$(readlink "$R$OPT/previous" 2>/dev/null) || die "no previous release to roll back to"
    [ -f "$R$OPT/$prev/.complete" ] || die "previous release $prev is not complete"
    switch_to "$(basename "$prev")"
    if have_systemd; then
        systemctl daemon-reload
        systemctl try-restart lockgw.service || die "the previous release did not start either: journalctl -u lockgw"
    fi
}

cmd_uninstall() {
    local purge=""
    [ "${1:-}" = --purge ] && purge=1
    if have_systemd; then
        systemctl disable --now lockgw.service >/dev/null 2>&1 || true
    fi
    rm -rf "$R$UNIT" "$R$DROPIN_DIR" "$R$OPT"
    [ "$(readlink "$R/usr/local/bin/lockgw" 2>/dev/null)" = "$OPT/current/bin/lockgw" ] && rm -f "$R/usr/local/bin/lockgw"
    have_systemd && systemctl daemon-reload
    if [ -n "$purge" ]; then
        rm -rf "$R/etc/lockgw" "$R$DATA"
        has_user lockgw && userdel "${prefix_args[@]}" lockgw
        has_group lockgw && groupdel "${prefix_args[@]}" lockgw
        if [ -f "$R$MAIN_CONF.lockgw-orig" ]; then
            mv -f "$R$MAIN_CONF.lockgw-orig" "$R$MAIN_CONF"
            have_systemd && { systemctl try-restart bluetooth.service || true; }
        fi
        say "removed lockgw, its configuration, its data and its user"
    else
        say "removed lockgw; kept $CONF and the data in $DATA (uninstall --purge removes them)"
    fi
}

cmd_status() {
    echo "current:  $(readlink "$R$OPT/current" 2>/dev/null || echo none)"
    echo "previous: $(readlink "$R$OPT/previous" 2>/dev/null || echo none)"
    ls -1 "$R$OPT/releases" 2>/dev/null | sed 's/^/release:  /'
    have_systemd && systemctl --no-pager --lines=0 status lockgw.service || true
}

cmd=${1:-install}
[ $# -gt 0 ] && shift
case "$cmd" in
    install | upgrade) cmd_install "$@" ;;
    reconfigure) cmd_reconfigure ;;
    rollback) rollback; say "rolled back to $OPT/$(readlink "$R$OPT/current")" ;;
    uninstall) cmd_uninstall "$@" ;;
    status) cmd_status ;;
    *) echo "usage: install.sh [install|upgrade|reconfigure|rollback|uninstall [--purge]|status]" >&2; exit 2 ;;
esac
