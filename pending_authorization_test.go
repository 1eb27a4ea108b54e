package evenergy

import (
	"context"
	"crypto/rand"
	"errors"
	"fmt"
	"net/url"
	"strconv"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/hashicorp/vault/sdk/logical"
)

func TestPendingOfEarlierVersionsCompletes(t *testing.T) {
	b, s := newUnitBackend(t)
	sv := newUnitStandin(t, b, s)
	resp := newLink(t, b, s, "driver-1")
	// Moved to where earlier versions stored it, under a state as they made it.
	key, _ := pendingKey(resp.Data["state"].(string))
	pending, err := getJSON[authRequest](t.Context(), s, key)
	if err != nil || pending == nil {
		t.Fatalf("pending authorization not stored: %v", err)
	}
	oldState := rand.Text()
	if err := putJSON(t.Context(), s, authRequestPrefix+oldState, pending); err != nil {
		t.Fatal(err)
	}
	if err := s.Delete(t.Context(), key); err != nil {
		t.Fatal(err)
	}
	authorizeURL, _ := url.Parse(resp.Data["authorize_url"].(string))
	q := authorizeURL.Query()
	q.Set("state", oldState)
	authorizeURL.RawQuery = q.Encode()
	redirect, err := sv.Authorize(t.Context(), authorizeURL.String(), "driver-1", true)
	if err != nil {
		t.Fatal(err)
	}

	resp, err = request(t, b, s, logical.UpdateOperation, "users/driver-1", map[string]any{"code": redirect.Query().Get("code"), "state": oldState})
	if err != nil || resp.IsError() {
		t.Fatalf("completing a pending authorization of an earlier version: %v %v", err, resp)
	}
	if g, err := getGrant(t.Context(), s, userPrefix+"driver-1"); err != nil || g == nil || g.Status != grantActive {
		t.Fatalf("grant %v %v", g, err)
	}
	if n := storedPending(t, s); n != 0 {
		t.Fatalf("%d pending authorizations left after it completed", n)
	}
}

// slowStorage takes 100 µs a call on average, as Vault's storage over gRPC and Raft does, where
// InmemStorage takes a few: a millisecond every tenth call, as a sleep of 100 µs lasts about a
// millisecond on a loaded machine.
type slowStorage struct {
	logical.Storage
	calls atomic.Int64
}

func (s *slowStorage) wait() {
	if s.calls.Add(1)%10 == 0 {
		time.Sleep(time.Millisecond)
	}
}

func (s *slowStorage) List(ctx context.Context, prefix string) ([]string, error) {
	s.wait()
	return s.Storage.List(ctx, prefix)
}

func (s *slowStorage) Get(ctx context.Context, key string) (*logical.StorageEntry, error) {
	s.wait()
	return s.Storage.Get(ctx, key)
}

func (s *slowStorage) Put(ctx context.Context, e *logical.StorageEntry) error {
	s.wait()
	return s.Storage.Put(ctx, e)
}

func (s *slowStorage) Delete(ctx context.Context, key string) error {
	s.wait()
	return s.Storage.Delete(ctx, key)
}

// seedExpiredPending stores n expired pending authorizations straight into storage, as earlier
// versions stored them or else as this one does, maxPendingPerUser for each user.
func seedExpiredPending(t *testing.T, s logical.Storage, n int, earlierVersions bool) {
	t.Helper()
	expiresAt := time.Now().Add(-time.Minute)
	entry, err := logical.StorageEntryJSON("", authRequest{User: "u", RedirectURI: appRedirect, Verifier: "v", ExpiresAt: expiresAt})
	if err != nil {
		t.Fatal(err)
	}
	for i := range n {
		key := authRequestPrefix + rand.Text()
		if !earlierVersions {
			key = authRequestPrefix + pendingTag(fmt.Sprint("u", i/maxPendingPerUser)) + "/" + strconv.FormatInt(expiresAt.UnixNano(), 10) + "-" + rand.Text()
		}
		if err := s.Put(t.Context(), &logical.StorageEntry{Key: key, Value: entry.Value}); err != nil {
			t.Fatal(err)
		}
	}
}

