package evenergy

import (
	"context"
	"errors"
	"net/http"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/hashicorp/vault/sdk/logical"

	"github.com/evenergy/vault-plugin-secrets-evenergy/internal/standin"
)

// fakeClock is the engine's clock in a test: it moves only when the test moves it, and its timers
// fire as it passes them.
type fakeClock struct {
	mu     sync.Mutex
	now    time.Time
	timers []fakeTimer
}

type fakeTimer struct {
	at    time.Time
	fires chan time.Time
}

func (c *fakeClock) Now() time.Time {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.now
}

func (c *fakeClock) Advance(d time.Duration) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.now = c.now.Add(d)
	c.fire()
}

// WaitUntil moves the clock to t at once, as if the wait had passed, unless ctx has ended.
func (c *fakeClock) WaitUntil(ctx context.Context, t time.Time) error {
	if err := ctx.Err(); err != nil {
		return err
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.now.Before(t) {
		c.now = t
	}
	return nil
}

func (c *fakeClock) Set(now time.Time) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.now = now
	c.fire()
}

// After is time.After on this clock.
func (c *fakeClock) After(d time.Duration) <-chan time.Time {
	c.mu.Lock()
	defer c.mu.Unlock()
	t := fakeTimer{at: c.now.Add(d), fires: make(chan time.Time, 1)}
	c.timers = append(c.timers, t)
	c.fire()
	return t.fires
}

// fire fires the timers the clock has reached; call it with mu held.
func (c *fakeClock) fire() {
	pending := c.timers[:0]
	for _, t := range c.timers {
		if t.at.After(c.now) {
			pending = append(pending, t)
			continue
		}
		t.fires <- c.now
	}
	c.timers = pending
}

// useFakeClock makes the backend's refresh points, backoff and leases follow a clock standing at at,
// which a read waiting for a refresh point moves there.
func useFakeClock(b *backend, at time.Time) *fakeClock {
	c := &fakeClock{now: at}
	c.drive(b)
	return c
}

// drive makes the backend's refresh points, backoff and leases follow c.
func (c *fakeClock) drive(b *backend) {
	b.tokens.refreshes.now, b.tokens.refreshes.waitUntil = c.Now, c.WaitUntil
}

// connectDueUser connects a user whose 5-minute token is due for a refresh on the clock it returns,
// which stands 3 minutes later; tokens issued after it live 10 hours.
func connectDueUser(t testing.TB, b *backend, s logical.Storage, sv *standin.Server, user string) (*grant, *fakeClock) {
	t.Helper()
	sv.SetTokenLifetime(5 * time.Minute)
	g := connectUnitUser(t, b, s, sv, user)
	sv.SetTokenLifetime(10 * time.Hour)
	return g, useFakeClock(b, time.Now().Add(3*time.Minute))
}

// readUserToken reads users/<user>/token and returns its access token and lease.
func readUserToken(t testing.TB, b *backend, s logical.Storage, user string) (string, time.Duration, error) {
	resp, err := request(t, b, s, logical.ReadOperation, "users/"+user+"/token", nil)
	if resp.IsError() { // a caller's mistake, which Vault answers with 400
		return "", 0, logical.CodedError(http.StatusBadRequest, resp.Error().Error())
	}
	if err != nil {
		return "", 0, err
	}
	return resp.Data["access_token"].(string), resp.Secret.TTL, nil
}

