#!/usr/bin/env bash
# Print the path of a llama-cpp-python wheel (the exact pin of pyproject.toml's agent extra) compiled with the given
# CMake flags for PYTHON's version, building it first when it is missing. One wheel per pin, flags, Python minor
# version and architecture, kept in ~/.cache/llm-latency-lens/deb-wheels/<key>/: `make venv` and the agent .deb
# (packaging/build-deb.sh) share it, so a new machine compiles llama.cpp for them once. pip's own wheel cache ignores
# CMAKE_ARGS (it could hand back a build with other flags), so the build bypasses it.
#
#   packaging/llama-wheel.sh PYTHON [CMAKE_ARGS]     # CMAKE_ARGS default: -DGGML_NATIVE=OFF
#
# -DGGML_NATIVE=OFF compiles for any CPU of the architecture (on x86-64: AVX2, FMA, F16C; no AVX-512 or AMX, whose
# kernels fault in virtual machines that advertise AMX without enabling it).
set -euo pipefail

root=$(cd "$(dirname "$0")/.." && pwd)
python=${1:?usage: llama-wheel.sh PYTHON [CMAKE_ARGS]}
cmake_args=${2:--DGGML_NATIVE=OFF}
llama=$("$python" -c 'import sys, tomllib; print(next(d for d in tomllib.load(open(sys.argv[1], "rb"))["project"]["optional-dependencies"]["agent"] if d.startswith("llama-cpp-python")))' "$root/pyproject.toml")
pyver=$("$python" -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")')
arch=$(uname -m)
key=$(printf '%s|%s|%s|%s' "$llama" "$cmake_args" "$pyver" "$arch" | sha256sum | cut -c1-16)
wheels="${XDG_CACHE_HOME:-$HOME/.cache}/llm-latency-lens/deb-wheels/$key"
if ! ls "$wheels"/llama_cpp_python-*.whl >/dev/null 2>&1; then
    echo "llama-wheel: compiling $llama ($cmake_args, Python $pyver) into $wheels (about 8 minutes on 2 cores, once)" >&2
    rm -rf "$wheels.tmp" && mkdir -p "$wheels.tmp"
    CMAKE_ARGS="$cmake_args" "$python" -m pip wheel --quiet --disable-pip-version-check --no-cache-dir --no-deps \
        -w "$wheels.tmp" "$llama" >&2
    rm -rf "$wheels" && mv "$wheels.tmp" "$wheels"
fi
ls "$wheels"/llama_cpp_python-*.whl | head -n 1
