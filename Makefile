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

# One dev Vault with the engine and a no-op leased plugin (bench/noop) from bin/bench-plugins; see bench/main.go.
bench: vault
	go build -o bin/bench-plugins/$(PLUGIN) ./cmd/$(PLUGIN)
	go build -o bin/bench-plugins/bench-noop ./bench/noop
	go test -run '^$$' -bench . -benchmem ./...
	go run ./bench -vault $(VAULT) -plugins bin/bench-plugins -out bin/bench.json

dev: build vault
	scripts/dev.sh start

dev-stop:
	scripts/dev.sh stop
