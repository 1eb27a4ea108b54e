package evenergy

import (
	"context"
	"maps"
	"strings"
	"sync"

	"github.com/hashicorp/vault/sdk/logical"
)

// prefixCache is the memory copy of every entry under one storage prefix, for records the engine
// keeps few of and reads in passes: loaded on first use, updated by the engine's own writes, and
// dropped whole when Invalidate reports a change underneath (another node, replication).
type prefixCache[T any] struct {
	prefix  string
	mu      sync.Mutex
	version uint64        // counts invalidations, so a load that raced one is not kept
	entries map[string]*T // by key below prefix; nil until loaded
	loads   int           // loads reading storage now
	written map[string]*T // the engine's own writes while loads run (nil for a delete), which a load may have listed too early to see
}

func newPrefixCache[T any](prefix string) *prefixCache[T] {
	return &prefixCache[T]{prefix: prefix}
}

// all returns a snapshot of every entry, loading them from storage when memory has none.
func (c *prefixCache[T]) all(ctx context.Context, s logical.Storage) (map[string]*T, error) {
	c.mu.Lock()
	if c.entries != nil {
		defer c.mu.Unlock()
		return maps.Clone(c.entries), nil
	}
	version := c.version
	c.loads++
	c.mu.Unlock()
	defer c.loadEnded()
	keys, err := s.List(ctx, c.prefix)
	if err != nil {
		return nil, err
	}
	entries := make(map[string]*T, len(keys))
	for _, key := range keys {
		v, err := getJSON[T](ctx, s, c.prefix+key)
		if err != nil {
			return nil, err
		}
		if v != nil {
			entries[key] = v
		}
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.entries != nil { // another load was kept meanwhile, with every write since
		return maps.Clone(c.entries), nil
	}
	for key, v := range c.written {
		if v == nil {
			delete(entries, key)
		} else {
			entries[key] = v
		}
	}
	if c.version == version {
		c.entries = entries
	}
	return maps.Clone(entries), nil
}

// get returns the entry at key (nil when there is none), loading every entry when memory has none.
func (c *prefixCache[T]) get(ctx context.Context, s logical.Storage, key string) (*T, error) {
	c.mu.Lock()
	if c.entries != nil {
		defer c.mu.Unlock()
		return c.entries[key], nil
	}
	c.mu.Unlock()
	entries, err := c.all(ctx, s)
	if err != nil {
		return nil, err
	}
	return entries[key], nil
}

// loadEnded forgets the writes noted for the loads once none is running.
func (c *prefixCache[T]) loadEnded() {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.loads--; c.loads == 0 {
		c.written = nil
	}
}

// wrote keeps v, nil once deleted, as the entry at key in memory and in every load running; call it with mu held.
func (c *prefixCache[T]) wrote(key string, v *T) {
	if c.entries != nil {
		if v == nil {
			delete(c.entries, key)
		} else {
			c.entries[key] = v
		}
	}
	if c.loads > 0 {
		if c.written == nil {
			c.written = map[string]*T{}
		}
		c.written[key] = v
	}
}

// put stores v under key and then keeps it in memory.
func (c *prefixCache[T]) put(ctx context.Context, s logical.Storage, key string, v *T) error {
	if err := putJSON(ctx, s, c.prefix+key, v); err != nil {
		c.invalidate(c.prefix + key) // what storage holds now is unknown
		return err
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	c.wrote(key, v)
	return nil
}

// delete deletes the entry at key from storage and memory.
func (c *prefixCache[T]) delete(ctx context.Context, s logical.Storage, key string) error {
	if err := s.Delete(ctx, c.prefix+key); err != nil {
		c.invalidate(c.prefix + key)
		return err
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	c.wrote(key, nil)
	return nil
}

// invalidate forgets every entry when storageKey is below the prefix; they are listed again on next use.
func (c *prefixCache[T]) invalidate(storageKey string) {
	if !strings.HasPrefix(storageKey, c.prefix) {
		return
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	c.version++
	c.entries = nil
	c.written = nil // no load running now is kept, and a later one lists storage after these writes
}

// count is how many entries memory holds, without loading them.
func (c *prefixCache[T]) count() int {
	c.mu.Lock()
	defer c.mu.Unlock()
	return len(c.entries)
}
