package evenergy

import (
	"context"
	"errors"
	"fmt"
	"net/http/httptest"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/hashicorp/vault/sdk/helper/consts"
	"github.com/hashicorp/vault/sdk/logical"

	"github.com/evenergy/vault-plugin-secrets-evenergy/internal/standin"
)

// countingStorage counts every call the engine makes to Vault's storage.
type countingStorage struct {
	logical.Storage
	calls atomic.Int64
}

func (s *countingStorage) List(ctx context.Context, prefix string) ([]string, error) {
	s.calls.Add(1)
	return s.Storage.List(ctx, prefix)
}

func (s *countingStorage) Get(ctx context.Context, key string) (*logical.StorageEntry, error) {
	s.calls.Add(1)
	return s.Storage.Get(ctx, key)
}

func (s *countingStorage) Put(ctx context.Context, e *logical.StorageEntry) error {
	s.calls.Add(1)
	return s.Storage.Put(ctx, e)
}

func (s *countingStorage) Delete(ctx context.Context, key string) error {
	s.calls.Add(1)
	return s.Storage.Delete(ctx, key)
}

// countingSystemView counts the system-view calls a client-credentials read needs; while strict,
// any other call reaches the nil embedded view and panics, so none can go unseen.
type countingSystemView struct {
	logical.SystemView // nil while strict
	inner              logical.SystemView
	calls              atomic.Int64
}

func (v *countingSystemView) ReplicationState() consts.ReplicationState {
	v.calls.Add(1)
	return v.inner.ReplicationState()
}

func (v *countingSystemView) DefaultLeaseTTL() time.Duration {
	v.calls.Add(1)
	return v.inner.DefaultLeaseTTL()
}

func (v *countingSystemView) MaxLeaseTTL() time.Duration {
	v.calls.Add(1)
	return v.inner.MaxLeaseTTL()
}

// strict makes every call count or panic from now on.
func (v *countingSystemView) strict() {
	v.SystemView = nil
	v.calls.Store(0)
}

// newCountedBackend is a unit backend whose calls back to Vault can be counted.
func newCountedBackend(t testing.TB, storage logical.Storage) (*backend, *countingStorage, *countingSystemView) {
	t.Helper()
	config := logical.TestBackendConfig()
	sys := &countingSystemView{SystemView: config.System, inner: config.System}
	counted := &countingStorage{Storage: storage}
	config.System, config.StorageView = sys, counted
	b, err := Factory(context.Background(), config)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { b.Cleanup(context.Background()) }) // the background refresh ends with the test
	return b.(*backend), counted, sys
}

func TestWarmUserReadCallsVaultNever(t *testing.T) {
	b, s, sys := newCountedBackend(t, &logical.InmemStorage{})
	connectUnitUser(t, b, s, newUnitStandin(t, b, s), "driver")
	if _, err := request(t, b, s, logical.ReadOperation, "users/driver/token", nil); err != nil {
		t.Fatal(err)
	}
	sys.strict()
	s.calls.Store(0)
	resp, err := request(t, b, s, logical.ReadOperation, "users/driver/token", nil)
	if err != nil || resp.Secret == nil {
		t.Fatalf("warm read: %v %v", err, resp)
	}
	if n := s.calls.Load() + sys.calls.Load(); n != 0 {
		t.Fatalf("a warm read of a fresh user token made %d calls back to Vault, want none", n)
	}
}

func TestClientCredentialsReadCallsVaultNever(t *testing.T) {
	b, s, sys := newCountedBackend(t, &logical.InmemStorage{})
	newUnitStandin(t, b, s)
	if _, err := request(t, b, s, logical.CreateOperation, "roles/fleet", map[string]any{"ttl": "60s"}); err != nil {
		t.Fatal(err)
	}
	for _, path := range []string{"token", "token/fleet"} {
		if _, err := request(t, b, s, logical.ReadOperation, path, nil); err != nil { // warms the caches
			t.Fatal(err)
		}
		sys.strict()
		s.calls.Store(0)
		if resp, err := request(t, b, s, logical.ReadOperation, path, nil); err != nil || resp.Secret == nil {
			t.Fatalf("%s: %v %v", path, err, resp)
		}
		if storage, system := s.calls.Load(), sys.calls.Load(); storage+system != 0 {
			t.Errorf("%s made %d storage and %d system-view calls, want none", path, storage, system)
		}
		sys.SystemView = sys.inner
	}
}

