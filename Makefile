PLUGIN  := vault-plugin-secrets-evenergy
VAULT   := $(CURDIR)/bin/vault
# The version stamped into the plugin: the VERSION file, the newest release in CHANGELOG.md or, between
# releases, a -dev version newer than every release.
VERSION := v$(shell cat VERSION)
LDFLAGS := -X github.com/evenergy/vault-plugin-secrets-evenergy.Version=$(VERSION)

.PHONY: build release vault bao chromium test test-openbao soak test-times bench bench-scale bench-plugins fuzz sim dev dev-stop

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

# Most acceptance tests wait on Vault or the stand-in rather than on the CPU, so more run at once
# than the machine has cores. The real-time soak runs apart, in `make soak`.
GOTEST := go test -count=1 -timeout 30m -parallel 8
SOAK   := ^TestAccReadersKeepTokensWhileMostRefreshesFail$$

test: vault chromium
	go vet ./...
	VAULT_BIN=$(VAULT) $(GOTEST) -skip '$(SOAK)' ./...

# Five minutes of ev.energy failing 80% of refreshes under 32 readers, in real time.
soak: vault
	VAULT_BIN=$(VAULT) $(GOTEST) -run '$(SOAK)' .

# The suite of `make test` with go test -json into bin/test-times.json, then its 15 slowest tests.
test-times: vault chromium
	mkdir -p bin
	VAULT_BIN=$(VAULT) $(GOTEST) -skip '$(SOAK)' -json ./... > bin/test-times.json; status=$$?; \
		go run ./scripts/testtimes bin/test-times.json; exit $$status

# OpenBao's server: BAO_BIN, or bin/bao from shared/openbao beside the checkout (the Go module proxy
# does not serve OpenBao, so it cannot be built here), checked against its SHA256SUMS.
OPENBAO := $(CURDIR)/../shared/openbao
BAO     := $(or $(BAO_BIN),$(CURDIR)/bin/bao)

bao:
ifdef BAO_BIN
	@test -x "$(BAO_BIN)" || { echo "BAO_BIN=$(BAO_BIN) is not an executable OpenBao server" >&2; exit 1; }
else
	@test -f "$(OPENBAO)/bao.gz" || { echo "No OpenBao server: $(OPENBAO)/bao.gz is missing. Put shared/openbao beside the checkout, or set BAO_BIN." >&2; exit 1; }
	mkdir -p bin
	gunzip -c "$(OPENBAO)/bao.gz" > bin/bao.tmp
	cd bin && echo "$$(awk '$$2 == "bao" { print $$1 }' "$(OPENBAO)/SHA256SUMS")  bao.tmp" | sha256sum --check --quiet || \
		{ echo "bin/bao.tmp, from $(OPENBAO)/bao.gz, does not match the bao line of its SHA256SUMS" >&2; exit 1; }
	chmod +x bin/bao.tmp && mv bin/bao.tmp bin/bao
endif
	"$(BAO)" version

# The acceptance tests on OpenBao, but for the soak and those whose check only Vault can make (docs/development.md).
VAULT_ONLY :=

test-openbao: bao chromium
	VAULT_BIN=$(BAO) $(GOTEST) -run '^TestAcc' -skip '$(SOAK)$(if $(VAULT_ONLY),|$(VAULT_ONLY))' .

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
