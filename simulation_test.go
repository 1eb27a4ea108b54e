package evenergy

import (
	"cmp"
	"context"
	"encoding/json"
	"flag"
	"fmt"
	"maps"
	"math/rand/v2"
	"os"
	"regexp"
	"slices"
	"strings"
	"sync"
	"testing"
	"testing/synctest"
	"time"

	"github.com/hashicorp/go-hclog"
	"github.com/hashicorp/vault/sdk/logical"
)

// The simulation: one seeded run drives the real backend, built by Factory, through random
// operations and faults on virtual time (testing/synctest) against an in-memory ev.energy that
// keeps a ledger of every token (simulation_evenergy_test.go) and storage that fails, slows and
// blocks (simulation_storage_test.go), and checks the engine's promises after every step
// (simulation_invariants_test.go). A failing seed prints its trace and replays from the seed alone:
//
//	go test -run 'TestSimulation$' -sim.seed=N -v .
var (
	simSeed     = flag.Uint64("sim.seed", 0, "run this seed alone and print the trace of its break")
	simFirst    = flag.Uint64("sim.first", 1, "first seed of a sweep")
	simSeeds    = flag.Int("sim.seeds", 0, "seeds to run from sim.first (0: the fixed set of make test)")
	simSteps    = flag.Int("sim.steps", 300, "steps per seed")
	simTime     = flag.Duration("sim.time", 0, "run seeds from sim.first until this much wall time has passed (instead of sim.seeds)")
	simMinimize = flag.Bool("sim.minimize", false, "minimize a failing seed's steps (drop steps while it still breaks the same way) before printing them")
	simReport   = flag.String("sim.report", "", "append one line per failing seed to this file")
	simKeepOn   = flag.Bool("sim.keepgoing", false, "run every seed of a sweep even after failures")
	simAll      = flag.Bool("sim.all", false, "go on after a broken promise, reporting the first break of each class")
	simLog      = flag.Bool("sim.log", false, "add the engine's log lines to the trace")
	simClass    = flag.String("sim.class", "", "with -sim.seed and -sim.all: report only this class of break")
)

// simRegression is a seed that found a defect of issue 26 on b2e9841: its steps, and the class of
// break it found, which must not come back (any other break fails the test too).
type simRegression struct {
	seed  uint64
	steps int
	class string
}

// simRegressionSeeds are the seeds that found the defects of issue 26 (docs/simulation.md); each runs in make test.
var simRegressionSeeds = map[string]simRegression{
	"defect1-config-recreated-serves-old-scopes":  {seed: 346, steps: 11, class: "b-current:shared"},
	"defect3-unsaved-grant-lost-with-restart":     {seed: 103, steps: 41, class: "c:lost-grant"},
	"defect5-check-grants-revokes-leased-shared":  {seed: 139, steps: 22, class: "b:lease-runs:shared:revoke"},
	"defect6-unshared-role-keeps-its-token":       {seed: 275, steps: 1000, class: "e:shared-left"},
	"defect8-deleted-role-keeps-a-failure-record": {seed: 213, steps: 24, class: "d:memory"},
	"n4-shared-token-replaced-unqueued":           {seed: 239, steps: 98, class: "a:unowned:client_credentials:forgotten"},
	"also-shared-read-mints-while-writes-refused": {seed: 27, steps: 16, class: "a:unowned:client_credentials:never-stored"},
}

// simFixedSeeds is the sweep make test runs beside the regression seeds.
const simFixedSeeds = 40

func TestSimulation(t *testing.T) {
	if *simSeed != 0 {
		ops := genOps(*simSeed, *simSteps)
		found, _ := runOps(t, *simSeed, ops, map[string]int{})
		if len(found) == 0 {
			t.Logf("seed %d: %d steps, no promise broken", *simSeed, *simSteps)
		}
		for _, f := range found {
			if *simClass == "" || f.class == *simClass {
				reportFailure(t, *simSeed, ops, f)
			}
		}
		return
	}
	type seedRun struct {
		name string
		simRegression
	}
	var runs []seedRun
	for name, r := range simRegressionSeeds {
		runs = append(runs, seedRun{name, r})
	}
	slices.SortFunc(runs, func(a, b seedRun) int { return strings.Compare(a.name, b.name) })
	count := *simSeeds
	if count == 0 && *simTime == 0 {
		count = simFixedSeeds
	}
	for i := uint64(0); *simTime > 0 || i < uint64(count); i++ {
		if *simTime > 0 && i > 1<<40 {
			break
		}
		seed := *simFirst + i
		runs = append(runs, seedRun{"", simRegression{seed: seed, steps: *simSteps}})
		if *simTime > 0 && len(runs) > 1<<20 {
			break
		}
	}
	start := time.Now()
	steps, failed, ran := 0, 0, 0
	stats := map[string]int{}
	for _, r := range runs {
		if *simTime > 0 && time.Since(start) > *simTime {
			break
		}
		ops := genOps(r.seed, r.steps)
		found, ranSteps, _ := runTraced(t, r.seed, ops, stats, *simAll || r.name != "")
		ran++
		steps += ranSteps
		if len(found) == 0 {
			continue
		}
		failed++
		if r.name != "" && classIn(found, r.class) != nil {
			t.Errorf("regression seed %s (seed %d, %d steps) breaks %s again", r.name, r.seed, r.steps, r.class)
		}
		for _, f := range found {
			reportFailure(t, r.seed, ops, f)
		}
		if !*simKeepOn && r.name == "" { // the regression seeds run whatever breaks
			break
		}
	}
	elapsed := time.Since(start)
	t.Logf("%d seeds, %d steps in %v: %.1f seeds/s, %.0f steps/s; %d failed; counted: %v", ran, steps, elapsed.Round(time.Millisecond),
		float64(ran)/elapsed.Seconds(), float64(steps)/elapsed.Seconds(), failed, stats)
}

