package evenergy

import (
	"context"
	"strings"
	"time"

	"github.com/hashicorp/vault/sdk/logical"
)

// cache keeps in memory what the hot paths read besides the held tokens (the config with its
// client, roles, and when the next pending authorization expires). It is only a copy of storage: the
// engine's own writes update it, Invalidate drops what storage changed underneath (replication,
// another node), and it is loaded anew at start. Cached values are never changed in place, only replaced.
type cache struct {
	loadGuard

	configured *configured
	roles      map[string]*role

	// pendingDue is when the earliest pending authorization stored expires, as far as known: zero (at
	// start, after an invalidation of an entry of earlier versions) sweeps at the next pass.
	pendingDue   time.Time
	pendingSweep *pendingSweep // a sweep that ran out of time, which the next pass goes on with
}

// configured is the config and the ev.energy client made from it, reused until the config changes.
type configured struct {
	cfg    *config
	client *evenergyClient
}

func newCache() *cache {
	return &cache{roles: map[string]*role{}}
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
	case strings.HasPrefix(key, authRequestPrefix):
		c.notePendingKey(key) // made or used on another node
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
	cfg.digest = cfg.secretDigest()
	current = &configured{cfg: cfg, client: newClient(cfg, b.metrics, b.transport)}
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
