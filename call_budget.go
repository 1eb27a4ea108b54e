package evenergy

import (
	"context"
	"net/http"
	"sync"
	"time"

	"github.com/hashicorp/vault/sdk/logical"
)

// defaultCallBudget is how many calls a second a mount makes to ev.energy on one node for
// refreshes and revocations when the config's call_budget is 0.
const defaultCallBudget = 20

// maxCallBudget bounds call_budget where spacing calls no longer means anything.
const maxCallBudget = 10000

// The calls that wait for the budget, as metrics label them.
const (
	callRefresh    = "refresh"
	callRevocation = "revocation"
)

// callBudget spaces this node's calls to ev.energy for one mount's refreshes and revocations at
// least a second/call_budget apart, however many grants want one: after an outage, every grant
// whose token expired meanwhile would otherwise send its own retries. A call that a reader waits
// for goes first; the background pass's calls take the turns left.
type callBudget struct {
	now   func() time.Time                     // the budget's clock; tests set their own,
	after func(time.Duration) <-chan time.Time // with its timers

	mu      sync.Mutex
	next    time.Time      // when the next call may start
	urgent  int            // turns waiting that a reader waits for
	waiting map[string]int // turns waiting, by call
	closed  chan struct{}  // closed as the mount stops: no turn is given any more
}

// budgetTurn is one wait for the budget. A reader who comes to wait for a background call hurries it.
type budgetTurn struct {
	call    string    // callRefresh or callRevocation
	by      time.Time // the latest the turn may come; zero: within request_timeout
	urgent  bool
	waiting bool
}

func newCallBudget() *callBudget {
	return &callBudget{now: time.Now, after: time.After, waiting: map[string]int{callRefresh: 0, callRevocation: 0}, closed: make(chan struct{})}
}

// errNoTurn says that a call to ev.energy got no turn under the budget in time.
var errNoTurn = logical.CodedError(http.StatusServiceUnavailable,
	"the engine's calls to ev.energy are at the config's call_budget and none was free in time: retry shortly")

// errBudgetClosed says that the mount is stopping on this node: no call to ev.energy starts any more.
var errBudgetClosed = logical.CodedError(http.StatusServiceUnavailable, "the mount is stopping on this node: retry shortly")

// take waits until the turn's calls to ev.energy may start, at perSecond calls a second, and books
// them; it fails when ctx ends or the mount stops first.
func (c *callBudget) take(ctx context.Context, perSecond, calls int, t *budgetTurn) error {
	interval := time.Second / time.Duration(perSecond)
	c.mu.Lock()
	defer c.mu.Unlock()
	c.wait(t, true)
	defer c.wait(t, false)
	for {
		select {
		case <-c.closed:
			return errBudgetClosed
		default:
		}
		now := c.now()
		if !now.Before(c.next) && (t.urgent || c.urgent == 0) {
			c.next = now.Add(time.Duration(calls) * interval)
			return nil
		}
		pause := c.next.Sub(now)
		if pause <= 0 { // free, but a reader's call goes first
			pause = interval
		}
		timer := c.after(pause)
		c.mu.Unlock()
		select {
		case <-timer:
		case <-ctx.Done():
			c.mu.Lock()
			return ctx.Err()
		case <-c.closed:
		}
		c.mu.Lock()
	}
}

// wait counts t as waiting, or no more; call it with mu held.
func (c *callBudget) wait(t *budgetTurn, waiting bool) {
	step := 1
	if !waiting {
		step = -1
	}
	t.waiting = waiting
	c.waiting[t.call] += step
	if t.urgent {
		c.urgent += step
	}
}

// hurry makes t a call that a reader waits for, which goes before the background pass's.
func (c *callBudget) hurry(t *budgetTurn) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if !t.urgent && t.waiting {
		c.urgent++
	}
	t.urgent = true
}

// close gives no turn any more, to waiting calls or new ones: the mount is stopping.
func (c *callBudget) close() {
	c.mu.Lock()
	defer c.mu.Unlock()
	select {
	case <-c.closed:
	default:
		close(c.closed)
	}
}

// waitingByCall counts the turns waiting by call, for metrics.
func (c *callBudget) waitingByCall() map[string]int {
	c.mu.Lock()
	defer c.mu.Unlock()
	counts := make(map[string]int, len(c.waiting))
	for call, n := range c.waiting {
		counts[call] = n
	}
	return counts
}

// awaitTurn waits, until t.by or within request_timeout, for the budget to let calls calls to
// ev.energy start.
func (b *backend) awaitTurn(ctx context.Context, cfg *config, calls int, t *budgetTurn) error {
	by := t.by
	if by.IsZero() {
		by = time.Now().Add(cfg.RequestTimeout)
	}
	timed, cancel := context.WithDeadline(ctx, by)
	defer cancel()
	err := b.budget.take(timed, cfg.callsPerSecond(), calls, t)
	if err != nil && ctx.Err() == nil && timed.Err() != nil {
		return errNoTurn
	}
	return err
}
