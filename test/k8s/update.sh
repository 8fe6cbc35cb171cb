#!/usr/bin/env bash
# update.sh VERSION: points go.mod at k8s.io/kubernetes VERSION (e.g. v1.35.4),
# replacing each staging module with its published v0 release, then tidies.
set -euo pipefail
cd "$(dirname "$0")"
v=${1:?usage: update.sh vMAJOR.MINOR.PATCH}
staging=v0.${v#v1.}
mod=$(go mod download -json "k8s.io/kubernetes@$v" | sed -n 's/.*"GoMod": "\(.*\)",*/\1/p')
{
	sed -n '1,/^module /p' go.mod
	printf '\ngo 1.25.0\n\nrequire k8s.io/kubernetes %s\n\nreplace (\n' "$v"
	awk -v s="$staging" '$2 == "=>" && $3 ~ /^\.\/staging\// {printf "\t%s => %s %s\n", $1, $1, s}' "$mod"
	printf ')\n\n'
	sed -n '/^tool (/,/^)/p' go.mod
} >go.mod.new
mv go.mod.new go.mod
GOFLAGS=-mod=mod go mod tidy