// runOps runs ops for seed in a synctest bubble of their own. It returns the first break of each
// class (every class with -sim.all, else the first alone) and how many steps ran.
func runOps(t *testing.T, seed uint64, ops []simOp, stats map[string]int) (found []*simFailure, steps int) {
	found, steps, _ = runTraced(t, seed, ops, stats, *simAll)
	return found, steps
}

// runTraced is runOps with the trace; all goes on after a break (see -sim.all).
func runTraced(t *testing.T, seed uint64, ops []simOp, stats map[string]int, all bool) (found []*simFailure, steps int, trace []string) {
	synctest.Test(t, func(t *testing.T) {
		s := newSim(seed)
		s.all = all
		defer s.close()
		steps = s.run(ops)
		found, trace = s.found, s.trace
		s.stats["lost refreshes without grace"] += s.ev.lostRefreshes
		for k, v := range s.stats {
			stats[k] += v
		}
	})
	return found, steps, trace
}

// reportFailure minimizes the steps that break f's class, prints their trace and fails the test.
func reportFailure(t *testing.T, seed uint64, ops []simOp, f *simFailure) {
	t.Helper()
	kept := ops[:min(f.step+1, len(ops))]
	if *simMinimize {
		kept = minimize(t, seed, kept, f.class)
	}
	found, _, trace := runTraced(t, seed, kept, map[string]int{}, true)
	min := classIn(found, f.class)
	if min == nil { // the kept steps no longer break it: print the whole run
		kept = ops
		found, _, trace = runTraced(t, seed, ops, map[string]int{}, true)
		min = cmp.Or(classIn(found, f.class), f)
	}
	line := fmt.Sprintf("seed %d: step %d of %d, invariant %s (%s): %s (minimized to %d steps)", seed, f.step, len(ops), f.invariant, f.class, f.msg, len(kept))
	if *simReport != "" {
		if out, err := os.OpenFile(*simReport, os.O_APPEND|os.O_CREATE|os.O_WRONLY, 0o644); err == nil {
			fmt.Fprintln(out, line)
			fmt.Fprintln(out, "  minimized: "+min.invariant+": "+min.msg)
			for _, l := range trace {
				fmt.Fprintln(out, "    "+l)
			}
			out.Close()
		}
	}
	t.Errorf("%s\nreplay: go test -run 'TestSimulation$' -sim.seed=%d -sim.steps=%d .\nminimized trace (%s):\n  %s", line, seed, len(ops), min.invariant, strings.Join(trace, "\n  "))
}

func classIn(found []*simFailure, class string) *simFailure {
	for _, f := range found {
		if f.class == class {
			return f
		}
	}
	return nil
}

// minimize drops steps while the run still breaks class.
func minimize(t *testing.T, seed uint64, ops []simOp, class string) []simOp {
	kept := slices.Clone(ops)
	tries := 0
	for size := len(kept) / 2; size >= 1; size /= 2 {
		for i := 0; i+size <= len(kept) && tries < 600; {
			candidate := slices.Concat(kept[:i], kept[i+size:])
			tries++
			found, _, _ := runTraced(t, seed, candidate, map[string]int{}, true)
			if g := classIn(found, class); g != nil {
				kept = candidate[:min(g.step+1, len(candidate))]
				continue
			}
			i += size
		}
	}
	return kept
}

// simFailure is a broken promise: at which step, which invariant, and how.
type simFailure struct {
	step      int
	invariant string
	class     string // the invariant and the shape of the break, which the minimizer keeps
	msg       string
}

const (
	simUsers = 5
	simRoles = 3
	simMount = "evenergy/"
)

var simClients = []string{"sim-client-a", "sim-client-b"}

// simSecrets are each client's two valid secrets (a rotation is a switch between them).
var simSecrets = map[string][]string{"sim-client-a": {"secret-a-1", "secret-a-2"}, "sim-client-b": {"secret-b-1", "secret-b-2"}}