// twoNodes are two backends on one storage, as the nodes of a cluster are: one writes, the other
// learns of it through Invalidate, as Vault calls it on a performance standby.
func twoNodes(t *testing.T) (active, standby *backend, s logical.Storage, sv *standin.Server) {
	t.Helper()
	s = &logical.InmemStorage{}
	active, _ = newUnitBackend(t)
	standby, _ = newUnitBackend(t)
	sv = newUnitStandin(t, active, s)
	return active, standby, s, sv
}

func TestGrantRotatedOnOneNodeIsReadOnAnother(t *testing.T) {
	active, standby, s, sv := twoNodes(t)
	before, _ := connectDueUser(t, active, s, sv, "driver")
	if err := standby.tokens.loadAll(t.Context(), s); err != nil {
		t.Fatal(err)
	}
	// The active node refreshes: ev.energy kills the token the standby has cached.
	rotated, err := request(t, active, s, logical.ReadOperation, "users/driver/token", nil)
	if err != nil || rotated.Data["access_token"] == before.AccessToken {
		t.Fatalf("the active node did not refresh: %v", err)
	}
	standby.InvalidateKey(t.Context(), userPrefix+"driver")
	issued := len(sv.Tokens())
	after, err := request(t, standby, s, logical.ReadOperation, "users/driver/token", nil)
	if err != nil || after.Data["access_token"] != rotated.Data["access_token"] {
		t.Fatalf("the standby served another token than the rotated one: %v", err)
	}
	if len(sv.Tokens()) != issued {
		t.Fatal("the standby refreshed a grant the active node had just refreshed")
	}
}

func TestConfigChangesTakeEffectOnTheNextRead(t *testing.T) {
	active, standby, s, sv := twoNodes(t)
	if _, err := request(t, standby, s, logical.ReadOperation, "token", nil); err != nil {
		t.Fatal(err)
	}
	// Another node points the config at another ev.energy.
	other := standin.New()
	other.AddClient(standin.Client{ID: testClientID, Secret: testClientSecret, Scopes: testScopes})
	otherServer := httptest.NewServer(other)
	t.Cleanup(otherServer.Close)
	if _, err := request(t, active, s, logical.UpdateOperation, "config", map[string]any{"base_url": otherServer.URL}); err != nil {
		t.Fatal(err)
	}
	standby.InvalidateKey(t.Context(), configPath)
	if _, err := request(t, standby, s, logical.ReadOperation, "token", nil); err != nil {
		t.Fatal(err)
	}
	if len(other.Tokens()) != 1 || len(sv.Tokens()) != 1 {
		t.Fatalf("after the config moved, the old ev.energy issued %d tokens and the new one %d; want 1 and 1", len(sv.Tokens()), len(other.Tokens()))
	}
	// A write or a delete on this node takes effect at once, without an invalidation.
	if _, err := request(t, standby, s, logical.DeleteOperation, "config", nil); err != nil {
		t.Fatal(err)
	}
	if _, err := request(t, standby, s, logical.ReadOperation, "token", nil); err == nil {
		t.Fatal("a deleted config still minted tokens")
	}
}

