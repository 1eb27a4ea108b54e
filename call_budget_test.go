package evenergy

import (
	"context"
	"errors"
	"testing"
	"time"
)

// budgetOnFakeClock is a call budget whose clock and timers are the fake clock it returns.
func budgetOnFakeClock() (*callBudget, *fakeClock) {
	clock := &fakeClock{now: time.Unix(1_700_000_000, 0)}
	c := newCallBudget()
	c.now, c.after = clock.Now, clock.After
	return c, clock
}

// takeAsync takes a turn in a goroutine and sends when it came, on the budget's clock, or its error.
func takeAsync(ctx context.Context, c *callBudget, clock *fakeClock, calls int, t *budgetTurn) <-chan any {
	out := make(chan any, 1)
	go func() {
		if err := c.take(ctx, 10, calls, t); err != nil {
			out <- err
			return
		}
		out <- clock.Now()
	}()
	return out
}

// waitingTurns waits until n turns wait for the budget.
func waitingTurns(t *testing.T, c *callBudget, n int) {
	t.Helper()
	eventually(t, 10*time.Second, "turns to wait for the budget", func() bool {
		w := c.waitingByCall()
		return w[callRefresh]+w[callRevocation] == n
	})
}

// TestCallBudgetSpacesCalls: at 10 calls a second, the first call goes at once and each next one
// 100 ms after the one before, a revocation of two tokens counting twice.
func TestCallBudgetSpacesCalls(t *testing.T) {
	c, clock := budgetOnFakeClock()
	start := clock.Now()
	if err := c.take(t.Context(), 10, 1, &budgetTurn{call: callRefresh}); err != nil {
		t.Fatal(err)
	}
	second := takeAsync(t.Context(), c, clock, 2, &budgetTurn{call: callRevocation})
	waitingTurns(t, c, 1)
	clock.Advance(99 * time.Millisecond)
	waitingTurns(t, c, 1) // still waiting: its timer has not fired
	clock.Advance(time.Millisecond)
	if at := <-second; at != start.Add(100*time.Millisecond) {
		t.Fatalf("the second call went at %v, want 100 ms after the first", at)
	}
	third := takeAsync(t.Context(), c, clock, 1, &budgetTurn{call: callRefresh})
	waitingTurns(t, c, 1)
	clock.Advance(100 * time.Millisecond)
	waitingTurns(t, c, 1) // the revocation's two calls take 200 ms of the budget
	clock.Advance(100 * time.Millisecond)
	if at := <-third; at != start.Add(300*time.Millisecond) {
		t.Fatalf("the call after a revocation of two tokens went at %v, want 200 ms after it", at)
	}
}

// TestCallBudgetServesReadersFirst: with a background call waiting, a reader's call and a
// background call that a reader came to wait for (hurried) both go before it.
func TestCallBudgetServesReadersFirst(t *testing.T) {
	c, clock := budgetOnFakeClock()
	if err := c.take(t.Context(), 10, 1, &budgetTurn{call: callRefresh}); err != nil {
		t.Fatal(err)
	}
	background := takeAsync(t.Context(), c, clock, 1, &budgetTurn{call: callRefresh})
	waitingTurns(t, c, 1)
	hurried := &budgetTurn{call: callRefresh}
	joined := takeAsync(t.Context(), c, clock, 1, hurried)
	waitingTurns(t, c, 2)
	reader := takeAsync(t.Context(), c, clock, 1, &budgetTurn{call: callRefresh, urgent: true})
	waitingTurns(t, c, 3)
	c.hurry(hurried)

	var order []string
	for len(order) < 3 {
		clock.Advance(100 * time.Millisecond)
		select {
		case <-background:
			order = append(order, "background")
		case <-joined:
			order = append(order, "hurried")
		case <-reader:
			order = append(order, "reader")
		}
		waitingTurns(t, c, 3-len(order))
	}
	if order[2] != "background" {
		t.Fatalf("the calls went in the order %v; the background call must go last", order)
	}
	if n := c.waitingByCall()[callRefresh]; n != 0 || c.urgent != 0 {
		t.Fatalf("after every turn came, %d refreshes and %d urgent turns are counted as waiting", n, c.urgent)
	}
}

// TestCallBudgetGivesUp: a turn whose context ends gets its error and no longer counts as
// waiting; once the mount stops, waiting and new turns get errBudgetClosed.
func TestCallBudgetGivesUp(t *testing.T) {
	c, clock := budgetOnFakeClock()
	if err := c.take(t.Context(), 10, 1, &budgetTurn{call: callRefresh}); err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(t.Context())
	gone := takeAsync(ctx, c, clock, 1, &budgetTurn{call: callRevocation, urgent: true})
	waitingTurns(t, c, 1)
	cancel()
	if err, _ := (<-gone).(error); !errors.Is(err, context.Canceled) || c.urgent != 0 {
		t.Fatalf("a turn whose context ended: %v, %d urgent turns left", err, c.urgent)
	}
	waiting := takeAsync(t.Context(), c, clock, 1, &budgetTurn{call: callRefresh})
	waitingTurns(t, c, 1)
	c.close()
	if err, _ := (<-waiting).(error); err != errBudgetClosed {
		t.Fatalf("a waiting turn as the mount stops: %v", err)
	}
	clock.Advance(time.Hour)
	if err := c.take(t.Context(), 10, 1, &budgetTurn{call: callRefresh}); err != errBudgetClosed {
		t.Fatalf("a new turn once the mount stopped: %v", err)
	}
}
