PLUGIN  := vault-plugin-secrets-evenergy
VAULT   := $(CURDIR)/bin/vault
# The version stamped into the plugin: the VERSION file, which the newest release in CHANGELOG.md names.
VERSION := v$(shell cat VERSION)
LDFLAGS := -X github.com/evenergy/vault-plugin-secrets-evenergy.Version=$(VERSION)

.PHONY: build release vault chromium test bench fuzz dev dev-stop

build:
	go build -ldflags "$(LDFLAGS)" -o bin/plugins/$(PLUGIN) ./cmd/$(PLUGIN)
	go build -o bin/evenergy-standin ./cmd/evenergy-standin

# Reproducible binaries for linux and darwin on amd64 and arm64, and dist/SHA256SUMS (see scripts/release.sh).
release:
	rm -rf dist
	scripts/release.sh dist

# The Vault server is built once from the Go module proxy and cached (see scripts/build-vault.sh).
vault:
	scripts/build-vault.sh

chromium:
	scripts/install-chromium.sh

test: vault chromium
	go vet ./...
	VAULT_BIN=$(VAULT) go test -count=1 -timeout 30m ./...

# One dev Vault with the engine and a no-op leased plugin (bench/noop) from bin/bench-plugins; see bench/main.go.
bench: vault
	go build -o bin/bench-plugins/$(PLUGIN) ./cmd/$(PLUGIN)
	go build -o bin/bench-plugins/bench-noop ./bench/noop
	go test -run '^$$' -bench . -benchmem ./...
	go run ./bench -vault $(VAULT) -plugins bin/bench-plugins -out bin/bench.json

FUZZTIME ?= 60s

# Fuzzes each Fuzz target in turn for FUZZTIME with one worker (`make test` runs only their seeds);
# a short minimize time keeps the worker from spending the run minimizing one long input.
fuzz:
	for target in $$(go test -list '^Fuzz' . | grep '^Fuzz'); do \
		go test -run '^$$' -fuzz "^$$target\$$" -fuzztime $(FUZZTIME) -fuzzminimizetime 5s -parallel 1 . || exit 1; \
	done

dev: build vault
	VERSION=$(VERSION) scripts/dev.sh start

dev-stop:
	scripts/dev.sh stop
