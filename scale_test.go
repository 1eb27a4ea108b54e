package evenergy

import (
	"context"
	"fmt"
	"runtime"
	"strings"
	"testing"
	"time"

	"github.com/hashicorp/vault/sdk/logical"
	"golang.org/x/oauth2"

	"github.com/evenergy/vault-plugin-secrets-evenergy/internal/standin"
)

// The engine holding 100,000 users on one mount (issue 13), in process on logical.InmemStorage: the
// start-up load and the memory it holds, a periodic pass with none due, and 10,000 grants coming due
// at once. `go run ./bench -scale` measures the same in a real Raft Vault.

const (
	scaleUsers   = 100_000
	scaleDue     = 10_000
	scaleLatency = 50 * time.Millisecond // how long the stand-in takes to answer each refresh
)

// scaleBackend is a unit backend, configured against a stand-in, holding scaleUsers grants as the
// engine stores them after a code exchange, loaded as at start. The first due grants hold refresh
// tokens the stand-in issued and are inside the refresh window; the others expire in ten hours.
func scaleBackend(tb testing.TB, due int) (*backend, *countingStorage, *standin.Server) {
	tb.Helper()
	be, s, _ := newCountedBackend(tb, &logical.InmemStorage{})
	sv := newUnitStandin(tb, be, s)
	ctx := context.Background()
	cfg, _, err := be.config(ctx, s)
	if err != nil {
		tb.Fatal(err)
	}
	for i := range scaleUsers {
		user := scaleUser(i)
		tok := &oauth2.Token{
			AccessToken:  fmt.Sprintf("access-%023d", i), // as long as ev.energy's tokens
			RefreshToken: fmt.Sprintf("refresh-%022d", i),
			TokenType:    "Bearer",
			Expiry:       time.Now().Add(10 * time.Hour),
		}
		if i < due {
			refresh, err := sv.IssueUserGrant(testClientID, user, "")
			if err != nil {
				tb.Fatal(err)
			}
			tok.RefreshToken, tok.Expiry = refresh, time.Now().Add(time.Minute)
		}
		g := grant{ClientID: testClientID}.refreshed(tok.WithExtra(map[string]any{"scope": strings.Join(testScopes, " ")}), cfg)
		g.LastRefreshedAt = g.ExpiresAt.Add(-tokenLifetime) // a 10-hour token near its end, not a 1-minute one
		g.RefreshAt = g.windowOpens(cfg)
		if err := putJSON(ctx, s, userPrefix+user, g); err != nil {
			tb.Fatal(err)
		}
	}
	if err := be.tokens.loadAll(ctx, s); err != nil {
		tb.Fatal(err)
	}
	return be, s, sv
}

func scaleUser(i int) string { return fmt.Sprintf("driver-%06d", i) }

// BenchmarkScaleLoad loads 100,000 stored grants into a new backend's memory, as a start does; the
// floor is reading the same entries from storage without decoding them. It reports the heap the
// loaded grants hold, in all and per grant.
func BenchmarkScaleLoad(b *testing.B) {
	_, s, _ := scaleBackend(b, 0)
	ctx := context.Background()
	floor := timeEach(3, func() {
		keys, err := s.List(ctx, userPrefix)
		for _, key := range keys {
			if err == nil {
				_, err = s.Get(ctx, userPrefix+key)
			}
		}
		if err != nil {
			b.Fatal(err)
		}
	})
	var held uint64
	for b.Loop() {
		b.StopTimer()
		fresh := newBackend()
		before := heapAfterGC()
		b.StartTimer()
		if err := fresh.tokens.loadAll(ctx, s); err != nil {
			b.Fatal(err)
		}
		b.StopTimer()
		held = heapAfterGC() - before
		if loaded := fresh.grantsByStatus(); loaded[grantActive] != scaleUsers {
			b.Fatalf("loaded %v, want %d active grants", loaded, scaleUsers)
		}
		runtime.KeepAlive(fresh)
		b.StartTimer()
	}
	b.ReportMetric(float64(b.Elapsed()/time.Duration(b.N))/float64(floor), "x-floor")
	b.ReportMetric(float64(held)/(1<<20), "heap-MiB")
	b.ReportMetric(float64(held)/scaleUsers, "heap-B/grant")
}

// heapAfterGC is the live heap once a collection has run.
func heapAfterGC() uint64 {
	runtime.GC()
	var m runtime.MemStats
	runtime.ReadMemStats(&m)
	return m.HeapAlloc
}

// BenchmarkScalePeriodicNothingDue is one periodic pass over 100,000 grants of which none is due;
// the floor is a bare walk over as many cached grants, the target 20 ms a pass with no storage call.
func BenchmarkScalePeriodicNothingDue(b *testing.B) {
	be, s, _ := scaleBackend(b, 0)
	req := &logical.Request{Storage: s}
	if err := be.periodic(context.Background(), req); err != nil { // lists pending authorizations once
		b.Fatal(err)
	}
	floor := timeEach(100, func() {
		be.cache.mu.RLock()
		for range be.tokens.tokens {
		}
		be.cache.mu.RUnlock()
	})
	s.calls.Store(0)
	for b.Loop() {
		if err := be.periodic(context.Background(), req); err != nil {
			b.Fatal(err)
		}
	}
	pass := b.Elapsed() / time.Duration(b.N)
	b.ReportMetric(float64(s.calls.Load())/float64(b.N), "storage-calls/pass")
	b.ReportMetric(float64(pass)/float64(floor), "x-floor")
	b.ReportMetric(float64(pass)/float64(20*time.Millisecond), "x-target")
}

// BenchmarkScaleTenThousandDue has a periodic pass start the background refresh of the 10,000 of
// 100,000 grants that came due at once, at a stand-in answering each refresh in 50 ms, with a
// call_budget that does not hold it back, until all are refreshed. The floor is the ideal: those
// answers spread over the workers; the target is 1.2x it.
func BenchmarkScaleTenThousandDue(b *testing.B) {
	be, s, sv := scaleBackend(b, scaleDue)
	sv.SetLatency(scaleLatency)
	if _, err := request(b, be, s, logical.UpdateOperation, "config", map[string]any{"call_budget": maxCallBudget}); err != nil {
		b.Fatal(err)
	}
	ctx := context.Background()
	req := &logical.Request{Storage: s}
	var rounds int
	for b.Loop() {
		b.StopTimer()
		if rounds > 0 {
			comeDueAgain(b, be, s, scaleDue)
		}
		rounds++
		issued, _ := sv.Counts()
		b.StartTimer()
		if err := be.periodic(ctx, req); err != nil {
			b.Fatal(err)
		}
		awaitIssued(b, sv, issued+scaleDue)
	}
	all := b.Elapsed() / time.Duration(b.N)
	ideal := scaleDue * scaleLatency / refreshWorkers
	b.ReportMetric(all.Seconds(), "s-all-refreshed")
	b.ReportMetric(float64(all)/float64(ideal), "x-ideal")
}

// comeDueAgain moves the expiry of the first n users' grants into the refresh window, as time would.
func comeDueAgain(tb testing.TB, be *backend, s logical.Storage, n int) {
	tb.Helper()
	for i := range n {
		user := scaleUser(i)
		g, err := be.grant(context.Background(), s, user)
		if err != nil {
			tb.Fatal(err)
		}
		due := *g
		due.ExpiresAt = time.Now().Add(time.Minute)
		due.LastRefreshedAt = due.ExpiresAt.Add(-tokenLifetime)
		if err := be.putGrant(context.Background(), s, user, &due); err != nil {
			tb.Fatal(err)
		}
	}
}
