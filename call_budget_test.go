package evenergy

import (
	"context"
	"errors"
	"fmt"
	"net/http"
	"os"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/hashicorp/vault/sdk/logical"

	"github.com/evenergy/vault-plugin-secrets-evenergy/internal/standin"
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

// TestOutageBacklogKeepsToTheBudget, on a fake clock: 10,000 grants whose tokens expired while
// ev.energy is down. For 30 s of the outage and all the way through the recovery, ev.energy gets
// no more calls in any second than the call budget. Once it is back, 20 readers of grants not yet
// tried get their tokens first, within a second and a bit of the budget's pace, and every grant is
// refreshed within 10,000 / budget seconds plus 10.
func TestOutageBacklogKeepsToTheBudget(t *testing.T) {
	const grants, readers, budget, outage = 10000, 20, defaultCallBudget, 30 * time.Second
	step := time.Second / budget // one turn of the budget
	b, s := newUnitBackend(t)
	sv := newTestStandin()
	clock := useFakeClock(b, time.Now())
	b.budget.now, b.budget.after = clock.Now, clock.After
	start := clock.Now()
	var (
		down  atomic.Bool
		mu    sync.Mutex
		calls = map[int64]int{} // token requests by second of the fake clock since start
		total atomic.Int64
	)
	unitConfig(t, b, s, http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.URL.Path == "/o/token" {
			mu.Lock()
			calls[int64(clock.Now().Sub(start)/time.Second)]++
			mu.Unlock()
			total.Add(1)
			if down.Load() {
				http.Error(w, "Server Error (500)", http.StatusInternalServerError)
				return
			}
		}
		sv.ServeHTTP(w, r)
	}))
	seedGrants(t, b, s, sv, grants, start.Add(-time.Minute))
	seeded, _ := sv.Counts()
	down.Store(true)
	// The pass starts the background refresh; its first round outlasts the pass.
	if err := b.periodic(t.Context(), &logical.Request{Storage: s}); err != nil {
		t.Fatal(err)
	}

	// tick moves the clock by one turn once the call booked at the current one, if any, has reached
	// ev.energy, or once no refresh is under way, which could book it: every call is counted in
	// the second it was booked in. The budget's lock keeps a call from booking meanwhile.
	booked := int64(0) // seeding called no endpoint
	flying := func() (n int) {
		b.tokens.refreshes.mu.Lock()
		defer b.tokens.refreshes.mu.Unlock()
		for _, u := range b.tokens.refreshes.byKey {
			if u.flight != nil {
				n++
			}
		}
		return n
	}
	tick := func() {
		for deadline := time.Now().Add(30 * time.Second); ; time.Sleep(50 * time.Microsecond) {
			b.budget.mu.Lock()
			bookedNow, arrived := b.budget.next.After(clock.Now()), total.Load()
			if bookedNow && arrived > booked || !bookedNow && arrived == booked && flying() == 0 {
				booked = arrived
				clock.Advance(step)
				b.budget.mu.Unlock()
				return
			}
			b.budget.mu.Unlock()
			if time.Now().After(deadline) {
				t.Fatalf("at %v: booked %v, %d calls booked, %d arrived, %d refreshes under way", clock.Now().Sub(start), bookedNow, booked, arrived, flying())
			}
		}
	}
	for clock.Now().Sub(start) < outage {
		tick()
	}
	failed := total.Load()

	// ev.energy is back: readers of grants the outage did not reach wait for their tokens.
	down.Store(false)
	back := clock.Now()
	b.tokens.refreshes.mu.Lock()
	var readUsers []string
	for i := grants - 1; len(readUsers) < readers; i-- {
		if user := fmt.Sprintf("u%d", i); b.tokens.refreshes.byKey[userPrefix+user] == nil {
			readUsers = append(readUsers, user)
		}
	}
	b.tokens.refreshes.mu.Unlock()
	served := make(chan time.Duration, readers)
	for _, user := range readUsers {
		go func() {
			tok, _, err := readUserToken(t, b, s, user)
			if err != nil || !sv.Active(tok) {
				t.Errorf("the reader of %s got no live token: %v", user, err)
			}
			served <- clock.Now().Sub(back)
		}()
	}
	for issued, _ := sv.Counts(); issued < seeded+grants; issued, _ = sv.Counts() { // a refresh issues one access token
		if clock.Now().Sub(back) > grants/budget*time.Second+10*time.Second {
			t.Fatalf("%d of %d grants refreshed %v after ev.energy came back", issued-seeded, grants, clock.Now().Sub(back))
		}
		tick()
	}
	recovered := clock.Now().Sub(back)
	slowestReader := time.Duration(0)
	for range readers {
		slowestReader = max(slowestReader, <-served)
	}
	t.Logf("%d calls in %v of outage; every grant refreshed %v after ev.energy came back (ideal %v); the slowest of %d readers served after %v",
		failed, outage, recovered, grants/budget*time.Second, readers, slowestReader)
	if slowestReader > readers/budget*time.Second+time.Second {
		t.Errorf("a reader waited %v for a token after ev.energy came back: readers' refreshes did not go first", slowestReader)
	}
	for second, n := range calls {
		if n > budget {
			t.Errorf("ev.energy got %d calls in second %d, over the budget of %d", n, second, budget)
		}
	}
	if n := sv.RepeatedRefreshTokens(); n != 0 {
		t.Errorf("%d refresh tokens were sent again after a success", n)
	}
}