var simScopes = [][]string{nil, {"vehicle:read"}, {"vehicle:read", "charging:write"}}

// sim is one run: the nodes one after the other on the same storage, ev.energy, the lease table.
type sim struct {
	seed  uint64
	rng   *rand.Rand
	ev    *simEvenergy
	st    *simStorage
	b     *backend
	nodes int

	leases        []*simLease
	mu            sync.Mutex // guards what async operations hand back
	done          []func()
	inFlight      int
	all           bool          // go on after a break
	failure       *simFailure   // the first break
	found         []*simFailure // the first break of each class
	step          int
	trace         []string
	traceMu       sync.Mutex
	stats         map[string]int
	defWrites     int       // config and role writes in flight
	defDone       time.Time // when the last one ended
	endings       []*simEnding
	everStored    map[string]bool // token values seen in storage
	passes        int
	invalidations int            // Invalidate calls made here so far
	invalidated   map[string]int // the count at each key's last Invalidate
}

// simLease is a lease as Vault's expiration manager keeps it.
type simLease struct {
	id          int
	kind        string // "token", "shared", "user"
	name        string // role or user
	secret      *logical.Secret
	tok         *simToken
	issued, end time.Time
	maxEnd      time.Time
	renewable   bool
	exempt      bool // an operator ended its token early and was warned (see simEnding)
	readStart   time.Time
	failures    int // failed revocations; Vault gives up after 6 and keeps the lease as irrevocable
	retryAt     time.Time
	irrevocable bool
}

func newSim(seed uint64) *sim {
	s := &sim{seed: seed, rng: rand.New(rand.NewPCG(seed, 0xe7)), ev: newSimEvenergy(seed), st: newSimStorage(seed), stats: map[string]int{}, everStored: map[string]bool{}, invalidated: map[string]int{}}
	for id, secrets := range simSecrets {
		s.ev.clients[id] = secrets
	}
	if seed%8 == 7 {
		s.ev.grace = 2 * time.Minute // a seed in eight runs ev.energy with a refresh grace period
	}
	s.startNode()
	return s
}

var tokenValue = regexp.MustCompile(`sim\d+-[0-9a-f]{16}|code-[0-9a-f]{16}|secret-[ab]-[12]`)

// logf adds a line to the trace; token values, codes and secrets never reach it.
func (s *sim) logf(format string, args ...any) {
	line := fmt.Sprintf("%4d %-9s ", s.step, time.Since(simEpoch).Truncate(time.Millisecond)) + fmt.Sprintf(format, args...)
	s.traceMu.Lock()
	defer s.traceMu.Unlock()
	s.trace = append(s.trace, tokenValue.ReplaceAllString(line, "<redacted>"))
}

// Write takes the engine's log lines into the trace (with -sim.log).
func (s *sim) Write(p []byte) (int, error) {
	s.logf("  log: %s", strings.TrimSpace(string(p)))
	return len(p), nil
}

// logger is the engine's logger: the trace with -sim.log, else none.
func (s *sim) logger() hclog.Logger {
	if !*simLog {
		return hclog.NewNullLogger()
	}
	return hclog.New(&hclog.LoggerOptions{Output: s, Level: hclog.Debug, DisableTime: true})
}

// simEpoch is where every bubble's clock starts.
var simEpoch = time.Date(2000, 1, 1, 0, 0, 0, 0, time.UTC)

func (s *sim) fail(class, format string, args ...any) {
	if (s.failure != nil && !s.all) || classIn(s.found, class) != nil {
		return
	}
	msg := tokenValue.ReplaceAllString(fmt.Sprintf(format, args...), "<redacted>")
	invariant, _, _ := strings.Cut(class, ":")
	f := &simFailure{step: s.step, invariant: invariant, class: class, msg: msg}
	s.found = append(s.found, f)
	if s.failure == nil {
		s.failure = f
	}
	s.logf("BROKEN %s: %s", invariant, msg)
}

// startNode starts a node on the storage: a new backend, as a restart or a failover makes one.
func (s *sim) startNode() {
	config := logical.TestBackendConfig()
	config.StorageView = s.st
	config.Logger = s.logger()
	b, err := Factory(context.Background(), config)
	if err != nil {
		panic(err)
	}
	s.b = b.(*backend)
	s.b.transport = s.ev
	jitter := rand.New(rand.NewPCG(s.seed, uint64(s.nodes)))
	s.b.tokens.refreshes.random = jitter.Float64
	s.nodes++
	if err := s.b.Initialize(context.Background(), &logical.InitializationRequest{Storage: s.st}); err != nil {
		s.logf("node %d: initialize failed: %v", s.nodes, err)
	}
}

// close ends the run: faults off, the node steps down, and everything in flight finishes.
func (s *sim) close() {
	s.quiet()
	s.b.Cleanup(context.Background())
	time.Sleep(time.Hour)
	synctest.Wait()
}