// TestBackoff: a token with hours left backs off as before, 1 s doubling to 60 s; nearer its end
// the wait is at most a quarter of what is left, and 3 s once readers are refused; Retry-After is
// honoured up to 60 s and never past the token's expiry; random spreads every wait by ±20%.
func TestBackoff(t *testing.T) {
	const mid = 0.5 // no spread
	cases := []struct {
		name       string
		failures   int
		left       time.Duration
		retryAfter time.Duration
		random     float64
		want       time.Duration
	}{
		{"hours left: 1st failure", 1, 5 * time.Hour, 0, mid, time.Second},
		{"hours left: 2nd", 2, 5 * time.Hour, 0, mid, 2 * time.Second},
		{"hours left: 5th", 5, 5 * time.Hour, 0, mid, 16 * time.Second},
		{"hours left: 7th, capped", 7, 5 * time.Hour, 0, mid, time.Minute},
		{"hours left: 30th, capped", 30, 5 * time.Hour, 0, mid, time.Minute},
		{"2 min left: a quarter of it", 7, 2 * time.Minute, 0, mid, 30 * time.Second},
		{"40 s left: a quarter of it", 5, 40 * time.Second, 0, mid, 10 * time.Second},
		{"40 s left, 1st failure: 1 s", 1, 40 * time.Second, 0, mid, time.Second},
		{"10 s left: 3 s", 7, 10 * time.Second, 0, mid, refusedBackoff},
		{"refused (1 s left): 3 s", 7, time.Second, 0, mid, refusedBackoff},
		{"expired: 3 s", 20, -time.Hour, 0, mid, refusedBackoff},
		{"spread down 20%", 7, 5 * time.Hour, 0, 0, 48 * time.Second},
		{"spread up 20%", 7, 5 * time.Hour, 0, 0.999999, 72 * time.Second},
		{"expired, spread down", 3, -time.Second, 0, 0, 2400 * time.Millisecond},
		{"expired, spread up", 3, -time.Second, 0, 0.999999, 3600 * time.Millisecond},
		{"Retry-After 90 s, hours left: 60 s", 1, 5 * time.Hour, 90 * time.Second, mid, time.Minute},
		{"Retry-After 6 h: 60 s", 1, 5 * time.Hour, 6 * time.Hour, mid, time.Minute},
		{"Retry-After 30 s, hours left", 1, 5 * time.Hour, 30 * time.Second, 0, 30 * time.Second},
		{"Retry-After 30 s, 10 s left: at its expiry", 1, 10 * time.Second, 30 * time.Second, mid, 10 * time.Second},
		{"Retry-After 30 s, expired: 3 s", 4, -time.Second, 30 * time.Second, mid, refusedBackoff},
		{"Retry-After shorter than the backoff", 6, 5 * time.Hour, 5 * time.Second, mid, 32 * time.Second},
	}
	for _, c := range cases {
		if got := backoff(c.failures, c.left, c.retryAfter, c.random); got.Round(time.Millisecond) != c.want {
			t.Errorf("%s: backoff(%d, %v, %v, %v) = %v, want %v", c.name, c.failures, c.left, c.retryAfter, c.random, got, c.want)
		}
	}
}

// TestBackoffSpreadsGrantsThatFailedTogether: 1,000 grants whose tokens expired and whose refresh
// failed at the same moment retry across at least a second, not all at once.
func TestBackoffSpreadsGrantsThatFailedTogether(t *testing.T) {
	r := newRefreshes()
	earliest, latest := time.Duration(1<<62), time.Duration(0)
	for range 1000 {
		wait := backoff(5, -time.Second, 0, r.random())
		earliest, latest = min(earliest, wait), max(latest, wait)
	}
	if latest-earliest < time.Second || earliest < 2*time.Second || latest > 4*time.Second {
		t.Fatalf("1,000 expired grants retry between %v and %v, want 2-4 s spread over at least a second", earliest, latest)
	}
}

// storedRefreshAt is the refresh point of the user's stored grant.
func storedRefreshAt(t testing.TB, s logical.Storage, user string) time.Time {
	t.Helper()
	g, err := getJSON[grant](t.Context(), s, userPrefix+user)
	if err != nil || g == nil {
		t.Fatalf("no stored grant of %s: %v", user, err)
	}
	return g.RefreshAt
}

