#!/usr/bin/env bash
# Fetch ONNX Runtime's C/C++ API headers for the native custom-op library (mq_export/runtime/ort_native.py).
#
# The PyPI onnxruntime wheel ships no headers; Debian 13 (trixie) packages them as libonnxruntime-dev.
# This downloads that one .deb with apt-get, using a source list, package lists and cache kept in a
# private directory (the system's apt configuration and installed packages are not touched), and
# unpacks it with dpkg -x into the per-user cache, outside any repository:
#
#   ${XDG_CACHE_HOME:-~/.cache}/mq_export/ort-headers/<version>/usr/include/onnxruntime/
#
# where ort_native finds it. Prints that include directory. Needs apt-get, dpkg and network access
# to a Debian archive (MQ_EXPORT_DEBIAN_MIRROR, default: the machine's own Debian URI, else
# http://deb.debian.org/debian). Exits non-zero, with the reason on stderr, when it cannot fetch.
set -euo pipefail

fail() { echo "fetch_ort_headers: $*" >&2; exit 1; }
for tool in apt-get apt-cache dpkg; do
    command -v "$tool" >/dev/null || fail "$tool not found (a Debian-based system is needed)"
done

cache="${XDG_CACHE_HOME:-$HOME/.cache}/mq_export/ort-headers"
keyring=/usr/share/keyrings/debian-archive-keyring.gpg
[ -r "$keyring" ] || fail "$keyring not found (install debian-archive-keyring)"
mirror="${MQ_EXPORT_DEBIAN_MIRROR:-}"
if [ -z "$mirror" ]; then   # the machine's own Debian archive (deb822 or one-line sources)
    mirror=$(grep -hsoE 'https?://[^ ]*/debian/?( |$)' /etc/apt/sources.list.d/*.sources /etc/apt/sources.list \
             | head -n1 | tr -d ' ' || true)
    mirror="${mirror:-http://deb.debian.org/debian}"
fi

apt_dir=$(mktemp -d "${TMPDIR:-/tmp}/mq_export_apt.XXXXXXXX")
trap 'rm -rf "$apt_dir"' EXIT
mkdir -p "$apt_dir/lists/partial" "$apt_dir/cache/archives/partial" "$apt_dir/deb"
echo "deb [signed-by=$keyring] $mirror trixie main" > "$apt_dir/sources.list"
apt_opts=(-o "Dir::Etc::SourceList=$apt_dir/sources.list" -o Dir::Etc::SourceParts=/dev/null
          -o "Dir::State::Lists=$apt_dir/lists" -o "Dir::Cache=$apt_dir/cache" -o Dir::State::status=/dev/null
          -o Debug::NoLocking=1 -o APT::Sandbox::User=root -q)

apt-get "${apt_opts[@]}" update >"$apt_dir/update.log" 2>&1 \
    || fail "apt-get update of $mirror trixie failed: $(tail -n1 "$apt_dir/update.log")"
version=$(apt-cache "${apt_opts[@]}" show libonnxruntime-dev 2>/dev/null | sed -n 's/^Version: //p' | head -n1 || true)
[ -n "$version" ] || fail "libonnxruntime-dev not found in $mirror trixie ($(grep -m1 -E '^(W|E):' "$apt_dir/update.log" || echo 'no package list'))"
target="$cache/${version//[^A-Za-z0-9.+~-]/_}"
include="$target/usr/include/onnxruntime"
if [ ! -f "$include/onnxruntime_cxx_api.h" ]; then
    (cd "$apt_dir/deb" && apt-get "${apt_opts[@]}" download libonnxruntime-dev >"$apt_dir/download.log" 2>&1) \
        || fail "apt-get download libonnxruntime-dev failed: $(tail -n1 "$apt_dir/download.log")"
    mkdir -p "$cache"
    staging=$(mktemp -d "$cache/.partial.XXXXXXXX")
    dpkg -x "$apt_dir"/deb/libonnxruntime-dev_*.deb "$staging"
    [ -f "$staging/usr/include/onnxruntime/onnxruntime_cxx_api.h" ] || { rm -rf "$staging"; fail "the package has no onnxruntime_cxx_api.h"; }
    rm -rf "$target"
    mv "$staging" "$target"          # whole or absent: a concurrent reader never sees half a tree
fi
echo "$include"