func (s *sim) quiet() {
	s.ev.setFaults(simCallFaults{})
	s.ev.setDown(time.Time{})
	s.st.set(func(st *simStorage) {
		st.failRate, st.slowRate, st.refuseUntil, st.blockUntil = 0, 0, time.Time{}, time.Time{}
	})
}

func (s *sim) request(b *backend, op logical.Operation, path string, data map[string]any) (*logical.Response, error) {
	resp, err := b.HandleRequest(context.Background(), &logical.Request{Operation: op, Path: path, Storage: s.st, Data: data, MountPoint: simMount})
	if resp != nil && resp.IsError() {
		err = fmt.Errorf("%v", resp.Data["error"])
	}
	return resp, err
}

func outcome(err error) string {
	if err == nil {
		return "ok"
	}
	msg := err.Error()
	if len(msg) > 140 {
		msg = msg[:140] + "..."
	}
	return "error: " + msg
}

// run sets the engine up, runs ops, checking every promise after each, and then the promises of a quiet end.
func (s *sim) run(ops []simOp) (steps int) {
	time.Sleep(time.Until(simEpoch)) // every bubble starts at 2000-01-01; the epoch is in its future
	s.step = -1
	s.configWrite(simClients[0], simSecrets[simClients[0]][0], nil, "10m", "5s")
	for i := range simRoles {
		s.logf("role r%d: %s", i, outcome(s.roleWrite(i, i != 1, simScopes[i])))
	}
	for u := range 2 {
		s.authorize(u)
	}
	synctest.Wait()
	for i, op := range ops {
		s.step = i
		s.apply(op)
		synctest.Wait()
		s.collect()
		s.check()
		if s.failure != nil && !s.all {
			return i + 1
		}
	}
	s.step = len(ops)
	s.logf("quiet: every fault off")
	s.finish()
	return len(ops)
}

// async runs fn in its own goroutine; its results are applied by collect.
func (s *sim) async(fn func() func()) {
	s.mu.Lock()
	s.inFlight++
	s.mu.Unlock()
	go func() {
		after := fn()
		s.mu.Lock()
		defer s.mu.Unlock()
		s.inFlight--
		s.done = append(s.done, after)
	}()
}

// collect applies what finished operations handed back, in the main goroutine.
func (s *sim) collect() {
	s.mu.Lock()
	done := s.done
	s.done = nil
	s.mu.Unlock()
	for _, fn := range done {
		fn()
	}
}

func (s *sim) busy() bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.inFlight > 0 || s.ev.busy() || s.st.busy()
}

// maybeAsync runs fn now, or in flight while the next steps run.
func (s *sim) maybeAsync(async bool, fn func() func()) {
	if !async {
		fn()()
		return
	}
	s.async(fn)
}