// clockedCalls serves sv and notes the fake clock's time of each token request.
func clockedCalls(t *testing.T, b *backend, s logical.Storage, clock *fakeClock) (*standin.Server, func() []time.Time) {
	t.Helper()
	sv := newTestStandin()
	var (
		mu    sync.Mutex
		calls []time.Time
	)
	unitConfig(t, b, s, http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.URL.Path == "/o/token" {
			mu.Lock()
			calls = append(calls, clock.Now())
			mu.Unlock()
		}
		sv.ServeHTTP(w, r)
	}))
	return sv, func() []time.Time {
		mu.Lock()
		defer mu.Unlock()
		return slices.Clone(calls)
	}
}

// TestConcurrentReadersDuringFailureSendOneRefresh: 20 readers of a due token while ev.energy
// answers 500 send one call per attempt, at the refresh point and then 1 s and 2 s after each
// failure (the readers wait for each attempt, on the fake clock), and each failure stores its next
// attempt with one write, none per read. Every reader then gets the still-valid token under a lease
// ending exactly at the next attempt, 4 s away.
func TestConcurrentReadersDuringFailureSendOneRefresh(t *testing.T) {
	b, s, _ := newCountedBackend(t, &logical.InmemStorage{})
	sv := newUnitStandin(t, b, s)
	g, clock := connectDueUser(t, b, s, sv, "driver")
	b.tokens.refreshes.random = func() float64 { return 0.5 } // no spread
	sv.SetFault(standin.Fault{Kind: standin.FaultServerError})
	sv.SetLatency(100 * time.Millisecond)
	calls := sv.TokenRequests()
	s.calls.Store(0)

	var wg sync.WaitGroup
	for range 20 {
		wg.Go(func() {
			tok, lease, err := readUserToken(t, b, s, "driver")
			if err != nil || tok != g.AccessToken || lease != 4*time.Second {
				t.Errorf("a reader got a %v lease, the current token %v, error %v; want the current token for 4 s", lease, tok == g.AccessToken, err)
			}
		})
	}
	wg.Wait()
	if n := sv.TokenRequests() - calls; n != 3 {
		t.Fatalf("20 readers caused %d refresh calls, want 3", n)
	}
	if n := s.calls.Load(); n != 3 {
		t.Fatalf("3 failed refreshes made %d storage calls, want 3 writes", n)
	}
	if at := storedRefreshAt(t, s.Storage, "driver"); !at.Equal(clock.Now().Add(4 * time.Second)) {
		t.Fatalf("the stored next attempt is %v after the clock, want 4 s", at.Sub(clock.Now()))
	}
	resp, err := request(t, b, s, logical.ReadOperation, "users/driver", nil)
	if err != nil || resp.Data["status"] != grantActive || !strings.Contains(resp.Data["last_error"].(string), "HTTP 500") {
		t.Fatalf("users/driver after the failure: %v %v", resp, err)
	}
}

