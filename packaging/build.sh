#!/usr/bin/env bash
# Build a release bundle of lockgw for packaging/install.sh (docs/install.md):
#   dist/lockgw-VERSION+BUILD/      install.sh, RELEASE, SHA256SUMS, the project wheel,
#                                   requirements.txt (the locked production dependencies, with
#                                   hashes: uv export --no-dev --frozen), config/, doc/
#   dist/lockgw-VERSION+BUILD.tar.gz
# Runs on the development machine (needs uv and the lock); the bundle needs neither.
# Usage: packaging/build.sh [--out DIR] [--build ID]
set -euo pipefail
cd "$(dirname "$0")/.."
export UV_PYTHON_DOWNLOADS=never UV_LINK_MODE=copy

out=dist
build=""
while [ $# -gt 0 ]; do
    case "$1" in
        --out) out=$2; shift 2 ;;
        --build) build=$2; shift 2 ;;
        *) echo "usage: packaging/build.sh [--out DIR] [--build ID]" >&2; exit 2 ;;
    esac
done

uv=${UV:-}
if [ -z "$uv" ]; then
    if command -v uv >/dev/null 2>&1; then uv=$(command -v uv)
    elif [ -x .tools/bin/uv ]; then uv=$PWD/.tools/bin/uv
    else echo "build.sh: uv not found (./dev.sh test installs it into .tools/)" >&2; exit 2
    fi
fi

version=$(sed -n 's/^version = "\(.*\)"$/\1/p' pyproject.toml | head -1)
if [ -z "$build" ]; then
    build=$(git rev-parse --short=10 HEAD 2>/dev/null || date -u +%Y%m%d%H%M%S)
    git diff --quiet HEAD -- 2>/dev/null || build="$build.dirty$(date -u +%Y%m%d%H%M%S)"
fi
case "$build" in *[!A-Za-z0-9.]*) echo "build.sh: --build takes [A-Za-z0-9.]" >&2; exit 2 ;; esac
release="$version+$build"
name="lockgw-$release"
mkdir -p "$out"
stage="$out/$name"
rm -rf "$stage"
mkdir -p "$stage/config" "$stage/doc"

"$uv" build --wheel --out-dir "$stage" -q ${UV_OFFLINE:+--offline}
"$uv" export --no-dev --frozen --no-emit-project --no-header --format requirements-txt \
    -o "$stage/requirements.txt" -q
cp packaging/install.sh "$stage/install.sh"
chmod 0755 "$stage/install.sh"
cp config/lockgw.toml config/lockgw.service config/mosquitto-bridge.conf config/lockgw.acl "$stage/config/"
cp README.md CHANGELOG.md docs/*.md "$stage/doc/"
echo "$release" > "$stage/RELEASE"
(cd "$stage" && find . -type f ! -name SHA256SUMS -printf '%P\n' | LC_ALL=C sort | xargs sha256sum > SHA256SUMS)
tar -C "$out" -czf "$out/$name.tar.gz" "$name"
echo "$stage"