func (s *sim) apply(op simOp) {
	b := s.b
	switch op.kind {
	case "read-token":
		s.maybeAsync(op.async, func() func() { return s.read(b, "token", "token", "") })
	case "read-role":
		name := fmt.Sprintf("r%d", op.n%simRoles)
		s.maybeAsync(op.async, func() func() { return s.read(b, "token/"+name, "role", name) })
	case "read-user":
		name := fmt.Sprintf("u%d", op.n%simUsers)
		s.maybeAsync(op.async, func() func() { return s.read(b, "users/"+name+"/token", "user", name) })
	case "renew-lease":
		if l := s.pickLease(op.n, true); l != nil {
			s.renew(l)
		}
	case "revoke-lease":
		if l := s.pickLease(op.n, false); l != nil {
			s.logf("vault lease revoke #%d (%s %s)", l.id, l.kind, l.name)
			l.end = time.Now() // ended by the operator: Vault retries its revocation until it is done
			s.revokeLease(l)
		}
	case "advance":
		s.advance(op.d)
	case "periodic":
		s.maybeAsync(op.async, func() func() { return s.periodic(b) })
	case "config-write":
		data := map[string]any{}
		switch op.v % 5 {
		case 0:
			client := simClients[op.n%2]
			data["client_id"], data["client_secret"] = client, simSecrets[client][op.n/2%2]
		case 1:
			cfg := s.storedConfig()
			if cfg == nil {
				return
			}
			data["client_secret"] = simSecrets[cfg.ClientID][op.n%2]
		case 2:
			data["scopes"] = strings.Join(simScopes[op.n%len(simScopes)], ",")
		case 3:
			data["refresh_window"] = []string{"30s", "1m", "5m", "10m", "2h"}[op.n%5]
		case 4:
			data["request_timeout"] = []string{"1s", "2s", "5s", "10s"}[op.n%4]
		}
		s.defWrite(op.async, func() (string, error) {
			_, err := s.request(b, logical.UpdateOperation, "config", data)
			return fmt.Sprintf("config write %v", redactKeys(data)), err
		})
	case "config-recreate":
		s.defWrite(false, func() (string, error) {
			_, err := s.request(b, logical.DeleteOperation, "config", nil)
			s.logf("config delete: %s", outcome(err))
			client := simClients[op.n%2]
			return "config create " + client, s.configData(b, logical.CreateOperation, client, simSecrets[client][0], simScopes[op.v%len(simScopes)], "10m", "5s")
		})
	case "role-write":
		i := op.n % simRoles
		s.defWrite(op.async, func() (string, error) {
			shared, scopes := op.v%2 == 0, simScopes[op.v/2%len(simScopes)]
			return fmt.Sprintf("role write r%d shared=%v scopes=%v", i, shared, scopes), s.roleWriteOn(b, i, shared, scopes)
		})
	case "role-delete":
		i := op.n % simRoles
		ended := s.ending("shared", fmt.Sprintf("r%d", i))
		s.defWrite(false, func() (string, error) {
			_, err := s.request(b, logical.DeleteOperation, fmt.Sprintf("roles/r%d", i), nil)
			return fmt.Sprintf("role delete r%d", i), err
		})
		ended()
	case "rotate-role":
		name := fmt.Sprintf("r%d", op.n%simRoles)
		ended := s.ending("shared", name)
		s.maybeAsync(op.async, func() func() {
			_, err := s.request(b, logical.UpdateOperation, "rotate-role/"+name, nil)
			return func() { ended(); s.logf("rotate-role %s: %s", name, outcome(err)) }
		})
	case "check-grants":
		ended := s.ending("user", "")
		s.maybeAsync(op.async, func() func() {
			_, err := s.request(b, logical.UpdateOperation, "check-grants", nil)
			return func() { ended(); s.logf("check-grants: %s", outcome(err)) }
		})
	case "authorize":
		s.authorize(op.n % simUsers)
	case "import":
		user := fmt.Sprintf("u%d", op.n%simUsers)
		client := simClients[op.v%2]
		if cfg := s.storedConfig(); cfg != nil && op.v%4 != 1 {
			client = cfg.ClientID // mostly a grant of the configured client
		}
		refresh := s.ev.outOfBand(client)
		s.maybeAsync(op.async, func() func() {
			_, err := s.request(b, logical.UpdateOperation, "users/"+user, map[string]any{"refresh_token": refresh})
			return func() { s.logf("import %s (a grant of %s): %s", user, client, outcome(err)) }
		})
	case "delete-user":
		user := fmt.Sprintf("u%d", op.n%simUsers)
		ended := s.ending("user", user)
		s.maybeAsync(op.async, func() func() {
			_, err := s.request(b, logical.DeleteOperation, "users/"+user, nil)
			return func() { ended(); s.logf("delete user %s: %s", user, outcome(err)) }
		})
	case "revocations-drive":
		deferred := op.n%3 == 0
		ended := func() {}
		if deferred {
			ended = s.ending("", "")
		}
		s.maybeAsync(op.async, func() func() {
			_, err := s.request(b, logical.UpdateOperation, "revocations", map[string]any{"include_deferred": deferred})
			return func() { ended(); s.logf("revocations drive (include_deferred=%v): %s", deferred, outcome(err)) }
		})
	case "restart":
		s.logf("restart: node %d steps down, node %d starts on the same storage", s.nodes, s.nodes+1)
		s.b.Cleanup(context.Background())
		s.startNode()
	case "failover":
		span := time.Duration(1+op.n%20) * time.Second
		s.logf("failover: node %d loses quorum (writes refused for %v) and steps down; node %d takes over", s.nodes, span, s.nodes+1)
		s.st.set(func(st *simStorage) { st.refuseUntil = time.Now().Add(span) })
		time.Sleep(time.Duration(op.v%1000) * time.Millisecond)
		s.b.Cleanup(context.Background())
		s.st.set(func(st *simStorage) { st.refuseUntil = time.Time{} })
		s.startNode()
	case "remote-write":
		s.remoteWrite(op)
	case "ev-faults":
		f := simCallFaults{serverError: op.n % 150, rateLimited: op.n / 150 % 100, hang: op.v % 60, lostAnswer: op.v / 60 % 120}
		s.logf("ev.energy faults (per mille): 5xx %d, 429 %d, hang %d, answer lost after the work %d", f.serverError, f.rateLimited, f.hang, f.lostAnswer)
		s.ev.setFaults(f)
	case "ev-down":
		s.logf("ev.energy down for %v", op.d)
		s.ev.setDown(time.Now().Add(op.d))
	case "storage-faults":
		fail, slow := op.n%200, op.v%300
		s.logf("storage faults (per mille): fail %d, slow %d", fail, slow)
		s.st.set(func(st *simStorage) { st.failRate, st.slowRate = fail, slow })
	case "storage-refuse":
		s.logf("storage refuses writes for %v", op.d)
		s.st.set(func(st *simStorage) { st.refuseUntil = time.Now().Add(op.d) })
	case "storage-block":
		s.logf("storage blocks every call for %v", op.d)
		s.st.set(func(st *simStorage) { st.blockUntil = time.Now().Add(op.d) })
	case "faults-off":
		s.logf("faults off")
		s.quiet()
	}
}

