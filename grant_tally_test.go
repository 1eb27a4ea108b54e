package evenergy

import (
	"fmt"
	"maps"
	"math/rand/v2"
	"testing"
	"time"
)

// TestGrantTallyCountsWhatIsCached: while grants of several clients and statuses are cached,
// replaced, deleted, invalidated and cached again as they were, the tally's counts match a walk
// over every cached grant, for the configured client and for another.
func TestGrantTallyCountsWhatIsCached(t *testing.T) {
	rng := rand.New(rand.NewPCG(7, 7))
	now := time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC)
	c := newCache()
	for step := range 5000 {
		user := fmt.Sprintf("u%d", rng.IntN(40))
		c.mu.Lock()
		switch rng.IntN(4) {
		case 0:
			c.setGrant(user, randomGrant(rng, now))
		case 1:
			c.setGrant(user, nil)
		case 2:
			if g := c.grants[user]; g != nil {
				c.setGrant(user, g)
			}
		}
		c.mu.Unlock()
		if rng.IntN(4) == 3 {
			c.invalidate(userPrefix + user)
		}
		for _, cfg := range []*config{nil, {ClientID: "a"}, {ClientID: "b"}} {
			if got, want := c.tally.byStatus(cfg), walkByStatus(c, cfg); !maps.Equal(got, want) {
				t.Fatalf("step %d, config %v: the tally counts %v, the cached grants %v", step, cfg, got, want)
			}
		}
		clients := map[string]bool{}
		for _, g := range c.grants {
			clients[g.ClientID] = true
		}
		if got := maps.Collect(func(yield func(string, bool) bool) {
			for id := range c.tally {
				yield(id, true)
			}
		}); !maps.Equal(got, clients) {
			t.Fatalf("step %d: the tally holds clients %v, the cached grants %v", step, got, clients)
		}
	}
}

// walkByStatus counts every cached grant by status, as the metrics did before the tally.
func walkByStatus(c *cache, cfg *config) map[string]int {
	counts := map[string]int{grantActive: 0, grantRevoked: 0, grantOtherClient: 0}
	for _, g := range c.grants {
		if cfg != nil && g.ofOtherClient(cfg) {
			counts[grantOtherClient]++
		} else {
			counts[g.Status]++
		}
	}
	return counts
}
