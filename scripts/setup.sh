#!/usr/bin/env bash
# Idempotent machine set-up for l7proxy: apt packages, kernel headers for bcc,
# and a venv (.venv) in which both bcc and the pinned Python stack import.
# Fast when everything is already present: each step checks before it acts.
set -euo pipefail
cd "$(dirname "$0")/.."

APT_PACKAGES=(python3-bpfcc python3-venv clang llvm linux-headers-amd64 iproute2 iptables
              bpftool haproxy nginx-light nghttp2-client nghttp2-server wrk procps curl
              etcd-server etcd-client
              python3-dev gcc libc6-dev  # the C head scanner (setup.py, parsers/http1/_quickscan.c)
              chromium chromium-driver)  # the web UI's browser test (Selenium, headless)

missing=()
for p in "${APT_PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "setup: installing apt packages: ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -q
  apt-get install -y -q --no-install-recommends "${missing[@]}"
  # Debian starts nginx/haproxy on install; benchmarks start their own instances.
  systemctl stop nginx haproxy 2>/dev/null || service nginx stop 2>/dev/null || true
  pkill -x nginx 2>/dev/null || true
  pkill -x haproxy 2>/dev/null || true
  # etcd-server too: the cluster tests start their own etcd, data on tmpfs.
  systemctl disable --now etcd 2>/dev/null || service etcd stop 2>/dev/null || true
fi

# bcc compiles at load time and needs headers for the running kernel. This kernel
# ships none, so point /lib/modules/$(uname -r)/{build,source} at Debian's headers.
KDIR=/lib/modules/$(uname -r)
if [ ! -e "$KDIR/build/include/generated" ] || [ ! -e "$KDIR/source/include/linux/kconfig.h" ]; then
  arch_hdr=$(ls -d /usr/src/linux-headers-*-amd64 2>/dev/null | sort -V | tail -n1)
  common_hdr=${arch_hdr%-amd64}-common
  [ -d "$arch_hdr" ] && [ -d "$common_hdr" ] || { echo "setup: no kernel headers found in /usr/src" >&2; exit 1; }
  mkdir -p "$KDIR"
  ln -sfn "$arch_hdr" "$KDIR/build"
  ln -sfn "$common_hdr" "$KDIR/source"
  echo "setup: linked $KDIR/build -> $arch_hdr, source -> $common_hdr"
fi

PY=/usr/bin/python3
if [ ! -x .venv/bin/python ]; then
  echo "setup: creating .venv"
  "$PY" -m venv .venv
fi
SITE=$(.venv/bin/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
# bcc lives in Debian's dist-packages; link just that package into the venv.
[ -e "$SITE/bcc" ] || ln -sfn /usr/lib/python3/dist-packages/bcc "$SITE/bcc"

stamp=.venv/.installed-$(sha1sum pyproject.toml | cut -c1-12)
if [ ! -e "$stamp" ]; then
  echo "setup: installing Python dependencies"
  .venv/bin/pip install -q --upgrade pip
  .venv/bin/pip install -q -e '.[test]'
  rm -f .venv/.installed-*
  touch "$stamp"
fi
# The C twins (setup.py): the quick HTTP/1.1 head read and the fast constructors, built
# in place (pip install -e built them too; this rebuilds them when their source changed,
# and is quick when it did not). They are optional: without one its Python twin serves,
# and `l7proxy status` says http1_quick=python or fast_new=python.
mkdir -p build
.venv/bin/python setup.py -q build_ext --inplace >build/quickscan.log 2>&1 || true
.venv/bin/python -c 'import parsers.http1._quickscan' 2>/dev/null \
  || echo "setup: the C head scanner did not build (build/quickscan.log); the Python twin serves" >&2
.venv/bin/python -c 'import parsers._fastnew' 2>/dev/null \
  || echo "setup: the C constructors did not build (build/quickscan.log); the Python twin serves" >&2
.venv/bin/python -c 'import bcc, pyroute2, h2, httptools, aetcd' || { echo "setup: imports failed" >&2; exit 1; }
