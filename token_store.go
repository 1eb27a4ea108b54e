package evenergy

import (
	"context"
	"errors"
	"fmt"
	"maps"
	"slices"
	"strings"
	"time"

	"github.com/hashicorp/vault/sdk/logical"
	"golang.org/x/sync/errgroup"
)

// tokenStore is the one store of every token the engine holds and rotates: each user's grant, at
// users/<user>, and each shared role's token, at shared-tokens/<role>, both kept as a grant and both
// named by their storage key. Storage holds them seal-wrapped and is the truth; memory holds a copy
// of each (loaded at start, kept by the engine's writes, dropped by Invalidate), ordered by refresh
// point for the background refresh and counted by kind, client and status. The read paths and the
// background refresh reach held tokens through it alone.
type tokenStore struct {
	loadGuard
	loadingAll condMutex // held by a load of every token: a second one (the periodic pass's) does not wait for it

	tokens   map[string]*grant // by storage key, every held token once loaded; stale ones are read again
	tally    tokenTally        // the tokens in memory by kind, client and status
	stale    map[string]bool   // keys whose token changed underneath since it was cached
	unsaved  map[string]bool   // keys whose rotated token storage refused: only memory holds it
	loaded   bool              // tokens holds every stored token
	forgets  uint64            // how many times stale outgrew staleSlack and was forgotten with loaded
	schedule refreshSchedule   // the tokens by when they come due; built by the first periodic pass

	locks     keyedMutex // one refresh, mint, replacement or delete of a token at a time: ev.energy rotates refresh tokens
	refreshes *refreshes // beside the tokens, what only this node knows of their refreshes
}

// staleSlack bounds the keys a node keeps to read again beyond its cached tokens: a standby learns
// of deleted users only through Invalidate, and would otherwise keep their keys for good.
const staleSlack = 1024

// heldPrefixes are the storage prefixes of the held tokens.
var heldPrefixes = []string{userPrefix, sharedTokenPrefix}

func newTokenStore() *tokenStore {
	return &tokenStore{tokens: map[string]*grant{}, tally: tokenTally{}, stale: map[string]bool{}, unsaved: map[string]bool{}, refreshes: newRefreshes()}
}

// isHeld reports whether key is the storage key of a held token.
func isHeld(key string) bool {
	return strings.HasPrefix(key, userPrefix) || strings.HasPrefix(key, sharedTokenPrefix)
}

// lock serializes work on the token at key.
func (t *tokenStore) lock(key string) func() {
	return t.locks.lock(key)
}

// get returns the token at key (nil if none), from memory or else from storage.
func (t *tokenStore) get(ctx context.Context, s logical.Storage, key string) (*grant, error) {
	t.mu.RLock()
	g, cached := t.tokens[key]
	known := cached || (t.loaded && !t.stale[key])
	t.mu.RUnlock()
	if known {
		return g, nil
	}
	load := t.startLoad()
	defer load.end()
	g, err := getGrant(ctx, s, key)
	if err != nil {
		return nil, err
	}
	load.keep(key, func() { t.setLoaded(key, g) })
	return g, nil
}

// put stores the token at key and then keeps it in memory; nil deletes it.
func (t *tokenStore) put(ctx context.Context, s logical.Storage, key string, g *grant) error {
	var err error
	if g == nil {
		err = s.Delete(ctx, key)
	} else {
		err = putJSON(ctx, s, key, g)
	}
	t.mu.Lock()
	defer t.mu.Unlock()
	t.change(key) // a load that read storage before this write must not be kept
	switch {
	case err == nil:
		t.set(key, g)
		delete(t.unsaved, key)
		if g == nil {
			t.refreshes.forget(key) // a deleted token's failures in a row are nobody's now
		}
	case !t.unsaved[key]:
		// What storage holds now is unknown: read it again next time.
		t.drop(key)
	}
	return err
}

// rotatedWritePauses are the pauses before each new attempt to store a rotated token.
var rotatedWritePauses = []time.Duration{100 * time.Millisecond, 400 * time.Millisecond}

