package evenergy

import (
	"context"
	"errors"
	"net/http"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/hashicorp/vault/sdk/logical"
)

// TestSelfMadeLinksAreBoundedMountWide: self-made links pending or held count against the config's
// max_self_service_links; beyond it auth-url answers 429 to them, never to an application's link.
func TestSelfMadeLinksAreBoundedMountWide(t *testing.T) {
	b, s := newUnitBackend(t)
	sv := newUnitStandin(t, b, s)
	if _, err := request(t, b, s, logical.UpdateOperation, "config", map[string]any{"max_self_service_links": 3}); err != nil {
		t.Fatal(err)
	}
	selfMade := func(entity string) (*logical.Response, error) {
		return requestAs(t, b, s, entity, logical.UpdateOperation, "auth-url/"+entity, map[string]any{"redirect_uri": unitCallback})
	}
	_, _, page := heldAtCallback(t, b, s, sv, "entity-a", "a@example.com")
	for _, entity := range []string{"entity-b", "entity-c"} {
		if resp, err := selfMade(entity); err != nil || resp.IsError() {
			t.Fatalf("auth-url within the bound: %v %v", err, resp)
		}
	}
	resp, err := selfMade("entity-d")
	wantCoded(t, resp, err, http.StatusTooManyRequests, "max_self_service_links")
	if resp, err := requestAs(t, b, s, "app-entity", logical.UpdateOperation, "auth-url/driver-1", map[string]any{"redirect_uri": unitCallback}); err != nil || resp.IsError() {
		t.Fatalf("an application's link at the bound: %v %v", err, resp)
	}
	if resp, err := requestAs(t, b, s, "entity-a", logical.UpdateOperation, "users/entity-a", map[string]any{"confirmation_code": pageConfirmationCode(t, page)}); err != nil || resp.IsError() {
		t.Fatalf("confirming: %v %v", err, resp)
	}
	if resp, err := selfMade("entity-d"); err != nil || resp.IsError() {
		t.Fatalf("auth-url once a held grant was confirmed: %v %v", err, resp)
	}
	resp, err = selfMade("entity-e")
	wantCoded(t, resp, err, http.StatusTooManyRequests, "max_self_service_links")
}

// markBlockingStorage runs block before the first write of a self-made link's mark.
type markBlockingStorage struct {
	logical.Storage
	once  *sync.Once
	block func()
}

func (m markBlockingStorage) Put(ctx context.Context, e *logical.StorageEntry) error {
	if strings.HasPrefix(e.Key, selfMadeLinkPrefix) {
		m.once.Do(m.block)
	}
	return m.Storage.Put(ctx, e)
}

// lockWaiters is how many hold or wait for key's lock among b's pending locks.
func lockWaiters(b *backend, key string) int {
	b.pendingLocks.mu.Lock()
	defer b.pendingLocks.mu.Unlock()
	if e := b.pendingLocks.entries[key]; e != nil {
		return e.refs
	}
	return 0
}

// TestReplacedSelfMadeLinksLeaveNoMark: a maker whose newer links replace one before its mark is
// written leaves no mark of the replaced link, which would count against the mount-wide bound for
// its 10 minutes: one entity's concurrent auth-url calls could fill max_self_service_links.
func TestReplacedSelfMadeLinksLeaveNoMark(t *testing.T) {
	b, s := newUnitBackend(t)
	newUnitStandin(t, b, s)
	folder := authRequestPrefix + pendingTag("entity-a") + "/"
	selfMade := func(s logical.Storage) error {
		resp, err := requestAs(t, b, s, "entity-a", logical.UpdateOperation, "auth-url/entity-a", map[string]any{"redirect_uri": unitCallback})
		if err == nil && resp.IsError() {
			err = resp.Error()
		}
		return err
	}
	reached, newer := make(chan struct{}), make(chan error, 1)
	slow := markBlockingStorage{Storage: s, once: &sync.Once{}, block: func() {
		close(reached)
		for { // until the newer links are made, or wait for a lock this write holds
			select {
			case err := <-newer:
				newer <- err
				return
			default:
			}
			if lockWaiters(b, folder) > 1 {
				return
			}
			time.Sleep(time.Millisecond)
		}
	}}
	first := make(chan error, 1)
	go func() { first <- selfMade(slow) }()
	<-reached
	go func() {
		var errs []error
		for range maxPendingPerUser {
			errs = append(errs, selfMade(s))
		}
		newer <- errors.Join(errs...)
	}()
	if err := errors.Join(<-first, <-newer); err != nil {
		t.Fatal(err)
	}
	marks, _ := s.List(t.Context(), selfMadeLinkPrefix)
	pending, _ := s.List(t.Context(), folder)
	if len(marks) != len(pending) || len(marks) > maxPendingPerUser {
		t.Fatalf("%d marks of self-made links stored for %d pending links, at most %d per user", len(marks), len(pending), maxPendingPerUser)
	}
}
