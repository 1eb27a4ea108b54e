package evenergy

import (
	"context"
	"errors"
	"strings"
	"sync"
	"time"

	"github.com/hashicorp/vault/sdk/logical"
	"golang.org/x/sync/errgroup"
)

// cache keeps what the hot paths read (the config with its client, roles, users' grants and when
// the next pending authorization expires) in memory. It is only a copy of storage: the engine's own
// writes update it, Invalidate drops what storage changed underneath (replication, another node),
// and it is loaded anew at start. Cached values are never changed in place, only replaced.
type cache struct {
	mu         sync.RWMutex
	loadingAll sync.Mutex // held by a load of every grant: a second one (the periodic pass's) does not wait for it
	// A load keeps only what did not change while it read storage: clock counts changes (the
	// engine's own writes and invalidations), and changed notes when each key last changed while a
	// load was running.
	clock   uint64
	changed map[string]uint64
	loading int // loads in progress; once none is, earlier changes matter to no load

	configured *configured
	roles      map[string]*role
	grants     map[string]*grant // every user's grant once loaded; stale users are reloaded
	tally      grantTally        // the cached grants by client and status
	stale      map[string]bool   // users whose grant changed underneath since it was cached
	unsaved    map[string]bool   // users whose rotated grant storage refused: only memory holds it
	loaded     bool              // grants holds every stored grant
	schedule   refreshSchedule   // the grants by when they come due; built by the first periodic pass

	// pendingDue is when the earliest pending authorization stored expires, as far as known: zero (at
	// start, after an invalidation of an entry of earlier versions) sweeps at the next pass.
	pendingDue   time.Time
	pendingSweep *pendingSweep // a sweep that ran out of time, which the next pass goes on with

	refreshes *refreshes // beside the grants, what only this node knows of their refreshes
}

// configured is the config and the ev.energy client made from it, reused until the config changes.
type configured struct {
	cfg    *config
	client *evenergyClient
}

func newCache() *cache {
	return &cache{changed: map[string]uint64{}, roles: map[string]*role{}, grants: map[string]*grant{}, tally: grantTally{}, stale: map[string]bool{},
		unsaved: map[string]bool{}, refreshes: newRefreshes()}
}

// invalidate forgets what storage changed at key.
func (c *cache) invalidate(key string) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.change(key)
	switch {
	case key == configPath:
		if c.configured != nil {
			c.configured.client.close()
		}
		c.configured = nil
	case strings.HasPrefix(key, rolePrefix):
		delete(c.roles, strings.TrimPrefix(key, rolePrefix))
	case strings.HasPrefix(key, userPrefix):
		if user := strings.TrimPrefix(key, userPrefix); !c.unsaved[user] { // storage holds a dead refresh token of an unsaved one
			c.dropGrant(user)
		}
	case strings.HasPrefix(key, authRequestPrefix):
		c.notePendingKey(key) // made or used on another node
	}
}

// change notes that storage changed at key, so that no load running now keeps what it read there;
// call it with mu held.
func (c *cache) change(key string) {
	c.clock++
	if c.loading > 0 {
		c.changed[key] = c.clock
	}
}

// load is one read of storage into the cache.
type load struct {
	c     *cache
	start uint64
}

// startLoad begins a load; end it with end once it kept what it read.
func (c *cache) startLoad() *load {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.loading++
	return &load{c: c, start: c.clock}
}

func (l *load) end() {
	l.c.mu.Lock()
	defer l.c.mu.Unlock()
	if l.c.loading--; l.c.loading == 0 {
		clear(l.c.changed)
	}
}

// unchanged reports whether storage did not change at key since the load began; call it with mu held.
func (l *load) unchanged(key string) bool {
	return l.c.changed[key] <= l.start
}

// keep runs store, which caches what the load read at key, unless key changed since the load began.
func (l *load) keep(key string, store func()) {
	l.c.mu.Lock()
	defer l.c.mu.Unlock()
	if l.unchanged(key) {
		store()
	}
}

// config returns the config and its client, from memory or else from storage.
func (b *backend) config(ctx context.Context, s logical.Storage) (*config, *evenergyClient, error) {
	b.cache.mu.RLock()
	current := b.cache.configured
	b.cache.mu.RUnlock()
	if current != nil {
		return current.cfg, current.client, nil
	}
	load := b.cache.startLoad()
	defer load.end()
	cfg, err := getConfig(ctx, s)
	if err != nil {
		return nil, nil, err
	}
	current = &configured{cfg: cfg, client: newClient(cfg, b.metrics)}
	load.keep(configPath, func() { b.cache.configured = current })
	return current.cfg, current.client, nil
}

// role returns the named role, from memory or else from storage.
func (b *backend) role(ctx context.Context, s logical.Storage, name string) (*role, error) {
	b.cache.mu.RLock()
	r := b.cache.roles[name]
	b.cache.mu.RUnlock()
	if r != nil {
		return r, nil
	}
	load := b.cache.startLoad()
	defer load.end()
	r, err := getRole(ctx, s, name)
	if err != nil {
		return nil, err
	}
	load.keep(rolePrefix+name, func() { b.cache.roles[name] = r })
	return r, nil
}

// grant returns the user's grant (nil if none), from memory or else from storage.
func (b *backend) grant(ctx context.Context, s logical.Storage, user string) (*grant, error) {
	b.cache.mu.RLock()
	g, cached := b.cache.grants[user]
	known := cached || (b.cache.loaded && !b.cache.stale[user])
	b.cache.mu.RUnlock()
	if known {
		return g, nil
	}
	load := b.cache.startLoad()
	defer load.end()
	g, err := getGrant(ctx, s, user)
	if err != nil {
		return nil, err
	}
	load.keep(userPrefix+user, func() { b.cache.setGrant(user, g) })
	return g, nil
}