func redactKeys(data map[string]any) map[string]any {
	out := map[string]any{}
	for k, v := range data {
		if k == "client_secret" {
			v = "<secret " + fmt.Sprint(strings.HasSuffix(v.(string), "2")) + ">"
		}
		out[k] = v
	}
	return out
}

// defWrite runs a config or role write, noting when it ends: a reader that starts after it must
// get a token minted for what it wrote.
func (s *sim) defWrite(async bool, fn func() (string, error)) {
	s.mu.Lock()
	s.defWrites++
	s.mu.Unlock()
	s.maybeAsync(async, func() func() {
		what, err := fn()
		s.mu.Lock()
		s.defWrites--
		s.defDone = time.Now()
		s.mu.Unlock()
		return func() { s.logf("%s: %s", what, outcome(err)) }
	})
}

func (s *sim) configData(b *backend, op logical.Operation, client, secret string, scopes []string, window, timeout string) error {
	_, err := s.request(b, op, "config", map[string]any{"client_id": client, "client_secret": secret, "base_url": "https://api.ev.energy",
		"scopes": strings.Join(scopes, ","), "refresh_window": window, "request_timeout": timeout})
	return err
}

func (s *sim) configWrite(client, secret string, scopes []string, window, timeout string) {
	s.logf("config %s: %s", client, outcome(s.configData(s.b, logical.CreateOperation, client, secret, scopes, window, timeout)))
}

func (s *sim) roleWrite(i int, shared bool, scopes []string) error {
	return s.roleWriteOn(s.b, i, shared, scopes)
}

// roleWriteOn writes role ri on b, as a create when it is not stored (Vault's existence check).
func (s *sim) roleWriteOn(b *backend, i int, shared bool, scopes []string) error {
	var op logical.Operation = logical.UpdateOperation
	if s.storedRole(fmt.Sprintf("r%d", i)) == nil {
		op = logical.CreateOperation
	}
	_, err := s.request(b, op, fmt.Sprintf("roles/r%d", i), map[string]any{"shared": shared, "scopes": strings.Join(scopes, ",")})
	return err
}

// authorize runs the authorization-code flow with PKCE for user: auth-url, the user's consent at
// ev.energy, and the code written back with its state.
func (s *sim) authorize(u int) {
	user := fmt.Sprintf("u%d", u)
	resp, err := s.request(s.b, logical.UpdateOperation, "auth-url/"+user, map[string]any{"redirect_uri": "https://app.example.com/callback"})
	if err != nil {
		s.logf("auth-url %s: %s", user, outcome(err))
		return
	}
	code, state, err := s.ev.authorize(resp.Data["authorize_url"].(string))
	if err != nil {
		s.fail("contract:authorize", "the authorize URL for %s: %v", user, err)
		return
	}
	_, err = s.request(s.b, logical.UpdateOperation, "users/"+user, map[string]any{"code": code, "state": state})
	s.logf("authorize %s: %s", user, outcome(err))
}

// remoteWrite makes a write on another node on the same storage, which reaches this node through Invalidate.
func (s *sim) remoteWrite(op simOp) {
	s.st.takeWritten()
	config := logical.TestBackendConfig()
	config.StorageView = s.st
	config.Logger = s.logger()
	other, err := Factory(context.Background(), config)
	if err != nil {
		panic(err)
	}
	ob := other.(*backend)
	ob.transport = s.ev
	var what string
	switch op.v % 3 {
	case 0:
		what = fmt.Sprintf("scopes %v", simScopes[op.n%len(simScopes)])
		_, err = s.request(ob, logical.UpdateOperation, "config", map[string]any{"scopes": strings.Join(simScopes[op.n%len(simScopes)], ",")})
	case 1:
		i := op.n % simRoles
		what = fmt.Sprintf("role r%d shared=%v", i, op.n/simRoles%2 == 0)
		err = s.roleWriteOn(ob, i, op.n/simRoles%2 == 0, simScopes[op.n/6%len(simScopes)])
	case 2:
		user := fmt.Sprintf("u%d", op.n%simUsers)
		what = "delete user " + user
		ended := s.ending("user", user)
		_, err = s.request(ob, logical.DeleteOperation, "users/"+user, nil)
		defer ended()
	}
	ob.Cleanup(context.Background())
	keys := s.st.takeWritten()
	s.mu.Lock()
	for _, key := range keys {
		s.invalidations++
		s.invalidated[key] = s.invalidations
	}
	s.mu.Unlock()
	for _, key := range keys {
		s.b.Invalidate(context.Background(), key)
	}
	s.mu.Lock()
	s.defDone = time.Now()
	s.mu.Unlock()
	s.logf("another node writes %s: %s; %d keys invalidated here", what, outcome(err), len(keys))
}