// TestSteadyReaderDuringFailureBacksOff: one reader every 0.5 s for 20 s while ev.energy answers 500
// sends a refresh only when the backoff (1, 2, 4, 8, 16 s) allows, each lease ends by the stored
// next attempt, and each failed attempt writes once; once ev.energy is back, the first read at the
// next attempt gets a fresh token, stored with one write.
func TestSteadyReaderDuringFailureBacksOff(t *testing.T) {
	b, s, _ := newCountedBackend(t, &logical.InmemStorage{})
	clock := useFakeClock(b, time.Now())
	sv, attempts := clockedCalls(t, b, s, clock)
	g, _ := connectDueUser(t, b, s, sv, "driver")
	clock.drive(b) // connectDueUser set a clock of its own
	clock.Set(time.Now().Add(3 * time.Minute))
	sv.SetFault(standin.Fault{Kind: standin.FaultServerError})
	before := len(attempts())
	s.calls.Store(0)

	for range 40 {
		tok, lease, err := readUserToken(t, b, s, "driver")
		if err != nil || tok != g.AccessToken || lease < readAhead || lease > maxBackoff {
			t.Fatalf("at %v: lease %v, current token %v, error %v", clock.Now().Sub(g.ExpiresAt), lease, tok == g.AccessToken, err)
		}
		if end, at := clock.Now().Add(lease), storedRefreshAt(t, s.Storage, "driver"); end.After(at) {
			t.Fatalf("a lease ends %v after the next attempt", end.Sub(at))
		}
		clock.Advance(500 * time.Millisecond)
	}
	sent := attempts()[before:]
	for i := 1; i < len(sent); i++ {
		if gap, wait := sent[i].Sub(sent[i-1]), backoff(i, g.ExpiresAt.Sub(sent[i-1]), 0, 0); gap < wait {
			t.Fatalf("attempt %d came %v after the one before, want at least %v", i+1, gap, wait)
		}
	}
	if n := len(sent); n > 7 || n < 4 {
		t.Fatalf("a reader every 0.5 s for 20 s caused %d refresh calls, want 4 to 7", n)
	}
	if n := s.calls.Load(); n != int64(len(sent)) {
		t.Fatalf("%d failed refreshes made %d storage writes, want one each", len(sent), n)
	}
	t.Logf("%d refresh calls in 40 reads over %v", len(sent), sent[len(sent)-1].Sub(sent[0]))

	// ev.energy is back: reads before the next attempt get the current token, the first one at it a fresh one.
	sv.SetFault(standin.Fault{})
	retryAt := storedRefreshAt(t, s.Storage, "driver")
	step := retryAt.Sub(clock.Now())
	for ; clock.Now().Before(retryAt.Add(-readAhead)); clock.Advance(500 * time.Millisecond) {
		if tok, _, err := readUserToken(t, b, s, "driver"); err != nil || tok != g.AccessToken {
			t.Fatalf("before the next attempt: %v", err)
		}
	}
	s.calls.Store(0)
	tok, lease, err := readUserToken(t, b, s, "driver")
	if err != nil || tok == g.AccessToken || !sv.Active(tok) || lease < 9*time.Hour {
		t.Fatalf("at the next attempt, %v after ev.energy came back, no fresh token (lease %v): %v", step, lease, err)
	}
	if sent := attempts(); sent[len(sent)-1].Before(retryAt) {
		t.Fatalf("the refresh went %v before the next attempt", retryAt.Sub(sent[len(sent)-1]))
	}
	if stored, _ := getJSON[grant](t.Context(), s.Storage, userPrefix+"driver"); stored.AccessToken != tok {
		t.Fatal("the refreshed grant was not stored")
	}
	if n := s.calls.Load(); n != 1 {
		t.Fatalf("the refresh made %d storage calls, want one write", n)
	}
	if resp, _ := request(t, b, s, logical.ReadOperation, "users/driver", nil); resp.Data["last_error"] != "" {
		t.Fatalf("last_error after a successful refresh: %v", resp.Data["last_error"])
	}
}

// TestSteadyReaderOfAGrantWithHoursLeftBacksOff: one reader every 0.5 s for 40 s of a token with
// 5 hours left, inside a 5-hour refresh window, while ev.energy answers 500: the attempts come
// further apart each time (1, 2, 4, 8, 16 s), and every read gets the still-valid token.
func TestSteadyReaderOfAGrantWithHoursLeftBacksOff(t *testing.T) {
	b, s := newUnitBackend(t)
	clock := useFakeClock(b, time.Now())
	sv, calls := clockedCalls(t, b, s, clock)
	if _, err := request(t, b, s, logical.UpdateOperation, "config", map[string]any{"refresh_window": "5h"}); err != nil {
		t.Fatal(err)
	}
	g := connectUnitUser(t, b, s, sv, "driver") // a 10-hour token
	clock.Set(g.ExpiresAt.Add(-5 * time.Hour))
	b.tokens.refreshes.random = func() float64 { return 0.5 } // no spread
	sv.SetFault(standin.Fault{Kind: standin.FaultServerError})
	before := len(calls())
	start := clock.Now()
	for range 80 {
		tok, _, err := readUserToken(t, b, s, "driver")
		if err != nil || tok != g.AccessToken {
			t.Fatalf("at %v: current token %v, error %v", clock.Now().Sub(start), tok == g.AccessToken, err)
		}
		clock.Advance(500 * time.Millisecond)
	}
	var attempts []time.Duration // when each call went, from the first read
	for _, at := range calls()[before:] {
		attempts = append(attempts, at.Sub(start))
	}
	want := []time.Duration{0, time.Second, 3 * time.Second, 7 * time.Second, 15 * time.Second, 31 * time.Second}
	if !slices.Equal(attempts, want) {
		t.Fatalf("refresh calls at %v, want at %v", attempts, want)
	}
}

