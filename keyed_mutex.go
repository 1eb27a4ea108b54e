package evenergy

import "sync"

// keyedMutex is a mutex per key that only callers of the same key share, so that work hung on one
// key (a refresh ev.energy does not answer) delays no other. The zero value is ready; a key's entry
// lives only while someone holds it or waits for it.
type keyedMutex struct {
	mu      sync.Mutex
	entries map[string]*keyedEntry
}

// keyedEntry is the mutex of one key and how many hold it or wait for it.
type keyedEntry struct {
	condMutex
	refs int
}

// lock locks key and returns the function that unlocks it.
func (m *keyedMutex) lock(key string) (unlock func()) {
	m.mu.Lock()
	if m.entries == nil {
		m.entries = map[string]*keyedEntry{}
	}
	e := m.entries[key]
	if e == nil {
		e = &keyedEntry{}
		m.entries[key] = e
	}
	e.refs++
	m.mu.Unlock()
	e.Lock()
	return m.unlocker(key, e)
}

// tryLock locks key unless someone holds it or waits for it, without waiting; ok says whether it did.
func (m *keyedMutex) tryLock(key string) (unlock func(), ok bool) {
	m.mu.Lock()
	defer m.mu.Unlock()
	if m.entries[key] != nil {
		return nil, false
	}
	if m.entries == nil {
		m.entries = map[string]*keyedEntry{}
	}
	e := &keyedEntry{refs: 1}
	e.Lock()
	m.entries[key] = e
	return m.unlocker(key, e), true
}

// unlocker is the function that unlocks key's entry e.
func (m *keyedMutex) unlocker(key string, e *keyedEntry) func() {
	return func() {
		e.Unlock()
		m.mu.Lock()
		defer m.mu.Unlock()
		if e.refs--; e.refs == 0 {
			delete(m.entries, key)
		}
	}
}
