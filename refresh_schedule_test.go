package evenergy

import (
	"fmt"
	"math/rand/v2"
	"slices"
	"testing"
	"time"
)

// TestRefreshScheduleListsEveryDueGrant: while users' grants and shared tokens are cached,
// replaced, deleted, invalidated, cached again as they were, the config changes and the clock moves
// (at times to a nanosecond of a refresh point), every pass lists exactly the keys a walk over every
// cached token finds due.
func TestRefreshScheduleListsEveryDueGrant(t *testing.T) {
	rng := rand.New(rand.NewPCG(13, 13))
	now := time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC)
	configs := []config{{ClientID: "a", RefreshWindow: 10 * time.Minute}, {ClientID: "a", RefreshWindow: time.Hour},
		{ClientID: "a"}, {ClientID: "b", RefreshWindow: 10 * time.Minute}}
	cfg := &configs[0]
	c := newTokenStore()
	passes, listed := 0, 0
	for range 5000 {
		key := fmt.Sprintf("%su%d", heldPrefixes[rng.IntN(2)], rng.IntN(40))
		switch rng.IntN(9) {
		case 0, 1: // a write, a refresh or a load caches a new grant
			c.mu.Lock()
			c.set(key, randomGrant(rng, now))
			c.mu.Unlock()
		case 2: // a delete
			c.mu.Lock()
			c.set(key, nil)
			c.mu.Unlock()
		case 3: // another node changed it
			c.invalidate(key)
		case 4: // stored again as it is, as an unsaved grant is
			c.mu.Lock()
			if g := c.tokens[key]; g != nil {
				c.set(key, g)
			}
			c.mu.Unlock()
		case 5: // the config is read again, changed or not
			next := configs[rng.IntN(len(configs))]
			cfg = &next
		case 6:
			now = now.Add(time.Duration(rng.Int64N(int64(20 * time.Minute))))
		case 7: // the clock stands at a refresh point, or a nanosecond before it
			c.mu.RLock()
			if g := c.tokens[key]; g != nil && g.refreshAt(cfg).After(now) {
				now = g.refreshAt(cfg).Add(-time.Duration(rng.IntN(2)))
			}
			c.mu.RUnlock()
		case 8:
			c.mu.Lock()
			got, want := c.schedule.due(c.tokens, cfg, now), walkDue(c, cfg, now)
			c.mu.Unlock()
			slices.Sort(got)
			if !slices.Equal(got, want) {
				t.Fatalf("pass %d at %v listed %v, want %v", passes, now, got, want)
			}
			passes, listed = passes+1, listed+len(got)
		}
	}
	t.Logf("%d passes listed %d due tokens", passes, listed)
}

// randomGrant is an active or revoked grant, of client a, client b or none recorded, whose token
// of 10 hours, 1 minute or unknown life expires within the next 11 hours or expired an hour ago,
// with a refresh point up to an hour before its expiry or, as grants stored before v0.4, none.
func randomGrant(rng *rand.Rand, now time.Time) *grant {
	g := &grant{ClientID: []string{"a", "a", "a", "b", ""}[rng.IntN(5)], Status: grantActive,
		ExpiresAt: now.Add(time.Duration(rng.Int64N(int64(12*time.Hour))) - time.Hour)}
	if rng.IntN(8) == 0 {
		g.Status = grantRevoked
	}
	if life := []time.Duration{tokenLifetime, time.Minute, 0}[rng.IntN(3)]; life > 0 {
		g.LastRefreshedAt = g.ExpiresAt.Add(-life)
	}
	if rng.IntN(2) == 0 {
		g.RefreshAt = g.ExpiresAt.Add(-time.Duration(rng.Int64N(int64(time.Hour))))
	}
	return g
}

// walkDue walks every cached token for the keys the background refresh refreshes, sorted.
func walkDue(c *tokenStore, cfg *config, now time.Time) []string {
	var keys []string
	for key, g := range c.tokens {
		if g.refreshable(cfg) && g.due(cfg, now) {
			keys = append(keys, key)
		}
	}
	slices.Sort(keys)
	return keys
}

// TestRefreshScheduleDropsReplacedGrants: a grant replaced many times before its window opens
// leaves no pile of entries behind once a pass has run.
func TestRefreshScheduleDropsReplacedGrants(t *testing.T) {
	cfg := &config{ClientID: "a", RefreshWindow: 10 * time.Minute}
	now := time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC)
	c := newTokenStore()
	c.mu.Lock()
	defer c.mu.Unlock()
	c.schedule.due(c.tokens, cfg, now)
	for range 100 {
		c.set(userPrefix+"driver", &grant{ClientID: "a", Status: grantActive, ExpiresAt: now.Add(tokenLifetime)})
	}
	c.schedule.due(c.tokens, cfg, now)
	if n := len(c.schedule.entries); n != 1 {
		t.Fatalf("one cached grant, replaced 100 times, left %d entries", n)
	}
}