// TestHeldLeaseNeverOutlivesTheToken: a Retry-After longer than what is left of the token gives a
// lease ending with the token, and the next attempt at its expiry; when that fails too, the read
// answers the failure.
func TestHeldLeaseNeverOutlivesTheToken(t *testing.T) {
	b, s := newUnitBackend(t)
	sv := newUnitStandin(t, b, s)
	if _, err := request(t, b, s, logical.UpdateOperation, "config", map[string]any{"request_timeout": "2s"}); err != nil {
		t.Fatal(err)
	}
	g := connectUnitUser(t, b, s, sv, "driver")
	clock := useFakeClock(b, g.ExpiresAt.Add(-10*time.Second))
	sv.SetFault(standin.Fault{Kind: standin.FaultRateLimited, RetryAfter: time.Minute})
	calls := sv.TokenRequests()

	if tok, lease, err := readUserToken(t, b, s, "driver"); err != nil || tok != g.AccessToken || lease != 10*time.Second {
		t.Fatalf("with 10 s of the token left and Retry-After 60: lease %v, error %v; want the current token until it expires", lease, err)
	}
	clock.Advance(8500 * time.Millisecond)
	_, _, err := readUserToken(t, b, s, "driver")
	var coded logical.HTTPCodedError
	if !errors.As(err, &coded) || coded.Code() != http.StatusTooManyRequests || !strings.Contains(err.Error(), "retry after 1m0s") {
		t.Fatalf("with 1.5 s of the token left: %v; want the refresh's 429", err)
	}
	if n := sv.TokenRequests() - calls; n != 2 || !clock.Now().Equal(g.ExpiresAt) {
		t.Fatalf("%d refresh calls, the last %v before the token's expiry; want 2, the second at the expiry", n, g.ExpiresAt.Sub(clock.Now()))
	}
}

// TestRetryAfterOnARefreshIsCapped: one 429 to a refresh with Retry-After of 6 hours, as seconds or
// as an HTTP date, holds the next attempt back a minute (maxBackoff), not 6 hours: the read gets
// the current token until then, and a read at that minute gets a fresh one.
func TestRetryAfterOnARefreshIsCapped(t *testing.T) {
	for name, retryAfter := range map[string]func() string{
		"seconds":   func() string { return "21600" },
		"HTTP date": func() string { return time.Now().Add(6 * time.Hour).UTC().Format(http.TimeFormat) },
	} {
		t.Run(name, func(t *testing.T) {
			b, s := newUnitBackend(t)
			sv := newTestStandin()
			var limited atomic.Bool
			unitConfig(t, b, s, http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
				if r.URL.Path == "/o/token" && limited.CompareAndSwap(true, false) {
					w.Header().Set("Retry-After", retryAfter())
					http.Error(w, `{"detail": "Request was throttled."}`, http.StatusTooManyRequests)
					return
				}
				sv.ServeHTTP(w, r)
			}))
			g, clock := connectDueUser(t, b, s, sv, "driver")
			limited.Store(true)
			tok, lease, err := readUserToken(t, b, s, "driver")
			if err != nil || tok != g.AccessToken || lease != maxBackoff {
				t.Fatalf("after the 429: lease %v, current token %v, error %v; want the current token for a minute", lease, tok == g.AccessToken, err)
			}
			clock.Advance(maxBackoff - readAhead)
			if tok, _, err := readUserToken(t, b, s, "driver"); err != nil || tok == g.AccessToken || !sv.Active(tok) {
				t.Fatalf("a minute after the 429, no fresh token: %v", err)
			}
		})
	}
}

