#!/usr/bin/env bash
# Build llama.cpp's `llama-server` for `hearth bench serve`'s llama-server column, from the llama.cpp
# sources vendored in the llama-cpp-python sdist of the version hearth runs: the same llama.cpp, the same
# compiler flags as `make install` (CMAKE_ARGS, default -DGGML_NATIVE=ON), no curl, only that target.
#
#     bench/build_llama_server.sh            # prints the binary's path; ~5-15 min on 2 cores
#
# The binary goes to $HEARTH_HOME/llama-server/<version>/llama-server (HEARTH_HOME defaults to
# ~/.cache/hearth). Idempotent: a second run with the same version and CMAKE_ARGS builds nothing.
# Settings (environment): LLAMA_CPP_PYTHON_VERSION (default: the installed llama-cpp-python's),
# CMAKE_ARGS, JOBS (default 2), PYTHON (default: the checkout's .venv, else python3).
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
python="${PYTHON:-}"
if [ -z "$python" ]; then
    if [ -x "$root/.venv/bin/python" ]; then python="$root/.venv/bin/python"; else python=python3; fi
fi
version="${LLAMA_CPP_PYTHON_VERSION:-$("$python" -c 'import importlib.metadata as m; print(m.version("llama-cpp-python"))')}"
cmake_args="${CMAKE_ARGS:--DGGML_NATIVE=ON}"
jobs="${JOBS:-2}"
home="${HEARTH_HOME:-$HOME/.cache/hearth}"
dest="$home/llama-server/$version"
binary="$dest/llama-server"
stamp="llama-cpp-python $version; CMAKE_ARGS $cmake_args"

if [ -x "$binary" ] && [ "$(cat "$dest/BUILD" 2>/dev/null)" = "$stamp" ]; then
    echo "$binary"
    exit 0
fi

work="$(mktemp -d "${TMPDIR:-/tmp}/hearth-llama-server-XXXXXX")"
trap 'rm -rf "$work"' EXIT
echo "building llama-server from llama-cpp-python $version's sources in $work" >&2
"$python" -m pip download -q --no-binary :all: --no-deps "llama-cpp-python==$version" -d "$work"
tar -xzf "$work"/llama_cpp_python-"$version".tar.gz -C "$work" 2>/dev/null \
    || tar -xzf "$work"/llama-cpp-python-"$version".tar.gz -C "$work"
src="$(find "$work" -maxdepth 4 -type d -path '*/vendor/llama.cpp' | head -n 1)"
[ -n "$src" ] || { echo "no vendor/llama.cpp in the llama-cpp-python $version sdist" >&2; exit 1; }

# shellcheck disable=SC2086  # CMAKE_ARGS is a list of arguments
cmake -S "$src" -B "$work/build" -DCMAKE_BUILD_TYPE=Release -DLLAMA_CURL=OFF -DBUILD_SHARED_LIBS=OFF \
    -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=ON $cmake_args >&2
cmake --build "$work/build" --target llama-server -j "$jobs" >&2

mkdir -p "$dest"
cp "$work/build/bin/llama-server" "$binary.tmp"
mv -f "$binary.tmp" "$binary"
printf '%s\n' "$stamp" > "$dest/BUILD"
echo "$binary"