// TestAccReadersKeepTokensWhileMostRefreshesFail: on the dev Vault, 10 users with tokens of 120 s
// and refresh_window 60 s, 32 readers, while the stand-in fails 80% of refreshes (seeded) for 5
// minutes, under a call_budget of 4 a second. At least 95% of reads answer 200 with a token the
// stand-in holds live, no grant is lost, every user gets a working token within 10 s of the
// failures ending, and the stand-in never got more calls than the budget allows.
func TestAccReadersKeepTokensWhileMostRefreshesFail(t *testing.T) {
	t.Parallel()
	const users, readers, budget, faults, readEvery = 10, 32, 4, 5 * time.Minute, 250 * time.Millisecond
	e := newAccEnv(t)
	e.vault.SetMaxRetries(0)
	t.Cleanup(func() {
		if t.Failed() {
			if log, err := os.ReadFile(devVault.log); err == nil {
				t.Logf("Vault's log, the last 16 KiB:\n%s", log[max(0, len(log)-16<<10):])
			}
		}
	})
	e.write(t, "config", map[string]any{"refresh_window": "60s", "call_budget": budget})
	e.standin.SetTokenLifetime(120 * time.Second)
	for i := range users {
		e.connect(t, fmt.Sprintf("soak-%d", i))
	}
	userToken := func(user string) (string, error) {
		s, err := e.vault.Logical().Read(e.path("users/" + user + "/token"))
		if err != nil {
			return "", err
		}
		tok, _ := s.Data["access_token"].(string)
		if !e.standin.Active(tok) {
			return "", fmt.Errorf("the token of %s is not live at the stand-in", user)
		}
		return tok, nil
	}

	start, calls := time.Now(), e.standin.TokenRequests()
	e.standin.SetFault(standin.Fault{Kind: standin.FaultServerError, Share: 0.8, Seed: 19})
	end := start.Add(faults)
	overBudget := make(chan string, 1)
	go func() { // the calls so far never outrun the budget: one call at once, then one every 1/budget
		for time.Now().Before(end) {
			time.Sleep(time.Second)
			if n, allowed := e.standin.TokenRequests()-calls, int(time.Since(start).Seconds()*budget)+1; n > allowed {
				select {
				case overBudget <- fmt.Sprintf("%d calls in the first %v, over the budget's %d", n, time.Since(start).Round(time.Second), allowed):
				default:
				}
			}
		}
	}()
	var (
		wg         sync.WaitGroup
		reads, oks atomic.Int64
		firstErr   sync.Once
	)
	for r := range readers {
		wg.Go(func() {
			user := fmt.Sprintf("soak-%d", r%users)
			for n := 0; n < int(faults/readEvery) && time.Now().Before(end); n++ {
				reads.Add(1)
				if _, err := userToken(user); err != nil {
					firstErr.Do(func() { t.Logf("first failed read, %v in: %v", time.Since(start).Round(time.Second), err) })
				} else {
					oks.Add(1)
				}
				time.Sleep(readEvery) // a reader's pace
			}
		})
	}
	wg.Wait()
	e.standin.SetFault(standin.Fault{})
	recovered := time.Now()
	received := e.standin.TokenRequests() - calls
	t.Logf("%d of %d reads answered a live token (%.1f%%); the stand-in got %d token requests in %v",
		oks.Load(), reads.Load(), 100*float64(oks.Load())/float64(reads.Load()), received, time.Since(start).Round(time.Second))
	select {
	case msg := <-overBudget:
		t.Error(msg)
	default:
	}
	if float64(oks.Load()) < 0.95*float64(reads.Load()) {
		t.Errorf("%d of %d reads answered a live token, want at least 95%%", oks.Load(), reads.Load())
	}
	for i := range users {
		user := fmt.Sprintf("soak-%d", i)
		for {
			if _, err := userToken(user); err == nil {
				break
			} else if time.Since(recovered) > 10*time.Second {
				t.Errorf("%s has no working token 10 s after the failures ended: %v", user, err)
				break
			}
			time.Sleep(100 * time.Millisecond)
		}
		if s := e.read(t, "users/"+user); s.Data["status"] != grantActive {
			t.Errorf("the grant of %s is %v", user, s.Data["status"])
		}
	}
}