// putRotated stores a token whose refresh token ev.energy has just rotated. The stored one is dead
// then, so this one is never dropped: a refused write is tried again, and if storage still refuses,
// the token stays in memory marked unsaved, is served from there, and the periodic pass stores it;
// the error says so.
func (t *tokenStore) putRotated(ctx context.Context, s logical.Storage, key string, g *grant) error {
	err := putJSON(ctx, s, key, g)
	for _, pause := range rotatedWritePauses {
		if err == nil {
			break
		}
		time.Sleep(pause)
		err = putJSON(ctx, s, key, g)
	}
	t.mu.Lock()
	defer t.mu.Unlock()
	t.change(key)
	t.set(key, g)
	if err == nil {
		delete(t.unsaved, key)
	} else {
		t.unsaved[key] = true
	}
	return err
}

// storeUnsaved stores the rotated tokens that storage refused before, which until then live only in
// this node's memory. It skips a token whose lock someone holds (a refresh, a delete waiting on a
// revocation), as the periodic pass must not wait: a later pass stores it.
func (t *tokenStore) storeUnsaved(ctx context.Context, s logical.Storage) error {
	var errs []error
	for _, key := range t.unsavedKeys() {
		if err := t.storeOneUnsaved(ctx, s, key); err != nil {
			errs = append(errs, fmt.Errorf("storing the rotated token at %s: %w", key, err))
		}
	}
	return errors.Join(errs...)
}

// unsavedKeys are the keys of the tokens only memory holds.
func (t *tokenStore) unsavedKeys() []string {
	t.mu.RLock()
	defer t.mu.RUnlock()
	return slices.Collect(maps.Keys(t.unsaved))
}

func (t *tokenStore) storeOneUnsaved(ctx context.Context, s logical.Storage, key string) error {
	unlock, ok := t.locks.tryLock(key)
	if !ok {
		return nil
	}
	defer unlock()
	return t.storeUnsavedLocked(ctx, s, key)
}

// storeUnsavedLocked stores the token at key if only memory holds it; call it holding key's lock.
func (t *tokenStore) storeUnsavedLocked(ctx context.Context, s logical.Storage, key string) error {
	t.mu.RLock()
	g, unsaved := t.tokens[key], t.unsaved[key]
	t.mu.RUnlock()
	if !unsaved {
		return nil // stored meanwhile, by a refresh, a new authorization or a delete
	}
	return t.put(ctx, s, key, g)
}

// invalidate forgets the token at key, which storage changed underneath; it is read again when
// asked for. An unsaved token stays: storage holds its dead refresh token.
func (t *tokenStore) invalidate(key string) {
	if !isHeld(key) {
		return
	}
	t.mu.Lock()
	defer t.mu.Unlock()
	t.change(key)
	if !t.unsaved[key] {
		t.drop(key)
	}
	if len(t.stale) > staleSlack {
		// Mostly deleted users' keys: forget them all, and read storage for every key not in memory
		// until the next load of every token.
		clear(t.stale)
		t.loaded = false
		t.forgets++
	}
}

// set keeps g (nil: none) as the token at key; call it with mu held.
func (t *tokenStore) set(key string, g *grant) {
	delete(t.stale, key)
	old := t.tokens[key]
	if g == old {
		return // the same token stored again (an unsaved one): scheduled and counted already
	}
	t.tally.count(key, old, -1)
	t.tally.count(key, g, 1)
	if g == nil {
		delete(t.tokens, key)
		return
	}
	t.schedule.add(key, g)
	t.tokens[key] = g
}

// setLoaded keeps g, which a load read at key. A user storage holds no more (deleted on another
// node) has no refresh to hold back, so its refreshes' record goes; a shared role's stays, as it
// holds a failed first mint back. Call it with mu held.
func (t *tokenStore) setLoaded(key string, g *grant) {
	if g == nil && strings.HasPrefix(key, userPrefix) {
		t.refreshes.forget(key)
	}
	t.set(key, g)
}

// drop forgets the token at key, as what storage holds there is unknown: it is read again when
// asked for; call it with mu held.
func (t *tokenStore) drop(key string) {
	t.tally.count(key, t.tokens[key], -1)
	delete(t.tokens, key)
	t.stale[key] = true
}