// TestNoReaderWaitsBehindAnothersRefresh: 32 readers of one user's token, which is always due for a
// refresh, while ev.energy takes half a second per call and fails every other one. A reader waits
// for at most the one refresh in flight, never for a queue of them: every read is answered within
// request_timeout plus a second.
func TestNoReaderWaitsBehindAnothersRefresh(t *testing.T) {
	const requestTimeout, latency, refreshCalls = 3 * time.Second, 500 * time.Millisecond, 6
	b, s := newUnitBackend(t)
	sv := newTestStandin()
	var calls atomic.Int64
	unitConfig(t, b, s, http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.URL.Path == "/o/token" && calls.Add(1)%2 == 1 {
			time.Sleep(latency)
			http.Error(w, "Server Error (500)", http.StatusInternalServerError)
			return
		}
		sv.ServeHTTP(w, r)
	}))
	if _, err := request(t, b, s, logical.UpdateOperation, "config", map[string]any{"request_timeout": requestTimeout.String()}); err != nil {
		t.Fatal(err)
	}
	seedGrants(t, b, s, sv, 1, time.Now().Add(10*time.Hour))
	// The clock runs 10 h ahead, so every token ev.energy issues (for 10 h) is due when read.
	ahead := 10*time.Hour - 5*time.Minute
	b.tokens.refreshes.now = func() time.Time { return time.Now().Add(ahead) }
	b.tokens.refreshes.waitUntil = func(ctx context.Context, t time.Time) error { return sleepUntil(ctx, t.Add(-ahead)) }
	sv.SetLatency(latency)

	var (
		wg      sync.WaitGroup
		mu      sync.Mutex
		slowest time.Duration
	)
	for range 32 {
		wg.Go(func() {
			for reads := 0; reads < 4 || calls.Load() < refreshCalls; reads++ {
				time.Sleep(20 * time.Millisecond) // a reader's pace, not a wait for anything
				start := time.Now()
				_, _, err := readUserToken(t, b, s, "u0")
				took := time.Since(start)
				if err != nil {
					t.Errorf("a read failed: %v", err)
				}
				mu.Lock()
				slowest = max(slowest, took)
				mu.Unlock()
			}
		})
	}
	wg.Wait()
	t.Logf("%d refresh calls, slowest read %v", calls.Load(), slowest.Round(time.Millisecond))
	if slowest > requestTimeout+time.Second {
		t.Fatalf("a read took %v, longer than request_timeout plus a second", slowest)
	}
}

// TestRefreshOutlivesTheReaderWhoStartedIt: the reader who started a refresh goes away while it is
// on its way; a reader waiting for the same call gets the new token, and the rotated grant is stored.
func TestRefreshOutlivesTheReaderWhoStartedIt(t *testing.T) {
	b, s := newUnitBackend(t)
	sv := newUnitStandin(t, b, s)
	g, _ := connectDueUser(t, b, s, sv, "driver")
	sv.SetLatency(500 * time.Millisecond)
	calls := sv.TokenRequests()
	ctx, leave := context.WithCancel(t.Context())
	first := make(chan error, 1)
	go func() {
		_, err := b.HandleRequest(ctx, &logical.Request{Operation: logical.ReadOperation, Path: "users/driver/token", Storage: s})
		first <- err
	}()
	eventually(t, 10*time.Second, "the first reader's refresh to reach the stand-in", func() bool { return sv.TokenRequests() > calls })
	second := make(chan string, 1)
	go func() {
		tok, _, err := readUserToken(t, b, s, "driver")
		if err != nil {
			t.Errorf("the second reader: %v", err)
		}
		second <- tok
	}()
	leave()
	<-first
	tok := <-second
	if tok == g.AccessToken || !sv.Active(tok) || sv.TokenRequests() != calls+1 {
		t.Fatalf("the second reader got no fresh token from the one refresh (%d calls)", sv.TokenRequests()-calls)
	}
	if stored, _ := getJSON[grant](t.Context(), s, userPrefix+"driver"); stored.AccessToken != tok {
		t.Fatal("the refresh of a reader who went away was not stored")
	}
}