// putGrant stores the user's grant and then caches it; nil deletes it.
func (b *backend) putGrant(ctx context.Context, s logical.Storage, user string, g *grant) error {
	var err error
	if g == nil {
		err = s.Delete(ctx, userPrefix+user)
	} else {
		err = putJSON(ctx, s, userPrefix+user, g)
	}
	b.cache.mu.Lock()
	defer b.cache.mu.Unlock()
	b.cache.change(userPrefix + user) // a load that read storage before this write must not be kept
	switch {
	case err == nil:
		b.cache.setGrant(user, g)
		delete(b.cache.unsaved, user)
	case !b.cache.unsaved[user]:
		// What storage holds now is unknown: read it again next time.
		b.cache.dropGrant(user)
	}
	return err
}

// rotatedWritePauses are the pauses before each new attempt to store a rotated grant.
var rotatedWritePauses = []time.Duration{100 * time.Millisecond, 400 * time.Millisecond}

// putRotatedGrant stores a grant whose refresh token ev.energy has just rotated. The stored token is
// dead then, so this grant is never dropped: a refused write is tried again, and if storage still
// refuses, the grant stays in memory marked unsaved, is served from there, and the periodic pass
// stores it.
func (b *backend) putRotatedGrant(ctx context.Context, s logical.Storage, user string, g *grant) {
	err := putJSON(ctx, s, userPrefix+user, g)
	for _, pause := range rotatedWritePauses {
		if err == nil {
			break
		}
		time.Sleep(pause)
		err = putJSON(ctx, s, userPrefix+user, g)
	}
	b.cache.mu.Lock()
	b.cache.change(userPrefix + user)
	b.cache.setGrant(user, g)
	if err == nil {
		delete(b.cache.unsaved, user)
	} else {
		b.cache.unsaved[user] = true
	}
	b.cache.mu.Unlock()
	if err != nil {
		b.Logger().Error("storage refused a user's rotated ev.energy grant, which only this node's memory now holds: the periodic pass stores it once storage accepts writes", "user", user, "error", err)
	}
}

// setGrant caches g (nil: the user has none); call it with mu held.
func (c *cache) setGrant(user string, g *grant) {
	delete(c.stale, user)
	old := c.grants[user]
	if g == old {
		return // the same grant stored again (an unsaved one): scheduled and counted already
	}
	c.tally.count(old, -1)
	c.tally.count(g, 1)
	if g == nil {
		delete(c.grants, user)
		return
	}
	c.schedule.add(user, g)
	c.grants[user] = g
}

// dropGrant forgets the user's cached grant, as what storage holds for the user is unknown: it is
// read again when asked for; call it with mu held.
func (c *cache) dropGrant(user string) {
	c.tally.count(c.grants[user], -1)
	delete(c.grants, user)
	c.stale[user] = true
}

// errGrantsLoading says that another load of every grant (the start-up load) is under way.
var errGrantsLoading = errors.New("users' grants are still being loaded")

// loadGrants reads every stored grant into memory, at start and after invalidations. A grant that
// changed while it ran is left to be read again.
func (b *backend) loadGrants(ctx context.Context, s logical.Storage) error {
	if !b.cache.loadingAll.TryLock() {
		return errGrantsLoading
	}
	defer b.cache.loadingAll.Unlock()
	return b.loadGrantsLocked(ctx, s)
}

// loadGrantsLocked is loadGrants for a caller that holds loadingAll.
func (b *backend) loadGrantsLocked(ctx context.Context, s logical.Storage) error {
	load := b.cache.startLoad()
	defer load.end()
	b.cache.mu.RLock()
	users := make([]string, 0, len(b.cache.stale))
	for user := range b.cache.stale {
		users = append(users, user)
	}
	loaded := b.cache.loaded
	b.cache.mu.RUnlock()

	if !loaded {
		var err error
		if users, err = s.List(ctx, userPrefix); err != nil {
			return err
		}
	}
	grants, err := readGrants(ctx, s, users)
	if err != nil {
		return err
	}
	b.cache.mu.Lock()
	defer b.cache.mu.Unlock()
	for i, user := range users {
		if load.unchanged(userPrefix+user) && !b.cache.unsaved[user] {
			b.cache.setGrant(user, grants[i])
		}
	}
	// A grant stored after the listing was invalidated, and so is stale: it is read when asked for.
	b.cache.loaded = true
	return nil
}

// loadWorkers is how many grants a load reads at once: each read is a round trip to Vault, and
// Vault's gRPC connection carries concurrent ones for less work each.
const loadWorkers = 64

// readGrants reads the users' grants from storage, in the users' order, loadWorkers at a time.
func readGrants(ctx context.Context, s logical.Storage, users []string) ([]*grant, error) {
	grants := make([]*grant, len(users))
	reads, ctx := errgroup.WithContext(ctx)
	reads.SetLimit(loadWorkers)
	for i, user := range users {
		reads.Go(func() (err error) {
			grants[i], err = getGrant(ctx, s, user)
			return err
		})
	}
	return grants, reads.Wait()
}

// grantsByStatus counts the grants in memory by status, for metrics.
func (b *backend) grantsByStatus() map[string]int {
	b.cache.mu.RLock()
	defer b.cache.mu.RUnlock()
	var cfg *config
	if b.cache.configured != nil {
		cfg = b.cache.configured.cfg
	}
	return b.cache.tally.byStatus(cfg)
}
