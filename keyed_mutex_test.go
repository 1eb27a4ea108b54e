package evenergy

import (
	"testing"
	"time"
)

// refs is how many hold or wait for key.
func (m *keyedMutex) refs(key string) int {
	m.mu.Lock()
	defer m.mu.Unlock()
	if e := m.entries[key]; e != nil {
		return e.refs
	}
	return 0
}

func TestKeyedMutexSharedOnlyBySameKey(t *testing.T) {
	var m keyedMutex
	unlockA := m.lock("a")

	// Another key is not held up by a.
	other := make(chan func())
	go func() { other <- m.lock("b") }()
	select {
	case unlockB := <-other:
		unlockB()
	case <-time.After(5 * time.Second):
		t.Fatal("locking b waited for a")
	}

	// The same key waits until a is unlocked.
	same := make(chan func())
	go func() { same <- m.lock("a") }()
	eventually(t, 5*time.Second, "the second locker of a waits", func() bool { return m.refs("a") == 2 })
	select {
	case <-same:
		t.Fatal("a was locked twice at once")
	default:
	}
	unlockA()
	select {
	case unlock := <-same:
		unlock()
	case <-time.After(5 * time.Second):
		t.Fatal("the waiter did not get a once it was unlocked")
	}

	if n := len(m.entries); n != 0 {
		t.Fatalf("%d entries left once every key is unlocked", n)
	}
}