func TestGrantWrittenElsewhereIsFoundAndDeletedOneIsGone(t *testing.T) {
	active, standby, s, sv := twoNodes(t)
	if err := standby.tokens.loadAll(t.Context(), s); err != nil { // the standby knows every grant: none
		t.Fatal(err)
	}
	connectUnitUser(t, active, s, sv, "driver")
	standby.InvalidateKey(t.Context(), userPrefix+"driver")
	if _, err := request(t, standby, s, logical.ReadOperation, "users/driver/token", nil); err != nil {
		t.Fatalf("a grant written on another node: %v", err)
	}
	if _, err := request(t, active, s, logical.DeleteOperation, "users/driver", nil); err != nil {
		t.Fatal(err)
	}
	standby.InvalidateKey(t.Context(), userPrefix+"driver")
	if _, err := request(t, standby, s, logical.ReadOperation, "users/driver/token", nil); err == nil {
		t.Fatal("a grant deleted on another node is still served")
	}
}

func TestStartLoadsEveryGrant(t *testing.T) {
	b, s := newUnitBackend(t)
	sv := newUnitStandin(t, b, s)
	connectUnitUser(t, b, s, sv, "driver")
	restarted, counted, sys := newCountedBackend(t, s)
	if err := restarted.Initialize(t.Context(), &logical.InitializationRequest{Storage: counted}); err != nil {
		t.Fatal(err)
	}
	<-restarted.grantsLoaded
	// The config is read once; the grant came with the start.
	if _, err := request(t, restarted, counted, logical.ReadOperation, "users/driver/token", nil); err != nil {
		t.Fatal(err)
	}
	sys.strict()
	counted.calls.Store(0)
	if _, err := request(t, restarted, counted, logical.ReadOperation, "users/driver/token", nil); err != nil || counted.calls.Load() != 0 {
		t.Fatalf("after a start, a read made %d storage calls: %v", counted.calls.Load(), err)
	}
}

// blockedListing holds the listing of users' grants until release is closed, as a slow load would;
// with failFirst set, the first one fails instead (a failed start-up load).
type blockedListing struct {
	logical.Storage
	release   chan struct{}
	failFirst bool
	lists     atomic.Int64
}

func (s *blockedListing) List(ctx context.Context, prefix string) ([]string, error) {
	if prefix == userPrefix {
		if s.lists.Add(1) == 1 && s.failFirst {
			return nil, errors.New("storage unavailable")
		}
		<-s.release
	}
	return s.Storage.List(ctx, prefix)
}

// TestReadsAreServedWhileGrantsLoad: Vault holds its state lock while it initializes a mount, so the
// start returns at once and a read is served from storage while every grant is still loading.
func TestReadsAreServedWhileGrantsLoad(t *testing.T) {
	b, s := newUnitBackend(t)
	sv := newUnitStandin(t, b, s)
	connectUnitUser(t, b, s, sv, "driver")
	blocked := &blockedListing{Storage: s, release: make(chan struct{})}
	restarted, _, _ := newCountedBackend(t, blocked)
	if err := restarted.Initialize(t.Context(), &logical.InitializationRequest{Storage: blocked}); err != nil {
		t.Fatal(err)
	}
	if _, err := request(t, restarted, blocked, logical.ReadOperation, "users/driver/token", nil); err != nil {
		t.Fatalf("a read while the grants load: %v", err)
	}
	if err := restarted.periodic(t.Context(), &logical.Request{Storage: blocked}); err != nil {
		t.Fatalf("a periodic pass during the start-up load: %v", err)
	}
	close(blocked.release)
	<-restarted.grantsLoaded
	restarted.tokens.mu.RLock()
	defer restarted.tokens.mu.RUnlock()
	if !restarted.tokens.loaded || restarted.tokens.tokens[userPrefix+"driver"] == nil {
		t.Fatal("the start-up load did not end with every grant in memory")
	}
}

// changingStorage calls onGet before each read of a grant, as storage changing while the engine
// reads it would.
type changingStorage struct {
	logical.Storage
	onGet func(key string)
}

func (s *changingStorage) Get(ctx context.Context, key string) (*logical.StorageEntry, error) {
	if strings.HasPrefix(key, userPrefix) && s.onGet != nil {
		s.onGet(key)
	}
	return s.Storage.Get(ctx, key)
}

