package evenergy

import "sync"

// loadGuard is the lock of a memory copy of storage, and the change stamps that let a load keep
// only what did not change while it read storage: clock counts changes (the engine's own writes and
// invalidations), and changed notes when each key last changed while a load was running.
type loadGuard struct {
	mu      sync.RWMutex
	clock   uint64
	changed map[string]uint64
	loading int // loads in progress; once none is, earlier changes matter to no load
}

// change notes that storage changed at key, so that no load running now keeps what it read there;
// call it with mu held.
func (g *loadGuard) change(key string) {
	g.clock++
	if g.loading > 0 {
		if g.changed == nil {
			g.changed = map[string]uint64{}
		}
		g.changed[key] = g.clock
	}
}

// load is one read of storage into memory.
type load struct {
	g     *loadGuard
	start uint64
}

// startLoad begins a load; end it with end once it kept what it read.
func (g *loadGuard) startLoad() *load {
	g.mu.Lock()
	defer g.mu.Unlock()
	g.loading++
	return &load{g: g, start: g.clock}
}

func (l *load) end() {
	l.g.mu.Lock()
	defer l.g.mu.Unlock()
	if l.g.loading--; l.g.loading == 0 {
		clear(l.g.changed)
	}
}

// unchanged reports whether storage did not change at key since the load began; call it with mu held.
func (l *load) unchanged(key string) bool {
	return l.g.changed[key] <= l.start
}

// keep runs store, which keeps in memory what the load read at key, unless key changed since the load began.
func (l *load) keep(key string, store func()) {
	l.g.mu.Lock()
	defer l.g.mu.Unlock()
	if l.unchanged(key) {
		store()
	}
}
