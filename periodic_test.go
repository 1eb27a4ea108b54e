package evenergy

import (
	"context"
	"fmt"
	"testing"
	"time"

	"github.com/hashicorp/vault/sdk/logical"

	"github.com/evenergy/vault-plugin-secrets-evenergy/internal/standin"
)

func TestPeriodicPassWithNothingDueReadsNoStorage(t *testing.T) {
	b, s, _ := newCountedBackend(t, &logical.InmemStorage{})
	sv := newUnitStandin(t, b, s)
	connectUnitUser(t, b, s, sv, "driver")
	if err := b.periodic(t.Context(), &logical.Request{Storage: s}); err != nil { // lists pending authorizations once
		t.Fatal(err)
	}
	s.calls.Store(0)
	if err := b.periodic(t.Context(), &logical.Request{Storage: s}); err != nil {
		t.Fatal(err)
	}
	if n := s.calls.Load(); n != 0 {
		t.Fatalf("a periodic pass with nothing due made %d storage calls", n)
	}
}

// seedGrants stores n grants of users u0..u(n-1) whose tokens expire at expiresAt, with refresh
// tokens the stand-in issued, and loads them as a start would.
func seedGrants(tb testing.TB, b *backend, s logical.Storage, sv *standin.Server, n int, expiresAt time.Time) {
	tb.Helper()
	for i := range n {
		user := fmt.Sprintf("u%d", i)
		refresh, err := sv.IssueUserGrant(testClientID, user, "")
		if err != nil {
			tb.Fatal(err)
		}
		g := &grant{ClientID: testClientID, RefreshToken: refresh, AccessToken: "unknown", ExpiresAt: expiresAt, Status: grantActive}
		if err := putJSON(context.Background(), s, userPrefix+user, g); err != nil {
			tb.Fatal(err)
		}
	}
	if err := b.loadGrants(context.Background(), s); err != nil {
		tb.Fatal(err)
	}
}

// BenchmarkPeriodicPassNothingDue is one periodic pass over 10,000 grants of which none is due;
// the floor is a bare walk over as many cached grants, and the budget is 50 ms a pass.
func BenchmarkPeriodicPassNothingDue(b *testing.B) {
	be, s, _ := newCountedBackend(b, &logical.InmemStorage{})
	sv := newUnitStandin(b, be, s)
	seedGrants(b, be, s, sv, 10000, time.Now().Add(10*time.Hour))
	req := &logical.Request{Storage: s}
	if err := be.periodic(context.Background(), req); err != nil { // lists pending authorizations once
		b.Fatal(err)
	}
	floor := timeEach(1000, func() {
		be.cache.mu.RLock()
		for range be.cache.grants {
		}
		be.cache.mu.RUnlock()
	})
	s.calls.Store(0)
	start := time.Now()
	for b.Loop() {
		if err := be.periodic(context.Background(), req); err != nil {
			b.Fatal(err)
		}
	}
	pass := time.Since(start) / time.Duration(b.N)
	b.ReportMetric(float64(s.calls.Load())/float64(b.N), "storage-calls/pass")
	b.ReportMetric(float64(pass)/float64(floor), "x-floor")
	b.ReportMetric(float64(pass)/float64(50*time.Millisecond), "x-budget")
}

// BenchmarkPeriodicPassThousandDue refreshes 1,000 due grants at a stand-in that answers each
// refresh after 50 ms; the floor is those answers spread over the workers, the budget 15 s.
func BenchmarkPeriodicPassThousandDue(b *testing.B) {
	be, s := newUnitBackend(b)
	sv := newUnitStandin(b, be, s)
	sv.SetLatency(50 * time.Millisecond)
	req := &logical.Request{Storage: s}
	var total time.Duration
	for b.Loop() {
		b.StopTimer()
		seedGrants(b, be, s, sv, 1000, time.Now().Add(time.Minute))
		issued := len(sv.Tokens())
		b.StartTimer()
		start := time.Now()
		if err := be.periodic(context.Background(), req); err != nil {
			b.Fatal(err)
		}
		total += time.Since(start)
		if refreshed := (len(sv.Tokens()) - issued) / 2; refreshed != 1000 {
			b.Fatalf("the pass refreshed %d of 1,000 due grants", refreshed)
		}
	}
	pass := total / time.Duration(b.N)
	floor := 1000 * 50 * time.Millisecond / refreshWorkers
	b.ReportMetric(pass.Seconds(), "s/pass")
	b.ReportMetric(float64(pass)/float64(floor), "x-floor")
	b.ReportMetric(float64(pass)/float64(15*time.Second), "x-budget")
}

// timeEach is the mean time of n runs of f.
func timeEach(n int, f func()) time.Duration {
	start := time.Now()
	for range n {
		f()
	}
	return time.Since(start) / time.Duration(n)
}

// TestPeriodicLeavesRefreshesToActiveReaders: a read refreshes a token readAhead before the window,
// the periodic pass only once the window has begun, so it never rotates a token between the reads
// of a Vault Agent, whose leases end at the window.
func TestPeriodicLeavesRefreshesToActiveReaders(t *testing.T) {
	b, s := newUnitBackend(t)
	sv := newUnitStandin(t, b, s)
	cfg, _, err := b.config(t.Context(), s)
	if err != nil {
		t.Fatal(err)
	}
	seedGrants(t, b, s, sv, 1, time.Now().Add(cfg.RefreshWindow+readAhead/2))
	issued := len(sv.Tokens())
	if err := b.periodic(t.Context(), &logical.Request{Storage: s}); err != nil {
		t.Fatal(err)
	}
	if len(sv.Tokens()) != issued {
		t.Fatal("the periodic pass refreshed a token before its refresh window began")
	}
	if _, err := request(t, b, s, logical.ReadOperation, "users/u0/token", nil); err != nil {
		t.Fatal(err)
	}
	if len(sv.Tokens()) != issued+2 {
		t.Fatal("a read inside readAhead of the window did not refresh the token")
	}
	resp, err := request(t, b, s, logical.ReadOperation, "users/u0/token", nil)
	if err != nil || resp.Secret.TTL < readAhead {
		t.Fatalf("a lease of %v is shorter than readAhead: %v", resp.Secret.TTL, err)
	}
}
