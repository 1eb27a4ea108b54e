package evenergy

import (
	"errors"
	"math/rand/v2"
	"sync"
	"time"
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

// refreshes is what this node alone knows of its users' refreshes, in memory only: the refresh call
// in flight per grant, whose outcome every reader arriving meanwhile waits for instead of sending
// its own, and the failures of a grant's refresh token, which hold the next attempt back. A failure
// writes nothing to storage.
type refreshes struct {
	now    func() time.Time // the clock of due dates, backoff, leases and unconfirmed grants; tests set their own
	random func() float64   // uniform in [0, 1), spreads the backoff; tests set their own
	mu     sync.Mutex
	users  map[string]*grantRefresh // users with a refresh in flight or failures; others have none
}

// grantRefresh is the refresh call in flight for one user's grant, if any, and the failures before it.
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

// flight is one refresh call, and its turn under the call budget. Its outcome, set before done
// is closed: the refreshed grant; or after a passing failure the unchanged grant and held; or err
// alone, with no token to give.
type flight struct {
	done chan struct{}
	turn *budgetTurn
	g    *grant
	held *heldBack
	err  error
}

func newRefreshes() *refreshes {
	return &refreshes{now: time.Now, random: rand.Float64, users: map[string]*grantRefresh{}}
}

// join returns the refresh in flight for the user's grant, whose refresh token is token; or a new
// flight, which the caller must fly (start); or, while a failure of that token holds attempts
// back, no flight but the failure.
func (r *refreshes) join(user, token string, now time.Time) (f *flight, start bool, held *heldBack) {
	r.mu.Lock()
	defer r.mu.Unlock()
	u := r.users[user]
	switch {
	case u == nil:
		u = &grantRefresh{}
		r.users[user] = u
	case u.flight != nil:
		return u.flight, false, nil
	case u.token == token && u.held != nil && now.Before(u.held.retryAt):
		return nil, false, u.held
	}
	u.flight = &flight{done: make(chan struct{}), turn: &budgetTurn{call: callRefresh}}
	return u.flight, true, nil
}

// fly runs refresh as the flight f and hands its outcome to every reader waiting for it. refresh
// returns the refreshed grant; or the unchanged grant and a passing failure, which holds the next
// attempt back; or no grant and the error that leaves no token to give.
func (r *refreshes) fly(user string, f *flight, refresh func() (*grant, error)) {
	defer close(f.done)
	g, err := refresh()
	r.mu.Lock()
	defer r.mu.Unlock()
	if g == nil || err == nil {
		f.g, f.err = g, err
		delete(r.users, user) // refreshed, or nothing more to try: no failures to remember
		return
	}
	u := r.users[user]
	if u.token != g.RefreshToken {
		u.token, u.failures = g.RefreshToken, 0
	}
	u.failures++
	now := r.now()
	u.held = &heldBack{retryAt: now.Add(backoff(u.failures, g.ExpiresAt.Sub(now), retryAfterOf(err), r.random())), err: err}
	u.flight, f.g, f.held = nil, g, u.held
}

// backoff is how long a refresh waits after its nth failure in a row, with left of its token's
// life remaining, ev.energy's Retry-After (0 when it sent none) and random, uniform in [0, 1).
func backoff(failures int, left, retryAfter time.Duration, random float64) time.Duration {
	wait := min(firstBackoff<<min(failures-1, 6), maxBackoff, max(left/4, refusedBackoff))
	wait = time.Duration(float64(wait) * (1 - backoffJitter + 2*backoffJitter*random))
	// Retry-After is honoured up to maxBackoff, and never past the token's expiry.
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
func (r *refreshes) lastFailure(user, token string) string {
	r.mu.Lock()
	defer r.mu.Unlock()
	if u := r.users[user]; u != nil && u.token == token && u.held != nil {
		return u.held.err.Error()
	}
	return ""
}

// heldLease is how long a reader may keep g's still-valid token while a failed refresh holds the
// next attempt back: until that attempt (rounded up to a second), at least readAhead, never past
// the token's expiry. With less than readAhead of the token left, the reader gets the failure.
func (g *grant) heldLease(held *heldBack, now time.Time) (*grant, time.Duration, error) {
	left := g.ExpiresAt.Sub(now).Truncate(time.Second)
	if left < readAhead {
		return nil, 0, held.err
	}
	untilRetry := (held.retryAt.Sub(now) + time.Second - 1).Truncate(time.Second)
	return g, min(max(untilRetry, readAhead), left), nil
}