// isLoaded reports whether memory holds every stored token, but for those invalidated since.
func (t *tokenStore) isLoaded() bool {
	t.mu.RLock()
	defer t.mu.RUnlock()
	return t.loaded
}

// errTokensLoading says that another load of every held token (the start-up load) is under way.
var errTokensLoading = errors.New("held tokens are still being loaded")

// loadAll reads every stored token into memory, at start and after invalidations. A token that
// changed while it ran is left to be read again.
func (t *tokenStore) loadAll(ctx context.Context, s logical.Storage) error {
	if !t.loadingAll.TryLock() {
		return errTokensLoading
	}
	defer t.loadingAll.Unlock()
	return t.loadAllLocked(ctx, s)
}

// loadAllLocked is loadAll for a caller that holds loadingAll.
func (t *tokenStore) loadAllLocked(ctx context.Context, s logical.Storage) error {
	load := t.startLoad()
	defer load.end()
	t.mu.RLock()
	keys := slices.Collect(maps.Keys(t.stale))
	loaded, forgets := t.loaded, t.forgets
	t.mu.RUnlock()

	if !loaded {
		// The stale keys are read beside the listed ones: a key listed no more is of a token
		// deleted since, whose mark its read (none) drops.
		stale := make(map[string]bool, len(keys))
		for _, key := range keys {
			stale[key] = true
		}
		for _, prefix := range heldPrefixes {
			names, err := s.List(ctx, prefix)
			if err != nil {
				return err
			}
			for _, name := range names {
				if key := prefix + name; !stale[key] {
					keys = append(keys, key)
				}
			}
		}
	}
	tokens, err := readTokens(ctx, s, keys)
	if err != nil {
		return err
	}
	t.mu.Lock()
	defer t.mu.Unlock()
	for i, key := range keys {
		if load.unchanged(key) && !t.unsaved[key] {
			t.setLoaded(key, tokens[i])
		}
	}
	// A token stored after the listing was invalidated, and so is stale: it is read when asked for;
	// unless stale was forgotten meanwhile.
	t.loaded = t.loaded || forgets == t.forgets
	return nil
}

// loadWorkers is how many tokens a load reads at once: each read is a round trip to Vault, and
// Vault's gRPC connection carries concurrent ones for less work each.
const loadWorkers = 64

// readTokens reads the tokens at keys from storage, in their order, loadWorkers at a time.
func readTokens(ctx context.Context, s logical.Storage, keys []string) ([]*grant, error) {
	tokens := make([]*grant, len(keys))
	reads, ctx := errgroup.WithContext(ctx)
	reads.SetLimit(loadWorkers)
	for i, key := range keys {
		reads.Go(func() (err error) {
			tokens[i], err = getGrant(ctx, s, key)
			return err
		})
	}
	return tokens, reads.Wait()
}

// due lists, from memory, the keys of the active tokens of cfg's client that reached their refresh
// point at now, the earliest first.
func (t *tokenStore) due(cfg *config, now time.Time) []string {
	t.mu.Lock()
	defer t.mu.Unlock()
	return t.schedule.due(t.tokens, cfg, now)
}

// walk calls fn with every token in memory under prefix, named without it, holding the store's
// read lock: fn must not call the store.
func (t *tokenStore) walk(prefix string, fn func(name string, g *grant)) {
	t.mu.RLock()
	defer t.mu.RUnlock()
	for key, g := range t.tokens {
		if name, ok := strings.CutPrefix(key, prefix); ok {
			fn(name, g)
		}
	}
}

// usersByStatus counts the users' grants in memory by status, for metrics; cfg nil: no config.
func (t *tokenStore) usersByStatus(cfg *config) map[string]int {
	t.mu.RLock()
	defer t.mu.RUnlock()
	return t.tally.usersByStatus(cfg)
}

// clients is the set of clients the tokens in memory were issued to.
func (t *tokenStore) clients() map[string]bool {
	t.mu.RLock()
	defer t.mu.RUnlock()
	return t.tally.clients()
}