// read reads a token path as a reader would; the lease is recorded in the lease table.
func (s *sim) read(b *backend, path, kind, name string) func() {
	s.mu.Lock()
	started, settled := time.Now(), s.defWrites == 0 && time.Now().After(s.defDone)
	s.mu.Unlock()
	resp, err := s.request(b, logical.ReadOperation, path, nil)
	if err != nil || resp == nil || resp.Secret == nil {
		return func() { s.logf("read %s: %s", path, outcome(err)) }
	}
	now := time.Now()
	value, _ := resp.Data["access_token"].(string)
	s.ev.mu.Lock()
	tok := s.ev.tokens[value]
	live := tok != nil && tok.live(now)
	endedBy := ""
	if tok != nil {
		endedBy = tok.endedBy
	}
	s.ev.mu.Unlock()
	if internal := resp.Secret.InternalData; internal["role"] != nil && kind == "role" && internal["client_id"] == nil {
		kind = "shared"
	}
	l := &simLease{kind: kind, name: name, secret: resp.Secret, tok: tok, issued: now, readStart: started, renewable: resp.Secret.Renewable}
	ttl, maxTTL := resp.Secret.TTL, resp.Secret.MaxTTL
	if ttl <= 0 {
		ttl = 24 * time.Hour
	}
	if maxTTL <= 0 {
		maxTTL = 48 * time.Hour
	}
	l.end, l.maxEnd = now.Add(min(ttl, maxTTL)), now.Add(maxTTL)
	var expectScope, expectClient string
	checkCurrent := false
	if kind == "shared" && settled {
		if cfg, r := s.storedConfig(), s.storedRole(name); cfg != nil && r != nil && r.Shared {
			expectScope, expectClient, checkCurrent = strings.Join(r.tokenScopes(cfg), " "), cfg.ClientID, true
		}
	}
	return func() {
		s.addLease(l)
		s.exemptCovered()
		id := 0
		if tok != nil {
			id = tok.id
		}
		s.logf("read %s: lease #%d on token #%d until +%v", path, l.id, id, l.end.Sub(now))
		switch {
		case tok == nil:
			s.fail("b:never-issued", "read %s got a token ev.energy never issued", path)
		case !live:
			s.fail("b:new-lease:"+kind+":"+endedBy, "read %s got a new lease (#%d) on token #%d, which ev.energy ended (%s) at %v", path, l.id, tok.id, endedBy, tok.endedAt.Sub(simEpoch))
		case checkCurrent && started.After(s.defDone) && (tok.scope != expectScope || tok.client != expectClient):
			s.fail("b-current:shared", "read %s, started after every config and role write ended, got token #%d of %s with scopes %q; the role and config now mint %s with %q",
				path, tok.id, tok.client, tok.scope, expectClient, expectScope)
		}
	}
}

func (s *sim) addLease(l *simLease) {
	s.nextLeaseID()
	l.id = s.stats["leases"]
	s.leases = append(s.leases, l)
}

func (s *sim) nextLeaseID() { s.stats["leases"]++ }

func (s *sim) storedConfig() *config {
	cfg, _ := getJSON[config](context.Background(), s.st.inner, configPath)
	return cfg
}

func (s *sim) storedRole(name string) *role {
	r, _ := getJSON[role](context.Background(), s.st.inner, rolePrefix+name)
	return r
}

// simEnding is an operator's request that ends tokens early, with a warning (rotate-role, a role
// or user delete, check-grants, a revocations drive with include_deferred): the leases of reads
// that started before it ended may lose their tokens early.
type simEnding struct {
	kind, name string    // the leases' kind ("" for all) and role or user ("" for all)
	end        time.Time // zero while in flight
}

// ending notes an operator's request that ends the tokens of kind and name; call the function it
// returns when the request has ended.
func (s *sim) ending(kind, name string) func() {
	e := &simEnding{kind: kind, name: name}
	s.endings = append(s.endings, e)
	s.exemptCovered()
	return func() {
		e.end = time.Now()
		s.exemptCovered()
	}
}

// exemptCovered marks the leases an operator's request covers.
func (s *sim) exemptCovered() {
	for _, l := range s.leases {
		for _, e := range s.endings {
			if (e.kind == "" || e.kind == l.kind) && (e.name == "" || e.name == l.name) && (e.end.IsZero() || !l.readStart.After(e.end)) {
				l.exempt = true
			}
		}
	}
}

