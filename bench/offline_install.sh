#!/usr/bin/env bash
# The offline install, end to end (issue #26): build the wheelhouse here, then in a fresh clone with
# a fresh cache and pip cut off from every index and from this machine's pip config, install from
# the wheelhouse alone and run the README's set-up and a run. Usage: bench/offline_install.sh [WORKDIR]
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
work=${1:-/tmp/fedtune-offline}
rm -rf "$work" && mkdir -p "$work"
t0=$(date +%s)
make -C "$root" wheelhouse WHEELHOUSE_OUT="$work/house"
t1=$(date +%s)
git clone -q "$root" "$work/clone"
cd "$work/clone"
# no config file (this machine's pip.conf points at local indexes), no index: the wheelhouse alone
export PIP_CONFIG_FILE=/dev/null FEDTUNE_CACHE="$work/cache"
make install WHEELHOUSE="$work/house"
t2=$(date +%s)
make setup WHEELHOUSE="$work/house"
.venv/bin/fedtune run configs/tiny.yaml --set output_dir="$work/runs" --no-progress
.venv/bin/fedtune validate configs/demo.yaml
t3=$(date +%s)
echo "wheelhouse: $(ls "$work/house" | wc -l) wheels, $(du -sh "$work/house" | cut -f1); build $((t1 - t0)) s," \
     "offline install $((t2 - t1)) s, setup + tiny run + validate $((t3 - t2)) s"
