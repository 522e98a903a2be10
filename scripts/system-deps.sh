#!/usr/bin/env bash
# Debian packages the project uses, installed only when missing and only as root (CI, fresh
# machines). Without root nothing is installed: the code then falls back (Fashion-MNIST: `apt-get
# download` + `dpkg-deb -x` into data/raw) or the tests that need a package skip with a reason.
set -euo pipefail
want=()
[ -d /usr/share/datasets/fashion-mnist ] || want+=(dataset-fashion-mnist)
for extra in "$@"; do
  case "$extra" in
    slurm) command -v slurmctld >/dev/null || want+=(slurmctld slurmd slurm-client munge)
           command -v ip >/dev/null && command -v nsenter >/dev/null || want+=(iproute2 util-linux)   # NODES>1 clusters
           command -v slurmdbd >/dev/null || want+=(slurmdbd mariadb-server) ;;
    chromium) command -v chromium >/dev/null || want+=(chromium) ;;
  esac
done
[ ${#want[@]} -eq 0 ] && exit 0
if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null; then
  echo "system-deps: not root (or no apt-get): skipping ${want[*]}" >&2
  exit 0
fi
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends "${want[@]}" >/dev/null
echo "system-deps: installed ${want[*]}"