// pickLease picks a live lease, a renewable one when renewable is set.
func (s *sim) pickLease(n int, renewable bool) *simLease {
	var live []*simLease
	for _, l := range s.leases {
		if !l.irrevocable && (!renewable || l.renewable) {
			live = append(live, l)
		}
	}
	if len(live) == 0 {
		return nil
	}
	return live[n%len(live)]
}

// renew renews a lease as Vault does: the backend's TTLs, capped by the lease's max from its issue.
func (s *sim) renew(l *simLease) {
	secret := *l.secret
	secret.IssueTime = l.issued
	resp, err := s.s(l).HandleRequest(context.Background(), &logical.Request{Operation: logical.RenewOperation, Path: "token", Secret: &secret, Storage: s.st, MountPoint: simMount})
	if err != nil || resp == nil || resp.Secret == nil {
		s.logf("renew #%d: %s", l.id, outcome(err))
		return
	}
	ttl, maxTTL := resp.Secret.TTL, resp.Secret.MaxTTL
	if ttl <= 0 {
		ttl = 24 * time.Hour
	}
	if maxTTL > 0 {
		l.maxEnd = l.issued.Add(maxTTL)
	}
	l.end = time.Now().Add(ttl)
	if l.end.After(l.maxEnd) {
		l.end = l.maxEnd
	}
	s.logf("renew #%d: until +%v", l.id, l.end.Sub(time.Now()))
}

func (s *sim) s(*simLease) *backend { return s.b }

// due is when Vault's expiration manager revokes the lease: at its end, or at the retry of a failed revocation.
func (l *simLease) due() time.Time {
	if l.retryAt.After(l.end) {
		return l.retryAt
	}
	return l.end
}

// revokeLease revokes a lease as Vault's expiration manager does, with its internal data; a
// failure keeps it for another attempt, and after six Vault keeps it as irrevocable.
func (s *sim) revokeLease(l *simLease) {
	secret := *l.secret
	secret.IssueTime = l.issued
	_, err := s.b.HandleRequest(context.Background(), &logical.Request{Operation: logical.RevokeOperation, Path: "token", Secret: &secret, Storage: s.st, MountPoint: simMount})
	if err == nil {
		s.leases = slices.DeleteFunc(s.leases, func(x *simLease) bool { return x == l })
		return
	}
	if l.failures++; l.failures >= 6 {
		l.irrevocable = true
	}
	s.logf("revoke #%d: %s", l.id, outcome(err))
}

// advance moves the clock on by d, ending each lease at its end as Vault's expiration manager does.
func (s *sim) advance(d time.Duration) {
	target := time.Now().Add(d)
	s.logf("advance %v", d)
	for {
		var next *simLease
		for _, l := range s.leases {
			if !l.irrevocable && (next == nil || l.due().Before(next.due())) {
				next = l
			}
		}
		if next == nil || next.due().After(target) {
			break
		}
		time.Sleep(time.Until(next.due()))
		synctest.Wait()
		s.collect()
		s.checkLeases()
		s.revokeLease(next)
		if next.failures > 0 && !next.irrevocable {
			next.retryAt = time.Now().Add(time.Duration(next.failures) * 10 * time.Second) // Vault's retry
		}
	}
	time.Sleep(time.Until(target))
}

// periodic runs the periodic pass as Vault does on the active node, timing it.
func (s *sim) periodic(b *backend) func() {
	s.mu.Lock()
	seen := s.invalidations
	s.mu.Unlock()
	s.st.mu.Lock()
	writes := s.st.writes
	s.st.mu.Unlock()
	b.tokens.mu.RLock()
	staleBefore := maps.Clone(b.tokens.stale)
	if !b.tokens.loaded {
		clear(staleBefore) // the pass's load of every token may end after it: the next pass's reads the marks
	}
	b.tokens.mu.RUnlock()
	start, stalled := time.Now(), &simStall{}
	err := b.PeriodicFunc(context.WithValue(context.Background(), simPassKey{}, stalled), &logical.Request{Storage: s.st})
	took := time.Since(start)
	return func() {
		s.passes++
		storage, call := stalled.get()
		s.logf("periodic pass: %v (storage stalled it %v, its longest call %v), %s", took, storage, call, outcome(err))
		// A call the pass sent before its budget ran out finishes; storage's stalls are not the pass's.
		limit := passBudget + storage + call + 500*time.Millisecond
		if took > limit {
			s.fail("d:pass-budget", "the periodic pass took %v: over its budget of %v, plus its longest call to ev.energy (%v), plus the %v storage stalled it", took, passBudget, call, storage)
		}
		if b == s.b && err == nil {
			s.checkMemory(seen, writes, staleBefore)
		}
	}
}

// rawJSON unmarshals a storage entry of the inner storage.
func rawJSON[T any](st *simStorage, key string) *T {
	entry, _ := st.inner.Get(context.Background(), key)
	if entry == nil {
		return nil
	}
	var v T
	if json.Unmarshal(entry.Value, &v) != nil {
		return nil
	}
	return &v
}
