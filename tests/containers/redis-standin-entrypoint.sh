#!/bin/sh
# Entrypoint of the redis STAND-IN image (tests/containers/base-images.sh): like the
# official image's, `redis-server ARGS` runs with --protected-mode no (the compose
# network is the only way in); anything else runs as given.
if [ "${1:-}" = redis-server ]; then
  shift
  exec /usr/bin/redis-server --protected-mode no "$@"
fi
exec "$@"
