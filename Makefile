PLUGIN  := vault-plugin-secrets-evenergy
VAULT   := $(CURDIR)/bin/vault
# The version stamped into the plugin: the VERSION file, the newest release in CHANGELOG.md or, between
# releases, a -dev version newer than every release.
VERSION := v$(shell cat VERSION)
LDFLAGS := -X github.com/evenergy/vault-plugin-secrets-evenergy.Version=$(VERSION)

.PHONY: build release vault chromium test bench bench-scale bench-plugins fuzz sim dev dev-stop

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

# The engine's Go benchmarks, then the table on a dev Vault and on a single-node Raft Vault, each
# with the engine and a no-op leased plugin (bench/noop) from bin/bench-plugins; see bench/main.go.
# Writes bin/bench.json and its section of docs/benchmarks.md.
bench: vault bench-plugins
	go test -run '^$$' -bench . -skip '^BenchmarkScale' -benchmem ./...
	go run ./bench -vault $(VAULT) -plugins bin/bench-plugins

# 100,000 users on one mount (6 to 9 minutes on 2 cores): the Scale Go benchmarks, then imports, memory,
# starts and revocations on a Raft Vault; writes bin/bench-scale.json and its section of docs/benchmarks.md.
bench-scale: vault bench-plugins
	go run ./bench -scale -vault $(VAULT) -plugins bin/bench-plugins

bench-plugins:
	go build -o bin/bench-plugins/$(PLUGIN) ./cmd/$(PLUGIN)
	go build -o bin/bench-plugins/bench-noop ./bench/noop
	go build -o bin/evenergy-standin ./cmd/evenergy-standin

FUZZTIME ?= 60s

# Fuzzes each Fuzz target in turn for FUZZTIME with one worker (`make test` runs only their seeds);
# a short minimize time keeps the worker from spending the run minimizing one long input.
fuzz:
	for target in $$(go test -list '^Fuzz' . | grep '^Fuzz'); do \
		go test -run '^$$' -fuzz "^$$target\$$" -fuzztime $(FUZZTIME) -fuzzminimizetime 5s -parallel 1 . || exit 1; \
	done

SEEDS    ?= 1000
SIMSTEPS ?= 1000
SIMTIME  ?=

# The seeded simulation of the whole engine (simulation_test.go): SEEDS seeds from SIMFIRST, or as
# many as SIMTIME allows (e.g. make sim SIMTIME=30m), SIMSTEPS steps each; every failing seed is
# minimized and its trace printed, with the command that replays it. `make test` runs a fixed set.
SIMFIRST ?= 1
sim:
	go test -run '^TestSimulation$$' -count=1 -timeout 0 . -sim.first=$(SIMFIRST) -sim.steps=$(SIMSTEPS) -sim.keepgoing -sim.minimize \
		$(if $(SIMTIME),-sim.time=$(SIMTIME),-sim.seeds=$(SEEDS))

dev: build vault
	VERSION=$(VERSION) scripts/dev.sh start

dev-stop:
	scripts/dev.sh stop
