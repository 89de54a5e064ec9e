#!/usr/bin/env bash
# Tools the multi-host test bed (tests/testbed.py) needs: ip and tc (iproute2)
# and ping (iputils-ping). Installs only what is missing, with apt-get, quietly.
# Without root or apt-get it says so and exits 0: the netns tests then skip
# with their own reason instead of failing CI.
set -euo pipefail

declare -A package_of=([ip]=iproute2 [tc]=iproute2 [ping]=iputils-ping)
missing=()
for tool in ip tc ping; do
    if ! command -v "$tool" >/dev/null 2>&1; then
        missing+=("${package_of[$tool]}")
    fi
done
if [ ${#missing[@]} -eq 0 ]; then
    exit 0
fi
# One package name per entry, each once.
mapfile -t packages < <(printf '%s\n' "${missing[@]}" | sort -u)

if [ "$(id -u)" -ne 0 ]; then
    echo "netns-deps: not root, cannot install ${packages[*]}; the netns tests will skip" >&2
    exit 0
fi
if ! command -v apt-get >/dev/null 2>&1; then
    echo "netns-deps: no apt-get, cannot install ${packages[*]}; the netns tests will skip" >&2
    exit 0
fi

echo "netns-deps: installing ${packages[*]}" >&2
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends "${packages[@]}" >/dev/null
