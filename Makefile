PLUGIN := vault-plugin-secrets-evenergy
VAULT  := $(CURDIR)/bin/vault

.PHONY: build vault chromium test bench dev dev-stop

build:
	go build -o bin/plugins/$(PLUGIN) ./cmd/$(PLUGIN)
	go build -o bin/evenergy-standin ./cmd/evenergy-standin

# The Vault server is built once from the Go module proxy and cached (see scripts/build-vault.sh).
vault:
	scripts/build-vault.sh

chromium:
	scripts/install-chromium.sh

test: vault chromium
	go vet ./...
	VAULT_BIN=$(VAULT) go test -count=1 -timeout 20m ./...

bench:
	go test -run '^$$' -bench . -benchmem ./...

dev: build vault
	scripts/dev.sh start

dev-stop:
	scripts/dev.sh stop
