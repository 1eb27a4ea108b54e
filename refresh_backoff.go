package evenergy

import (
	"context"
	"errors"
	"fmt"
	"math/rand/v2"
	"net/http"
	"sync"
	"time"

	"github.com/hashicorp/vault/sdk/logical"
)

// A failed refresh holds the next attempt back 1 s, doubling with each failure in a row up to a
// minute. A token near its end cannot wait that long: the wait is at most a quarter of what is
// left of it, down to 3 s, the pace once its readers are refused. Each wait is spread by ±20%, so
// that grants which failed together do not retry together.
const (
	firstBackoff   = time.Second
	maxBackoff     = time.Minute
	refusedBackoff = 3 * time.Second
	backoffJitter  = 0.2
)

// refreshes is what this node alone knows of the refreshes of its held tokens, in memory only: the
// refresh call in flight per token, whose outcome every reader arriving meanwhile waits for instead
// of sending its own, and the failures in a row of a token's refresh token, which set the next
// attempt. The token stores that attempt as its refresh point; the failure holds attempts back here
// too, in case storage refused it.
type refreshes struct {
	now       func() time.Time                             // the clock of refresh points, backoff and leases; tests set their own
	waitUntil func(ctx context.Context, t time.Time) error // waits until now reaches t, or ctx ends; tests set their own
	random    func() float64                               // uniform in [0, 1), spreads the backoff; tests set their own
	mu        sync.Mutex
	byKey     map[string]*grantRefresh // held tokens with a refresh in flight or failures, by storage key; others have none
}

// grantRefresh is the refresh call in flight for one held token, if any, and the failures before it.
type grantRefresh struct {
	flight   *flight
	token    string // the refresh token that failed: a grant with another one starts afresh
	failures int
	held     *heldBack
}

// heldBack is the last failure of a refresh, holding the next attempt back until retryAt.
type heldBack struct {
	retryAt time.Time
	err     error
}

// flight is one refresh call, and its turn under the call budget. Its outcome, set before done is
// closed, is refresh's: the refreshed grant; or after a passing failure the grant and the failure;
// or err alone, with no token to give.
type flight struct {
	done chan struct{}
	turn *budgetTurn
	g    *grant
	err  error
}

func newRefreshes() *refreshes {
	return &refreshes{now: time.Now, waitUntil: sleepUntil, random: rand.Float64, byKey: map[string]*grantRefresh{}}
}

// sleepUntil waits until the wall clock reaches t, or ctx ends.
func sleepUntil(ctx context.Context, t time.Time) error {
	timer := time.NewTimer(time.Until(t))
	defer timer.Stop()
	select {
	case <-timer.C:
		return nil
	case <-ctx.Done():
		return ctx.Err()
	}
}

// join returns the refresh in flight for the held token at key, whose refresh token is token; or a new
// flight, which the caller must fly (start); or, while a failure of that token holds attempts
// back, no flight but the failure.
func (r *refreshes) join(key, token string, now time.Time) (f *flight, start bool, held *heldBack) {
	r.mu.Lock()
	defer r.mu.Unlock()
	u := r.byKey[key]
	switch {
	case u == nil:
		u = &grantRefresh{}
		r.byKey[key] = u
	case u.flight != nil:
		return u.flight, false, nil
	case u.token == token && u.held != nil && now.Before(u.held.retryAt):
		return nil, false, u.held
	}
	u.flight = &flight{done: make(chan struct{}), turn: &budgetTurn{call: callRefresh}}
	return u.flight, true, nil
}

// fly runs refresh as the flight f and hands its outcome to every reader waiting for it. refresh
// returns the refreshed grant; or the grant and a passing failure, which it noted with failed; or
// no grant and the error that leaves no token to give.
func (r *refreshes) fly(key string, f *flight, refresh func() (*grant, error)) {
	defer close(f.done)
	f.g, f.err = refresh()
	r.mu.Lock()
	defer r.mu.Unlock()
	if f.g == nil || f.err == nil {
		delete(r.byKey, key) // refreshed, or nothing more to try: no failures to remember
		return
	}
	r.byKey[key].flight = nil
}

// forget drops what is known of the refreshes of the held token at key, which is gone; a flight in
// flight drops it as it lands.
func (r *refreshes) forget(key string) {
	r.mu.Lock()
	defer r.mu.Unlock()
	if u := r.byKey[key]; u != nil && u.flight == nil {
		delete(r.byKey, key)
	}
}

// failed notes a passing failure of the refresh of the held token g at key, in flight, and returns when
// the next attempt may go: after backoff, never more than maxBackoff away, nor past the token's
// expiry while it lives.
func (r *refreshes) failed(key string, g *grant, err error) time.Time {
	r.mu.Lock()
	defer r.mu.Unlock()
	u := r.byKey[key]
	if u.token != g.RefreshToken {
		u.token, u.failures = g.RefreshToken, 0
	}
	u.failures++
	now := r.now()
	retryAt := now.Add(backoff(u.failures, g.ExpiresAt.Sub(now), retryAfterOf(err), r.random()))
	if now.Before(g.ExpiresAt) && g.ExpiresAt.Before(retryAt) {
		retryAt = g.ExpiresAt
	}
	u.held = &heldBack{retryAt: retryAt, err: err}
	return retryAt
}

// backoff is how long a refresh waits after its nth failure in a row, with left of its token's
// life remaining, ev.energy's Retry-After (0 when it sent none) and random, uniform in [0, 1).
func backoff(failures int, left, retryAfter time.Duration, random float64) time.Duration {
	wait := min(firstBackoff<<min(failures-1, 6), maxBackoff, max(left/4, refusedBackoff))
	wait = time.Duration(float64(wait) * (1 - backoffJitter + 2*backoffJitter*random))
	// Retry-After is honoured up to maxBackoff, and never past the token's expiry: one of hours (a
	// proxy's) must not leave readers with an expired token while ev.energy answers again.
	return max(wait, min(retryAfter, maxBackoff, left))
}

// retryAfterOf is how long ev.energy asked a refresh that failed with err to wait; 0 when it did not.
func retryAfterOf(err error) time.Duration {
	var upstream *upstreamError
	if errors.As(err, &upstream) {
		return upstream.RetryAfter
	}
	return 0
}

// lastFailure says why the last refresh of the grant whose refresh token is token failed; "" when
// it has not failed since it was last refreshed (on this node).
func (r *refreshes) lastFailure(key, token string) string {
	if err := r.heldBy(key, token); err != nil {
		return err.Error()
	}
	return ""
}

// heldBy is the last failure of the refresh of the grant whose refresh token is token, if it
// failed since it was last refreshed (on this node).
func (r *refreshes) heldBy(key, token string) error {
	r.mu.Lock()
	defer r.mu.Unlock()
	if u := r.byKey[key]; u != nil && u.token == token && u.held != nil {
		return u.held.err
	}
	return nil
}

// failure is why the held token g, which expired before its next refresh attempt at retryAt, has
// no token to give: the refresh's last failure, if this node saw it.
func (r *refreshes) failure(t heldToken, g *grant, retryAt time.Time) error {
	if err := r.heldBy(t.key(), g.RefreshToken); err != nil {
		return err
	}
	return logical.CodedError(http.StatusBadGateway, fmt.Sprintf("the access token of %s expired and ev.energy did not refresh it: the next attempt is at %s", t.describe(), retryAt.UTC().Format(time.RFC3339)))
}
