#!/usr/bin/env bash
# Make the base images the Dockerfile and compose files name, when no registry answers.
#
# The real images are python:X-slim-bookworm and redis:X-bookworm from Docker Hub. Where
# they cannot be pulled (no registry reachable), this builds STAND-INS from Debian
# bookworm's own packages with mmdebstrap and tags them with the same names:
#   python: Debian's Python 3.11 with a venv at /usr/local, so `python` and `pip` are
#           where the official image has them;
#   redis:  Debian's redis-server (7.0 on bookworm), started with --protected-mode no as
#           the official image's entrypoint does.
# It says which it did. Stand-ins also carry this host's extra CA certificates, because
# here HTTPS to PyPI goes through a re-signing proxy; the official images never need that.
#
#   tests/containers/base-images.sh PYTHON_IMAGE REDIS_IMAGE
set -euo pipefail
python_image=$1
redis_image=$2
here=$(cd "$(dirname "$0")" && pwd)
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

host_cas=()
for crt in /usr/local/share/ca-certificates/*.crt; do
  [ -e "$crt" ] && host_cas+=("$crt")
done

# copy-in the host's extra CAs, then refresh the bundle; pip in the venv reads it through
# /etc/pip.conf (pip ships its own CA bundle otherwise)
ca_hooks=()
if [ ${#host_cas[@]} -gt 0 ]; then
  ca_hooks+=(--customize-hook="copy-in ${host_cas[*]} /usr/local/share/ca-certificates/"
             --customize-hook='chroot "$1" update-ca-certificates >/dev/null'
             --customize-hook='printf "[global]\ncert = /etc/ssl/certs/ca-certificates.crt\n" > "$1/etc/pip.conf"')
fi

# the host's pip settings (a local find-links folder) mean nothing inside the stand-in
unset PIP_FIND_LINKS PIP_CERT PIP_CONFIG_FILE

have() { podman image exists "$1"; }
pull() { timeout 120 podman pull -q "$1" >/dev/null 2>&1; }

standin() {  # NAME TAR CHANGE... : import a rootfs tarball as NAME
  local name=$1 tar=$2; shift 2
  local changes=()
  for c in "$@"; do changes+=(--change "$c"); done
  podman import -q "${changes[@]}" "$tar" "$name" >/dev/null
}

if have "$python_image"; then
  echo "base image $python_image: present locally"
elif pull "$python_image"; then
  echo "base image $python_image: pulled"
else
  echo "base image $python_image: no registry answered; building a STAND-IN from Debian bookworm's python3 (mmdebstrap)"
  start=$SECONDS
  mmdebstrap --quiet --variant=minbase --include=python3,python3-venv,ca-certificates,passwd \
    --hook-dir=/usr/share/mmdebstrap/hooks/merged-usr \
    "${ca_hooks[@]}" \
    --customize-hook='chroot "$1" python3 -m venv /usr/local' \
    --customize-hook='chroot "$1" /usr/local/bin/python -m pip install -q --upgrade pip' \
    --customize-hook='rm -rf "$1"/var/lib/apt/lists/* "$1"/root/.cache' \
    bookworm "$work/python.tar" >"$work/log" 2>&1 || { cat "$work/log" >&2; exit 1; }
  standin "$python_image" "$work/python.tar" 'ENV LANG=C.UTF-8' 'CMD ["python3"]'
  echo "  stand-in $python_image built in $((SECONDS - start)) s"
fi

if have "$redis_image"; then
  echo "base image $redis_image: present locally"
elif pull "$redis_image"; then
  echo "base image $redis_image: pulled"
else
  echo "base image $redis_image: no registry answered; building a STAND-IN from Debian bookworm's redis-server (mmdebstrap)"
  start=$SECONDS
  mmdebstrap --quiet --variant=minbase --include=redis-server,redis-tools \
    --hook-dir=/usr/share/mmdebstrap/hooks/merged-usr \
    --customize-hook='mkdir -p "$1/data" && chroot "$1" chown redis:redis /data' \
    --customize-hook="copy-in $here/redis-standin-entrypoint.sh /usr/local/bin/" \
    --customize-hook='rm -rf "$1"/var/lib/apt/lists/*' \
    bookworm "$work/redis.tar" >"$work/log" 2>&1 || { cat "$work/log" >&2; exit 1; }
  # The official image's entrypoint runs `redis-server ARGS` as user redis in /data with
  # --protected-mode no; the stand-in's does the same.
  standin "$redis_image" "$work/redis.tar" 'WORKDIR /data' 'USER redis' \
    'ENTRYPOINT ["/usr/local/bin/redis-standin-entrypoint.sh"]' 'CMD ["redis-server"]'
  echo "  stand-in $redis_image built in $((SECONDS - start)) s"
fi
