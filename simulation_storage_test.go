package evenergy

import (
	"context"
	"errors"
	"fmt"
	"strings"
	"sync"
	"time"

	"github.com/hashicorp/vault/sdk/logical"
)

// simStorage is Vault storage as the simulation's nodes see it: logical.InmemStorage whose calls
// fail, are slow, or block for a span, as the seed chooses. Writes are recorded, for another
// node's Invalidate. The invariants read inner, which never fails.
type simStorage struct {
	inner *logical.InmemStorage

	mu          sync.Mutex
	seed        uint64
	seen        map[string]int // calls so far by key, for keyedRand
	refuseUntil time.Time      // writes fail until then (a node that lost quorum)
	blockUntil  time.Time      // every call waits until then
	failRate    int            // thousandths of calls that fail
	slowRate    int            // thousandths of calls that take 0.1 to 1 s
	flying      int
	written     []string
	refused     []time.Time    // when writes failed
	writes      int            // write calls so far, refused ones too
	lastWrite   map[string]int // writes at each key's last write call
}

var errSimStorage = errors.New("simulated storage failure")

func newSimStorage(seed uint64) *simStorage {
	return &simStorage{inner: &logical.InmemStorage{}, seed: seed, seen: map[string]int{}, lastWrite: map[string]int{}}
}

// enter decides the call's fault and waits as it says; write says whether the call writes.
func (s *simStorage) enter(ctx context.Context, write bool, key string) (func(), error) {
	s.mu.Lock()
	s.flying++
	if write {
		s.writes++
		s.lastWrite[key] = s.writes
	}
	wait := time.Until(s.blockUntil)
	named := key // a queued revocation's key is random: its prefix names it
	if strings.HasPrefix(key, revocationPrefix) {
		named = revocationPrefix
	}
	rng := keyedRand(s.seed, fmt.Sprint(write, named), s.seen)
	fail := rng.IntN(1000) < s.failRate || (write && time.Now().Before(s.refuseUntil))
	if rng.IntN(1000) < s.slowRate {
		wait = max(wait, time.Duration(100+rng.IntN(900))*time.Millisecond)
	}
	if write && !fail {
		s.written = append(s.written, key)
	}
	s.mu.Unlock()
	done := func() {
		s.mu.Lock()
		s.flying--
		s.mu.Unlock()
	}
	if wait > 0 {
		if stalled, ok := ctx.Value(simPassKey{}).(*simStall); ok {
			stalled.add(wait)
		}
		time.Sleep(wait)
	}
	if fail {
		if write {
			s.mu.Lock()
			s.refused = append(s.refused, time.Now())
			s.mu.Unlock()
		}
		return done, errSimStorage
	}
	return done, nil
}

func (s *simStorage) List(ctx context.Context, prefix string) ([]string, error) {
	done, err := s.enter(ctx, false, prefix)
	defer done()
	if err != nil {
		return nil, err
	}
	return s.inner.List(ctx, prefix)
}

func (s *simStorage) Get(ctx context.Context, key string) (*logical.StorageEntry, error) {
	done, err := s.enter(ctx, false, key)
	defer done()
	if err != nil {
		return nil, err
	}
	return s.inner.Get(ctx, key)
}

func (s *simStorage) Put(ctx context.Context, e *logical.StorageEntry) error {
	done, err := s.enter(ctx, true, e.Key)
	defer done()
	if err != nil {
		return err
	}
	return s.inner.Put(ctx, e)
}

func (s *simStorage) Delete(ctx context.Context, key string) error {
	done, err := s.enter(ctx, true, key)
	defer done()
	if err != nil {
		return err
	}
	return s.inner.Delete(ctx, key)
}

// takeWritten returns the keys written since the last call, for another node's Invalidate.
func (s *simStorage) takeWritten() []string {
	s.mu.Lock()
	defer s.mu.Unlock()
	w := s.written
	s.written = nil
	return w
}

func (s *simStorage) busy() bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.flying > 0
}

func (s *simStorage) set(f func(s *simStorage)) {
	s.mu.Lock()
	defer s.mu.Unlock()
	f(s)
}

// keys lists every key under prefix in the inner storage, recursively.
func (s *simStorage) keys(prefix string) []string {
	names, _ := s.inner.List(context.Background(), prefix)
	var out []string
	for _, name := range names {
		if strings.HasSuffix(name, "/") {
			out = append(out, s.keys(prefix+name)...)
		} else {
			out = append(out, prefix+name)
		}
	}
	return out
}

// refusedNear reports whether a write failed within two seconds before at.
func (s *simStorage) refusedNear(at time.Time) bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	for _, t := range s.refused {
		if !t.After(at) && at.Sub(t) <= 2*time.Second {
			return true
		}
	}
	return false
}

// simPassKey marks the context of a periodic pass, whose storage calls add up how long storage
// stalled them: the pass's budget cannot cover what storage takes.
type simPassKey struct{}

type simStall struct {
	mu      sync.Mutex
	total   time.Duration
	longest time.Duration // the pass's own longest call to ev.energy
}

func (s *simStall) call(d time.Duration) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.longest = max(s.longest, d)
}

func (s *simStall) add(d time.Duration) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.total += d
}

func (s *simStall) get() (storage, longestCall time.Duration) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.total, s.longest
}
