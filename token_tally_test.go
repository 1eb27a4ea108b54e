package evenergy

import (
	"fmt"
	"maps"
	"math/rand/v2"
	"strings"
	"testing"
	"time"
)

// TestTokenTallyCountsWhatIsCached: while users' grants and shared tokens of several clients and
// statuses are cached, replaced, deleted, invalidated and cached again as they were, the tally's
// counts match a walk over every cached token, for the configured client and for another.
func TestTokenTallyCountsWhatIsCached(t *testing.T) {
	rng := rand.New(rand.NewPCG(7, 7))
	now := time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC)
	store := newTokenStore()
	for step := range 5000 {
		key := fmt.Sprintf("%su%d", heldPrefixes[rng.IntN(2)], rng.IntN(40))
		store.mu.Lock()
		switch rng.IntN(4) {
		case 0:
			store.set(key, randomGrant(rng, now))
		case 1:
			store.set(key, nil)
		case 2:
			if g := store.tokens[key]; g != nil {
				store.set(key, g)
			}
		}
		store.mu.Unlock()
		if rng.IntN(4) == 3 {
			store.invalidate(key)
		}
		for _, cfg := range []*config{nil, {ClientID: "a"}, {ClientID: "b"}} {
			if got, want := store.usersByStatus(cfg), walkUsersByStatus(store, cfg); !maps.Equal(got, want) {
				t.Fatalf("step %d, config %v: the tally counts %v, the cached grants %v", step, cfg, got, want)
			}
		}
		clients := map[string]bool{}
		for _, g := range store.tokens {
			clients[g.ClientID] = true
		}
		if got := store.clients(); !maps.Equal(got, clients) {
			t.Fatalf("step %d: the tally holds clients %v, the cached tokens %v", step, got, clients)
		}
	}
}

// walkUsersByStatus counts every cached user grant by status, as the metrics did before the tally.
func walkUsersByStatus(store *tokenStore, cfg *config) map[string]int {
	counts := map[string]int{grantActive: 0, grantRevoked: 0, grantOtherClient: 0}
	for key, g := range store.tokens {
		switch {
		case !strings.HasPrefix(key, userPrefix):
		case cfg != nil && g.ofOtherClient(cfg):
			counts[grantOtherClient]++
		default:
			counts[g.Status]++
		}
	}
	return counts
}
