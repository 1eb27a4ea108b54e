#!/usr/bin/env bash
# `make dev`: a dev-mode Vault with the plugin at evenergy/, a local ev.energy stand-in, then a token
# of the stand-in. Both keep running in the background; `make dev-stop` stops them.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
run="$root/.dev"
vault_port=${DEV_VAULT_PORT:-8200}
standin_port=${DEV_STANDIN_PORT:-8400}
export VAULT_ADDR="http://127.0.0.1:$vault_port" VAULT_TOKEN=root
vault="$root/bin/vault"
VERSION=${VERSION:-v0.0.0-dev} # make dev passes the version make build stamped

stop() {
  for name in vault standin; do
    if [ -f "$run/$name.pid" ]; then
      kill "$(cat "$run/$name.pid")" 2>/dev/null || true
      rm -f "$run/$name.pid"
    fi
  done
}

case "${1:-start}" in
stop)
  stop
  echo "Stopped the dev Vault and the ev.energy stand-in."
  ;;
start)
  stop
  mkdir -p "$run"
  "$root/bin/evenergy-standin" -listen "127.0.0.1:$standin_port" >"$run/standin.log" 2>&1 &
  echo $! >"$run/standin.pid"
  "$vault" server -dev -dev-root-token-id=root -dev-no-store-token \
    -dev-listen-address="127.0.0.1:$vault_port" -dev-plugin-dir="$root/bin/plugins" >"$run/vault.log" 2>&1 &
  echo $! >"$run/vault.pid"
  for _ in $(seq 100); do
    "$vault" status >/dev/null 2>&1 && break
    sleep 0.2
  done
  "$vault" status >/dev/null || { tail -20 "$run/vault.log"; echo "the dev Vault did not start" >&2; exit 1; }

  set -x
  "$vault" plugin register -sha256="$(sha256sum "$root/bin/plugins/vault-plugin-secrets-evenergy" | cut -d' ' -f1)" \
    -version="$VERSION" secret vault-plugin-secrets-evenergy
  "$vault" secrets enable -path=evenergy -plugin-version="$VERSION" -default-lease-ttl=1h -allowed-response-headers=Retry-After \
    vault-plugin-secrets-evenergy
  "$vault" write evenergy/config client_id=dev-client client_secret=dev-secret base_url="http://127.0.0.1:$standin_port"
  "$vault" read evenergy/token
  "$vault" secrets list -detailed | grep -E '^(Path|evenergy/)'
  { set +x; } 2>/dev/null
  cat <<MSG

A dev-mode Vault with the ev.energy engine at evenergy/ runs at $VAULT_ADDR (root token: root).
The engine talks to a local stand-in for ev.energy at http://127.0.0.1:$standin_port, so the token above
is the stand-in's: it works nowhere else. Logs: .dev/vault.log, .dev/standin.log.

Next, in this shell:  export VAULT_ADDR=$VAULT_ADDR VAULT_TOKEN=root

1. A role, and a token with only its scopes:
     bin/vault write evenergy/roles/fleet scopes=vehicle:read ttl=1h
     bin/vault read evenergy/token/fleet
2. A user grant: open the authorize_url this prints in a browser, press Authorize on the stand-in's
   login page, and Vault's page says Connected; then read the user's token:
     bin/vault write evenergy/auth-url/driver-42 redirect_uri=$VAULT_ADDR/v1/evenergy/callback
     bin/vault read evenergy/users/driver-42/token
3. The engine's figures:
     bin/vault read evenergy/metrics

Stop: make dev-stop
MSG
  ;;
*)
  echo "usage: $0 start|stop" >&2
  exit 2
  ;;
esac
