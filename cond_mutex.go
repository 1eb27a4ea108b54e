package evenergy

import "sync"

// condMutex is a mutex whose waiters wait on a sync.Cond, for the locks held across calls to
// ev.energy or storage: testing/synctest counts a goroutine waiting on a sync.Cond as durably
// blocked, and one waiting on a sync.Mutex as running, which would stop the simulation's clock
// (see simulation_test.go) while the lock's holder waits for it. The zero value is unlocked.
type condMutex struct {
	mu      sync.Mutex
	changed sync.Cond
	held    bool
}

func (m *condMutex) Lock() {
	m.mu.Lock()
	defer m.mu.Unlock()
	for m.held {
		m.wait()
	}
	m.held = true
}

// TryLock locks m if it is unlocked, and reports whether it did.
func (m *condMutex) TryLock() bool {
	m.mu.Lock()
	defer m.mu.Unlock()
	if m.held {
		return false
	}
	m.held = true
	return true
}

func (m *condMutex) Unlock() {
	m.mu.Lock()
	defer m.mu.Unlock()
	if !m.held {
		panic("evenergy: unlock of an unlocked condMutex")
	}
	m.held = false
	m.changed.Signal()
}

// wait waits for an Unlock; call it with mu held.
func (m *condMutex) wait() {
	if m.changed.L == nil {
		m.changed.L = &m.mu
	}
	m.changed.Wait()
}