// cancellingStorage ends a ctx once it made the deletes'th delete.
type cancellingStorage struct {
	logical.Storage
	deletes int
	cancel  context.CancelFunc
}

func (s *cancellingStorage) Delete(ctx context.Context, key string) error {
	err := s.Storage.Delete(ctx, key)
	if s.deletes--; s.deletes == 0 {
		s.cancel()
	}
	return err
}

func TestPeriodicForgetsManyExpiredAuthorizationsWithinBudget(t *testing.T) {
	for name, earlierVersions := range map[string]bool{"as earlier versions stored them": true, "per user": false} {
		t.Run(name, func(t *testing.T) {
			const seeded = 50000
			b, inmem := newUnitBackend(t)
			seedExpiredPending(t, inmem, seeded, earlierVersions)
			s := &slowStorage{Storage: inmem}

			// A pass stops once its ctx ends.
			ctx, cancel := context.WithCancel(t.Context())
			if err := b.sweepPending(ctx, &cancellingStorage{Storage: s, deletes: 10, cancel: cancel}, time.Now().Add(passBudget)); err != nil && !errors.Is(err, context.Canceled) {
				t.Fatal(err)
			}
			if n := seeded - storedPending(t, inmem); n != 10 {
				t.Fatalf("a pass whose ctx ended at the 10th delete deleted %d pending authorizations", n)
			}

			left := storedPending(t, inmem)
			for pass := 1; left > 0; pass++ {
				if pass > 100 {
					t.Fatalf("%d expired pending authorizations left after 100 passes", left)
				}
				start := time.Now()
				if err := b.periodic(t.Context(), &logical.Request{Storage: s}); err != nil {
					t.Fatal(err)
				}
				took := time.Since(start)
				n := storedPending(t, inmem)
				t.Logf("pass %d took %v, deleted %d, %d left", pass, took.Round(time.Millisecond), left-n, n)
				if took > 2*passBudget {
					t.Errorf("pass %d took %v, over twice the pass budget of %v", pass, took, passBudget)
				}
				if n >= left {
					t.Fatalf("pass %d deleted none of the %d expired pending authorizations left", pass, left)
				}
				left = n
			}
		})
	}
}

// listingThenWrite runs write once, right after the listing of prefix was read and before it is
// returned: storage changes underneath a listing that is under way.
type listingThenWrite struct {
	logical.Storage
	prefix string
	write  func()
}

func (s *listingThenWrite) List(ctx context.Context, prefix string) ([]string, error) {
	keys, err := s.Storage.List(ctx, prefix)
	if prefix == s.prefix && s.write != nil {
		write := s.write
		s.write = nil
		write()
	}
	return keys, err
}

func TestSweepKeepsDueAPendingAuthorizationStoredWhileItLists(t *testing.T) {
	b, inmem := newUnitBackend(t)
	newUnitStandin(t, b, inmem)
	seedExpiredPending(t, inmem, 1, false)
	var state string
	s := &listingThenWrite{Storage: inmem, prefix: authRequestPrefix, write: func() {
		state = newLink(t, b, inmem, "driver-1").Data["state"].(string)
	}}
	if err := b.sweepPending(t.Context(), s, time.Now().Add(passBudget)); err != nil {
		t.Fatal(err)
	}
	if state == "" {
		t.Fatal("no link was made while the sweep listed")
	}
	key, _ := pendingKey(state)
	expiresAt, _ := pendingExpiry(key[strings.LastIndex(key, "/")+1:])
	if due := b.cache.pendingDue; due.After(expiresAt) {
		t.Fatalf("after the sweep the next one is due at %v, after the link made meanwhile expires (%v): it would never be deleted", due, expiresAt)
	}
	if n := storedPending(t, inmem); n != 1 {
		t.Fatalf("%d pending authorizations stored, want the new link only", n)
	}
}
