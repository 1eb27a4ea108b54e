package evenergy

import (
	"testing"
	"testing/synctest"
	"time"
)

// TestCondMutexWaiterLetsTheBubbleClockRun: in a synctest bubble a goroutine waiting for a
// condMutex whose holder sleeps is durably blocked, so the clock moves on and both finish; with a
// sync.Mutex this test hangs. It also excludes: TryLock fails while the lock is held.
func TestCondMutexWaiterLetsTheBubbleClockRun(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		var m condMutex
		m.Lock()
		start := time.Now()
		go func() {
			time.Sleep(time.Second)
			m.Unlock()
		}()
		if m.TryLock() {
			t.Fatal("TryLock took a held lock")
		}
		done := make(chan time.Duration)
		go func() {
			m.Lock()
			defer m.Unlock()
			done <- time.Since(start)
		}()
		synctest.Wait()
		if waited := <-done; waited != time.Second {
			t.Fatalf("the waiter got the lock after %v, want 1s", waited)
		}
		if !m.TryLock() {
			t.Fatal("TryLock failed on an unlocked mutex")
		}
	})
}