// TestStartLoadKeepsWhatOthersChanged: invalidations of other keys during the start-up load (the
// config, a role, a pending authorization, another user's grant) discard no grant the load read,
// and the first periodic pass refreshes every due one; the grant that changed is read again.
func TestStartLoadKeepsWhatOthersChanged(t *testing.T) {
	first, s := newUnitBackend(t)
	sv := newUnitStandin(t, first, s)
	const users = 8
	seedGrants(t, first, s, sv, users, time.Now().Add(time.Minute))

	changing := &changingStorage{Storage: s}
	b, _, _ := newCountedBackend(t, changing)
	changing.onGet = func(key string) {
		for _, other := range []string{configPath, rolePrefix + "fleet", authRequestPrefix + "some-state", userPrefix + "someone-else"} {
			b.InvalidateKey(t.Context(), other)
		}
		if key == userPrefix+"u3" { // u3 changes while it is read: that read is not kept
			b.InvalidateKey(t.Context(), key)
		}
	}
	if err := b.Initialize(t.Context(), &logical.InitializationRequest{Storage: changing}); err != nil {
		t.Fatal(err)
	}
	<-b.grantsLoaded
	changing.onGet = nil
	b.tokens.mu.RLock()
	loaded, cached, u3Stale := b.tokens.loaded, len(b.tokens.tokens), b.tokens.stale[userPrefix+"u3"]
	b.tokens.mu.RUnlock()
	if !loaded || cached != users-1 || !u3Stale {
		t.Fatalf("after the start: loaded %v, %d of %d grants cached, u3 stale %v; want every grant but u3, which changed", loaded, cached, users-1, u3Stale)
	}

	issued := len(sv.Tokens())
	if err := b.periodic(t.Context(), &logical.Request{Storage: changing}); err != nil {
		t.Fatal(err)
	}
	if refreshed := (len(sv.Tokens()) - issued) / 2; refreshed != users {
		t.Fatalf("the first periodic pass refreshed %d of %d due grants", refreshed, users)
	}
}

// TestStartLoadReadsGrantsConcurrently: each read of a grant is a round trip to Vault, so the
// start-up load keeps several in flight; the first read waits for a second to arrive.
func TestStartLoadReadsGrantsConcurrently(t *testing.T) {
	first, s := newUnitBackend(t)
	sv := newUnitStandin(t, first, s)
	seedGrants(t, first, s, sv, 4, time.Now().Add(time.Hour))

	var reads atomic.Int32
	second := make(chan struct{})
	overlapped := false
	changing := &changingStorage{Storage: s, onGet: func(string) {
		switch reads.Add(1) {
		case 1:
			select {
			case <-second:
				overlapped = true
			case <-time.After(10 * time.Second):
			}
		case 2:
			close(second)
		}
	}}
	b, _, _ := newCountedBackend(t, changing)
	if err := b.Initialize(t.Context(), &logical.InitializationRequest{Storage: changing}); err != nil {
		t.Fatal(err)
	}
	<-b.grantsLoaded
	if !overlapped {
		t.Fatal("the start-up load read one grant after another: the second read came only once the first was over")
	}
	if cached := len(b.tokens.tokens); cached != 4 {
		t.Fatalf("the start-up load cached %d of 4 grants", cached)
	}
}

// connectWithAFailedRefresh connects user with a token already due, whose refresh then fails: its
// failure is kept for the backoff, the one refresh record b holds.
func connectWithAFailedRefresh(t *testing.T, b *backend, s logical.Storage, sv *standin.Server, user string) {
	t.Helper()
	connectDueUser(t, b, s, sv, user)
	sv.SetFault(standin.Fault{Kind: standin.FaultServerError})
	readUserToken(t, b, s, user)
	sv.SetFault(standin.Fault{})
	if kept := refreshRecords(b); kept != 1 {
		t.Fatalf("%d refresh records after a failed refresh, want its failure kept", kept)
	}
}

