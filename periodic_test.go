package evenergy

import (
	"context"
	"fmt"
	"sync"
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
	if err := b.tokens.loadAll(context.Background(), s); err != nil {
		tb.Fatal(err)
	}
}

// awaitIssued waits until the stand-in has issued n access tokens in all.
func awaitIssued(tb testing.TB, sv *standin.Server, n int) {
	tb.Helper()
	for deadline := time.Now().Add(10 * time.Minute); ; time.Sleep(10 * time.Millisecond) {
		issued, _ := sv.Counts()
		if issued >= n {
			return
		}
		if time.Now().After(deadline) {
			tb.Fatalf("%d tokens issued after 10 minutes, want %d", issued, n)
		}
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
		for range be.tokens.tokens {
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

// BenchmarkPeriodicPassThousandDue has a periodic pass start the background refresh of 1,000 due
// grants at a stand-in that answers each refresh after 50 ms, with a call_budget that does not hold
// it back, until all are refreshed; the floor is what its workers can send in that time.
func BenchmarkPeriodicPassThousandDue(b *testing.B) {
	const due, latency = 1000, 50 * time.Millisecond
	for b.Loop() {
		b.StopTimer()
		be, s := newUnitBackend(b)
		sv := newUnitStandin(b, be, s)
		if _, err := request(b, be, s, logical.UpdateOperation, "config", map[string]any{"call_budget": maxCallBudget}); err != nil {
			b.Fatal(err)
		}
		seedGrants(b, be, s, sv, due, time.Now().Add(time.Minute))
		sv.SetLatency(latency)
		issued, _ := sv.Counts()
		b.StartTimer()
		if err := be.periodic(context.Background(), &logical.Request{Storage: s}); err != nil {
			b.Fatal(err)
		}
		awaitIssued(b, sv, issued+due)
		b.StopTimer()
		be.Cleanup(context.Background())
		b.StartTimer()
	}
	all := b.Elapsed() / time.Duration(b.N)
	floor := due * latency / refreshWorkers
	b.ReportMetric(all.Seconds(), "s-all-refreshed")
	b.ReportMetric(float64(all)/float64(floor), "x-floor")
}

// timeEach is the mean time of n runs of f.
func timeEach(n int, f func()) time.Duration {
	start := time.Now()
	for range n {
		f()
	}
	return time.Since(start) / time.Duration(n)
}

// TestPeriodicLeavesRefreshesToActiveReaders: neither the periodic pass nor a read refreshes a token
// before its refresh point, where the leases end; a read within readAhead of the point waits for it
// and refreshes (a grant stored before grants recorded their point takes it from refresh_window).
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
		t.Fatal("a read inside readAhead of the refresh point did not refresh the token")
	}
	resp, err := request(t, b, s, logical.ReadOperation, "users/u0/token", nil)
	if err != nil || resp.Secret.TTL < readAhead {
		t.Fatalf("a lease of %v is shorter than readAhead: %v", resp.Secret.TTL, err)
	}
}

// TestPeriodicPassReturnsWhileTheRefreshGoesOn: with 64 grants due and ev.energy answering each
// refresh after 2 s, the pass returns after passBudget (Vault holds its state lock through it)
// while the background refresh goes on outside it; a pass meanwhile starts no second one, and
// every grant is refreshed once.
func TestPeriodicPassReturnsWhileTheRefreshGoesOn(t *testing.T) {
	const due, latency = 64, 2 * time.Second
	b, s := newUnitBackend(t)
	sv := newUnitStandin(t, b, s)
	seedGrants(t, b, s, sv, due, time.Now().Add(time.Minute))
	sv.SetLatency(latency)

	start := time.Now()
	if err := b.periodic(t.Context(), &logical.Request{Storage: s}); err != nil {
		t.Fatal(err)
	}
	took := time.Since(start)
	t.Logf("the pass returned after %v, with %d refreshes stored", took.Round(time.Millisecond), storedRefreshes(t, s, due))
	if took > passBudget+time.Second {
		t.Fatalf("the pass took %v, past its budget", took)
	}
	if err := b.periodic(t.Context(), &logical.Request{Storage: s}); err != nil {
		t.Fatal(err)
	}
	eventually(t, time.Minute, "every due grant to be refreshed in the background", func() bool { return storedRefreshes(t, s, due) == due })
	if n := sv.RepeatedRefreshTokens(); n != 0 {
		t.Fatalf("%d refresh tokens were sent twice", n)
	}
}

// storedRefreshes counts the seeded grants whose refresh reached storage.
func storedRefreshes(t *testing.T, s logical.Storage, seeded int) int {
	t.Helper()
	n := 0
	for i := range seeded {
		g, err := getJSON[grant](t.Context(), s, fmt.Sprintf("%su%d", userPrefix, i))
		if err != nil {
			t.Fatal(err)
		}
		if g.AccessToken != "unknown" {
			n++
		}
	}
	return n
}

func TestPeriodicPassStartsNothingOnceItsContextEnded(t *testing.T) {
	b, s := newUnitBackend(t)
	sv := newUnitStandin(t, b, s)
	seedGrants(t, b, s, sv, 8, time.Now().Add(time.Minute))
	ctx, cancel := context.WithCancel(t.Context())
	cancel()
	err := b.periodic(ctx, &logical.Request{Storage: s}) // storage may refuse to list with an ended context too
	if n := sv.TokenRequests(); n != 0 {
		t.Fatalf("a pass whose context had ended sent %d refreshes (it returned %v)", n, err)
	}
}

// TestPeriodicPassFindsGrantsThatCameDueByAChange: after a first pass, a grant another node stored
// due (learnt through Invalidate) and a grant a wider refresh_window makes due are both refreshed
// by the next pass.
func TestPeriodicPassFindsGrantsThatCameDueByAChange(t *testing.T) {
	b, s := newUnitBackend(t)
	sv := newUnitStandin(t, b, s)
	seedGrants(t, b, s, sv, 2, time.Now().Add(2*time.Hour))
	refreshed := func() int {
		issued := len(sv.Tokens())
		if err := b.periodic(t.Context(), &logical.Request{Storage: s}); err != nil {
			t.Fatal(err)
		}
		return (len(sv.Tokens()) - issued) / 2
	}
	if n := refreshed(); n != 0 {
		t.Fatalf("the first pass refreshed %d grants of none due", n)
	}

	g, err := getJSON[grant](t.Context(), s, userPrefix+"u0")
	if err != nil {
		t.Fatal(err)
	}
	g.ExpiresAt = time.Now().Add(time.Minute)
	if err := putJSON(t.Context(), s, userPrefix+"u0", g); err != nil {
		t.Fatal(err)
	}
	b.InvalidateKey(t.Context(), userPrefix+"u0")
	if n := refreshed(); n != 1 {
		t.Fatalf("after another node stored u0 due, a pass refreshed %d grants", n)
	}

	if _, err := request(t, b, s, logical.UpdateOperation, "config", map[string]any{"refresh_window": "3h"}); err != nil {
		t.Fatal(err)
	}
	if n := refreshed(); n != 1 {
		t.Fatalf("after refresh_window grew past u1's expiry, a pass refreshed %d grants", n)
	}
}

// TestPeriodicPassKeepsToOneBudget: with more revocations due than the call budget sends in a pass
// and 50,000 expired pending authorizations to sweep, the pass ends about passBudget after it began
// (each step used to have a budget of its own: 4 s and more); the revocations, a promise, go first.
func TestPeriodicPassKeepsToOneBudget(t *testing.T) {
	b, inmem := newUnitBackend(t)
	newUnitStandin(t, b, inmem)
	seedExpiredPending(t, inmem, 50000, false)
	const queued = 200 // 10 s of calls at the default budget of 20 a second
	for i := range queued {
		rec := revocation{ClientID: testClientID, AccessToken: fmt.Sprintf("queued-%d", i), ExpiresAt: time.Now().Add(time.Hour), Reason: reasonLeaseEnded}
		if err := b.queueRevocation(t.Context(), inmem, rec, nil); err != nil {
			t.Fatal(err)
		}
	}
	s := &slowStorage{Storage: inmem}
	start := time.Now()
	if err := b.periodic(t.Context(), &logical.Request{Storage: s}); err != nil {
		t.Fatal(err)
	}
	took, revoked := time.Since(start), queued-len(pendingRevocations(t, inmem))
	t.Logf("the pass took %v and revoked %d of %d queued records", took.Round(time.Millisecond), revoked, queued)
	if took > passBudget+time.Second || revoked == 0 {
		t.Fatalf("the pass took %v (budget %v) and revoked %d records; want one budget, the revocations first", took, passBudget, revoked)
	}
}

// passReturns runs one periodic pass and fails the test unless it returns within 30 s, a bound far
// past its budget that only a pass waiting on something else misses.
func passReturns(t *testing.T, b *backend, s logical.Storage, waitingOn string) {
	t.Helper()
	done := make(chan struct{})
	go func() {
		defer close(done)
		b.periodic(context.Background(), &logical.Request{Storage: s})
	}()
	select {
	case <-done:
	case <-time.After(30 * time.Second):
		t.Fatalf("the periodic pass waited on %s past its budget", waitingOn)
	}
}

// TestPeriodicPassWaitsOnNoTokensLock: storing an unsaved grant skips a grant whose lock is held
// (a delete waiting on a slow revocation, a refresh) rather than wait for it; a later pass stores it.
func TestPeriodicPassWaitsOnNoTokensLock(t *testing.T) {
	s := &refusingStorage{Storage: &logical.InmemStorage{}}
	b, _, _ := newCountedBackend(t, s)
	sv := newUnitStandin(t, b, s)
	connectDueUser(t, b, s, sv, "driver")
	s.refuse.Store(true)
	if _, _, err := readUserToken(t, b, s, "driver"); err != nil {
		t.Fatal(err)
	}
	s.refuse.Store(false)
	unlock := b.tokens.lock(userPrefix + "driver")
	passReturns(t, b, s, "a grant's lock")
	unlock()
	runPeriodic(t, b, s)
	b.tokens.mu.RLock()
	unsaved := len(b.tokens.unsaved)
	b.tokens.mu.RUnlock()
	if unsaved != 0 {
		t.Fatal("the pass after the lock was let go did not store the unsaved grant")
	}
}

// TestPeriodicPassAfterAFailedStartLoadKeepsItsBudget: after the start-up load failed, the pass
// starts the load of every token in the background instead of making it within the pass.
func TestPeriodicPassAfterAFailedStartLoadKeepsItsBudget(t *testing.T) {
	b, inmem := newUnitBackend(t)
	sv := newUnitStandin(t, b, inmem)
	connectUnitUser(t, b, inmem, sv, "driver")
	s := &blockedListing{Storage: inmem, release: make(chan struct{}), failFirst: true}
	restarted, _, _ := newCountedBackend(t, s)
	var releaseOnce sync.Once
	release := func() { releaseOnce.Do(func() { close(s.release) }) }
	t.Cleanup(release) // before the backend's cleanup, which waits for nothing the listing holds
	if err := restarted.Initialize(t.Context(), &logical.InitializationRequest{Storage: s}); err != nil {
		t.Fatal(err)
	}
	<-restarted.grantsLoaded
	passReturns(t, restarted, s, "a load of every token")
	release()
	eventually(t, 30*time.Second, "the load the pass started to end", func() bool {
		restarted.tokens.mu.RLock()
		defer restarted.tokens.mu.RUnlock()
		return restarted.tokens.loaded && restarted.tokens.tokens[userPrefix+"driver"] != nil
	})
}