// TestExpiredTokenIsRefreshedByAReadOnceItsNextAttemptComes: a token that expired while its refreshes
// failed has its next attempt stored past its expiry; once that attempt is due, a read sends it (no
// need to wait for the background refresh) and, with ev.energy back, gets a fresh token.
func TestExpiredTokenIsRefreshedByAReadOnceItsNextAttemptComes(t *testing.T) {
	b, s := newUnitBackend(t)
	sv := newUnitStandin(t, b, s)
	sv.SetTokenLifetime(30 * time.Second)
	g := connectUnitUser(t, b, s, sv, "driver")
	sv.SetTokenLifetime(10 * time.Hour)
	clock := useFakeClock(b, g.ExpiresAt.Add(time.Second))    // expired, and due
	b.tokens.refreshes.random = func() float64 { return 0.5 } // no spread
	sv.SetFault(standin.Fault{Kind: standin.FaultServerError})
	if _, _, err := readUserToken(t, b, s, "driver"); err == nil {
		t.Fatal("an expired token whose refresh failed gave a token")
	}
	at := storedRefreshAt(t, s, "driver")
	if !at.After(g.ExpiresAt) {
		t.Fatalf("the next attempt %v is not past the expiry %v", at, g.ExpiresAt)
	}
	if _, _, err := readUserToken(t, b, s, "driver"); err == nil {
		t.Fatal("a read before the next attempt gave a token")
	}
	sv.SetFault(standin.Fault{})
	clock.Set(at)
	calls := sv.TokenRequests()
	tok, lease, err := readUserToken(t, b, s, "driver")
	if err != nil || tok == g.AccessToken || !sv.Active(tok) || lease < readAhead {
		t.Fatalf("a read at the next attempt: error %v, a fresh live token %v, lease %v", err, err == nil && tok != g.AccessToken && sv.Active(tok), lease)
	}
	if n := sv.TokenRequests() - calls; n != 1 {
		t.Fatalf("the read sent %d refreshes, want 1", n)
	}
}

// TestDeleteLandingAsAFailedRefreshLandsForgetsItsFailures: why: a delete that takes the user's lock
// after a refresh ended in a passing failure, but before the flight's bookkeeping, found the flight
// in flight and kept the entry, which the flight then kept for a deleted user for the node's life.
// The delete lands inside the refresh function, after its failure is noted: the same interleaving.
func TestDeleteLandingAsAFailedRefreshLandsForgetsItsFailures(t *testing.T) {
	r := newRefreshes()
	const key = userPrefix + "driver"
	g := &grant{RefreshToken: "rt", ExpiresAt: time.Now().Add(time.Hour)}
	f, start, _ := r.join(key, g.RefreshToken, time.Now())
	if !start {
		t.Fatal("setup: the first join started no flight")
	}
	failure := errors.New("ev.energy failed the refresh with HTTP 500")
	r.fly(key, f, func() (*grant, error) {
		r.failed(key, g, failure)
		r.forget(key) // the delete, after the refresh released the lock and before fly takes r.mu
		return g, failure
	})
	if f.g != g || f.err != failure {
		t.Fatalf("the flight's readers got %v, %v; want the grant and its passing failure", f.g, f.err)
	}
	r.mu.Lock()
	defer r.mu.Unlock()
	if u, kept := r.byKey[key]; kept {
		t.Fatalf("the deleted user's refresh record is kept: %d failures, held until %v", u.failures, u.held.retryAt)
	}
}