// refreshRecords is how many refresh records b keeps in memory.
func refreshRecords(b *backend) int {
	b.tokens.refreshes.mu.Lock()
	defer b.tokens.refreshes.mu.Unlock()
	return len(b.tokens.refreshes.byKey)
}

// TestDeletedUsersLeaveNothingInMemory: a deleted user's failure record goes with the grant on the
// active node, and a standby told of many deleted users keeps a bounded set of keys to read again,
// while a user created meanwhile is still found.
func TestDeletedUsersLeaveNothingInMemory(t *testing.T) {
	active, standby, s, sv := twoNodes(t)
	if err := standby.tokens.loadAll(t.Context(), s); err != nil {
		t.Fatal(err)
	}
	connectWithAFailedRefresh(t, active, s, sv, "driver")
	if _, err := request(t, active, s, logical.DeleteOperation, "users/driver", nil); err != nil {
		t.Fatal(err)
	}
	if left := refreshRecords(active); left != 0 {
		t.Fatalf("%d refresh records left after the user's delete, want none", left)
	}

	connectUnitUser(t, active, s, sv, "driver")
	for i := range 3 * staleSlack {
		standby.InvalidateKey(t.Context(), fmt.Sprintf("%sgone-%d", userPrefix, i)) // deleted on the active node
		if i == staleSlack/2 {
			standby.InvalidateKey(t.Context(), userPrefix+"driver")
		}
	}
	standby.tokens.mu.RLock()
	stale := len(standby.tokens.stale)
	standby.tokens.mu.RUnlock()
	if stale > staleSlack {
		t.Fatalf("the standby keeps %d keys of deleted users, want at most %d", stale, staleSlack)
	}
	if _, err := request(t, standby, s, logical.ReadOperation, "users/driver/token", nil); err != nil {
		t.Fatalf("the standby lost a user created while it forgot deleted ones: %v", err)
	}
}

// A node whose load of every token lists the stored keys also reads the stale ones, so that a
// deleted user's mark goes with that load instead of staying for the node's life.
func TestLoadOfEveryTokenDropsDeletedUsersMarks(t *testing.T) {
	active, standby, s, sv := twoNodes(t)
	connectUnitUser(t, active, s, sv, "driver")
	standby.InvalidateKey(t.Context(), userPrefix+"gone") // deleted on the active node
	standby.InvalidateKey(t.Context(), userPrefix+"driver")
	standby.tokens.mu.Lock()
	standby.tokens.loaded = false // as after a failed start-up load, or a forget of staleSlack marks
	standby.tokens.mu.Unlock()
	if err := standby.tokens.loadAll(t.Context(), s); err != nil {
		t.Fatal(err)
	}
	standby.tokens.mu.RLock()
	defer standby.tokens.mu.RUnlock()
	if len(standby.tokens.stale) != 0 || standby.tokens.tokens[userPrefix+"driver"] == nil || !standby.tokens.loaded {
		t.Fatalf("after a load of every token: stale %v, driver cached %v, loaded %v; want no mark, driver cached, loaded", standby.tokens.stale, standby.tokens.tokens[userPrefix+"driver"] != nil, standby.tokens.loaded)
	}
}

// A user deleted on another node leaves no refresh failure record on this one once its next load
// finds the user gone.
func TestUserDeletedOnAnotherNodeLeavesNoRefreshRecord(t *testing.T) {
	active, _, s, sv := twoNodes(t)
	connectWithAFailedRefresh(t, active, s, sv, "driver")
	if err := s.Delete(t.Context(), userPrefix+"driver"); err != nil { // the delete of another node
		t.Fatal(err)
	}
	active.InvalidateKey(t.Context(), userPrefix+"driver")
	if err := active.tokens.loadAll(t.Context(), s); err != nil {
		t.Fatal(err)
	}
	if left := refreshRecords(active); left != 0 {
		t.Fatalf("%d refresh records left after the user's delete on another node, want none", left)
	}
}
