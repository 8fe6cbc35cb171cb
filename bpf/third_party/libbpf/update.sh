#!/bin/sh
# Refreshes the vendored libbpf headers from Debian's libbpf-dev, so that
# `make generate` compiles against the same helper definitions everywhere.
set -eu
cd "$(dirname "$0")"
src=${LIBBPF_INCLUDE:-/usr/include/bpf}
for f in bpf_helpers.h bpf_helper_defs.h bpf_endian.h; do
	cp "$src/$f" "$f"
done
dpkg-query -W -f='libbpf-dev ${Version}\n' libbpf-dev > VERSION 2>/dev/null || true
