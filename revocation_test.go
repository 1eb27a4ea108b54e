package evenergy

import (
	"context"
	"errors"
	"net/http"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/hashicorp/vault/sdk/logical"

	"github.com/evenergy/vault-plugin-secrets-evenergy/internal/standin"
)

// pendingRevocations are the records queued in storage.
func pendingRevocations(t testing.TB, s logical.Storage) []*revocation {
	t.Helper()
	keys, err := s.List(t.Context(), revocationPrefix)
	if err != nil {
		t.Fatal(err)
	}
	var records []*revocation
	for _, key := range keys {
		rec, err := getJSON[revocation](t.Context(), s, revocationPrefix+key)
		if err != nil {
			t.Fatal(err)
		}
		records = append(records, rec)
	}
	return records
}

// switchableStandin is a stand-in that can be taken down (503 to everything) and counts the
// revocation calls that reach it while up or down.
type switchableStandin struct {
	*standin.Server
	down    atomic.Bool
	revokes atomic.Int64
}

func (sw *switchableStandin) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	if strings.HasPrefix(r.URL.Path, "/o/revoke_token") {
		sw.revokes.Add(1)
	}
	if sw.down.Load() {
		http.Error(w, "down for maintenance", http.StatusServiceUnavailable)
		return
	}
	sw.Server.ServeHTTP(w, r)
}

// newSwitchableUnit is a unit backend configured against a switchable stand-in.
func newSwitchableUnit(t *testing.T) (*backend, logical.Storage, *switchableStandin) {
	t.Helper()
	b, s := newUnitBackend(t)
	sw := &switchableStandin{Server: newTestStandin()}
	unitConfig(t, b, s, sw)
	return b, s, sw
}

// leasedToken reads path and returns the lease's secret as Vault would hand it back to revoke.
func leasedToken(t *testing.T, b *backend, s logical.Storage, path string) (*logical.Secret, string) {
	t.Helper()
	resp, err := request(t, b, s, logical.ReadOperation, path, nil)
	if err != nil || resp.IsError() || resp.Secret == nil {
		t.Fatalf("%s: %v %v", path, err, resp)
	}
	return resp.Secret, resp.Data["access_token"].(string)
}

// revokeLease sends the revocation Vault sends when a lease ends.
func revokeLease(t *testing.T, b *backend, s logical.Storage, secret *logical.Secret) error {
	t.Helper()
	_, err := b.HandleRequest(t.Context(), &logical.Request{Operation: logical.RevokeOperation, Path: "token", Secret: secret, Storage: s})
	return err
}

// runPeriodic runs one periodic pass, as Vault's rollback manager does every minute.
func runPeriodic(t *testing.T, b *backend, s logical.Storage) {
	t.Helper()
	if err := b.periodic(t.Context(), &logical.Request{Storage: s}); err != nil {
		t.Fatalf("periodic: %v", err)
	}
}

func TestLeaseRevokeQueuesWhileEvenergyIsDownAndRetriesWithBackoff(t *testing.T) {
	b, s, sw := newSwitchableUnit(t)
	var secrets []*logical.Secret
	var tokens []string
	for range 3 {
		secret, tok := leasedToken(t, b, s, "token")
		secrets, tokens = append(secrets, secret), append(tokens, tok)
	}
	sw.down.Store(true)
	for _, secret := range secrets {
		if err := revokeLease(t, b, s, secret); err != nil {
			t.Fatalf("a lease whose revocation ev.energy did not confirm must end all the same: %v", err)
		}
	}
	queued := pendingRevocations(t, s)
	if len(queued) != 3 || queued[0].ClientID != testClientID || queued[0].Reason != reasonLeaseEnded {
		t.Fatalf("want 3 lease revocations of %s queued, got %d: %+v", testClientID, len(queued), queued)
	}

	// ev.energy is still down, and the client's first failure holds every record back for a while.
	sw.revokes.Store(0)
	runPeriodic(t, b, s)
	if n := sw.revokes.Load(); n > 1 {
		t.Fatalf("one pass sent %d revocations to a failing ev.energy; one per client at the most", n)
	}
	sw.revokes.Store(0)
	resp, err := request(t, b, s, logical.UpdateOperation, "revocations", nil)
	if err != nil || resp.Data["pending"] != 3 || sw.revokes.Load() != 1 {
		t.Fatalf("retry now while ev.energy is down: %v %v, %d calls (want one)", resp, err, sw.revokes.Load())
	}
	sw.down.Store(false)
	eventually(t, 30*time.Second, "the queue to be revoked once ev.energy is back", func() bool {
		runPeriodic(t, b, s)
		return len(pendingRevocations(t, s)) == 0
	})
	for _, tok := range tokens {
		if sw.Active(tok) {
			t.Fatal("a queued token is still active at ev.energy after the queue emptied")
		}
	}
}

func TestExpiredAccessTokenLeavesTheQueueUnsent(t *testing.T) {
	b, s, sw := newSwitchableUnit(t)
	rec := revocation{ClientID: testClientID, AccessToken: "expired-token", ExpiresAt: time.Now().Add(-time.Second), Reason: reasonLeaseEnded}
	if err := b.queueRevocation(t.Context(), s, rec, nil); err != nil {
		t.Fatal(err)
	}
	runPeriodic(t, b, s)
	if n := len(pendingRevocations(t, s)); n != 0 || sw.revokes.Load() != 0 {
		t.Fatalf("an expired access token stayed queued (%d) or was sent (%d calls)", n, sw.revokes.Load())
	}
}

func TestRevokeOnAMountBeingDisabledFailsRatherThanQueue(t *testing.T) {
	b, s, sw := newSwitchableUnit(t)
	secret, tok := leasedToken(t, b, s, "token")
	sw.down.Store(true)
	b.System().(*logical.StaticSystemView).TaintedVal = true
	err := revokeLease(t, b, s, secret)
	if err == nil || len(pendingRevocations(t, s)) != 0 {
		t.Fatalf("a tainted mount's storage is wiped: want an error and nothing queued, got %v", err)
	}
	for _, unrecoverable := range []error{logical.ErrInvalidRequest, logical.ErrUnsupportedOperation, logical.ErrUnsupportedPath, logical.ErrUnrecoverable} {
		if errors.Is(err, unrecoverable) {
			t.Fatalf("Revoke answered %v, which Vault would never retry", err)
		}
	}
	sw.down.Store(false)
	if err := revokeLease(t, b, s, secret); err != nil || sw.Active(tok) {
		t.Fatalf("the retried revocation: %v (token active: %v)", err, sw.Active(tok))
	}
}

func TestRevokeFailsWhenItCanNeitherRevokeNorQueue(t *testing.T) {
	b, s, sw := newSwitchableUnit(t)
	secret, tok := leasedToken(t, b, s, "token")
	sw.down.Store(true)
	if err := revokeLease(t, b, failingStorage{s, revocationPrefix}, secret); err == nil {
		t.Fatal("a lease ended with its token neither revoked nor queued")
	}
	if !sw.Active(tok) {
		t.Fatal("ev.energy was down, yet the token is revoked")
	}
}

func TestTokenMintedForAGoneCallerIsQueuedWhenEvenergyCannotRevoke(t *testing.T) {
	b, s := newUnitBackend(t)
	sv := newTestStandin()
	ctx, callerLeaves := context.WithCancel(t.Context())
	var issued atomic.Bool
	unitConfig(t, b, s, http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if issued.Load() { // ev.energy goes down right after issuing the token
			http.Error(w, "down", http.StatusBadGateway)
			return
		}
		sv.ServeHTTP(w, r)
		if r.URL.Path == "/o/token" {
			issued.Store(true)
			callerLeaves()
		}
	}))
	if _, err := b.HandleRequest(ctx, &logical.Request{Operation: logical.ReadOperation, Path: "token", Storage: s}); !errors.Is(err, context.Canceled) {
		t.Fatalf("want the request to fail with its caller gone, got %v", err)
	}
	queued := pendingRevocations(t, s)
	if len(queued) != 1 || queued[0].Reason != reasonUnowned || queued[0].AccessToken != sv.Tokens()[0].Value {
		t.Fatalf("want the unowned token queued for revocation, got %d records", len(queued))
	}
}

func TestReauthorizedUserKeepsLeasedTokenUntilItsLeaseEnds(t *testing.T) {
	t.Parallel()
	b, s := newUnitBackend(t)
	sv := newUnitStandin(t, b, s)
	sv.SetTokenLifetime(5 * time.Second)
	if _, err := request(t, b, s, logical.UpdateOperation, "config", map[string]any{"refresh_window": "2s"}); err != nil {
		t.Fatal(err)
	}
	old := connectUnitUser(t, b, s, sv, "driver")
	leaseEnd := old.ExpiresAt.Add(-2 * time.Second)
	connectUnitUser(t, b, s, sv, "driver") // the user connects again

	runPeriodic(t, b, s)
	if time.Now().Before(leaseEnd) && (!sv.Active(old.AccessToken) || !sv.Active(old.RefreshToken)) {
		t.Fatal("the replaced grant was revoked while leases handed out from it still run")
	}
	queued := pendingRevocations(t, s)
	if len(queued) != 1 || queued[0].Reason != reasonReplacedGrant || !queued[0].NotBefore.Equal(leaseEnd) {
		t.Fatalf("want the replaced grant queued until %v, got %+v", leaseEnd, queued)
	}
	eventually(t, 30*time.Second, "the replaced grant to be revoked once its leases ended", func() bool {
		runPeriodic(t, b, s)
		return !sv.Active(old.RefreshToken)
	})
	if time.Now().Before(leaseEnd) {
		t.Fatal("the replaced grant was revoked before its leases ended")
	}
}

func TestDeletedUserIsRevokedAtOnceOrQueued(t *testing.T) {
	b, s, sw := newSwitchableUnit(t)
	for i, down := range []bool{false, true} {
		user := []string{"driver-up", "driver-down"}[i]
		g := connectUnitUser(t, b, s, sw.Server, user)
		sw.down.Store(down)
		resp, err := request(t, b, s, logical.DeleteOperation, "users/"+user, nil)
		if err != nil || len(resp.Warnings) != 1 {
			t.Fatalf("delete %s: %v %v", user, err, resp)
		}
		if stored, _ := getJSON[grant](t.Context(), s, userPrefix+user); stored != nil {
			t.Fatalf("%s: the grant is still stored", user)
		}
		sw.down.Store(false)
		if down {
			if !strings.Contains(resp.Warnings[0], "queued") || len(pendingRevocations(t, s)) != 1 || !sw.Active(g.RefreshToken) {
				t.Fatalf("%s: want the revocation queued with a warning saying so, got %q", user, resp.Warnings[0])
			}
			continue
		}
		if !strings.Contains(resp.Warnings[0], "vault lease revoke -prefix users/"+user+"/token") || sw.Active(g.RefreshToken) || sw.Active(g.AccessToken) {
			t.Fatalf("%s: want the grant revoked at once and the command that ends its leases, got %q", user, resp.Warnings[0])
		}
	}
}

// TestQueueAndRetiredClientsFollowInvalidation: what one node queues or retires, another node
// (a new active node, say) sees once Vault tells it storage changed.
func TestQueueAndRetiredClientsFollowInvalidation(t *testing.T) {
	first, second, s, sv := twoNodes(t)
	for _, b := range []*backend{first, second} { // both have listed the empty queue and retired clients
		if _, err := b.revocations.all(t.Context(), s); err != nil {
			t.Fatal(err)
		}
		if _, err := b.retiredClientIDs(t.Context(), s); err != nil {
			t.Fatal(err)
		}
	}
	switchClient(t, first, s, sv)
	if err := first.queueRevocation(t.Context(), s, revocation{ClientID: testClientID, AccessToken: "a-token", Reason: reasonLeaseEnded}, nil); err != nil {
		t.Fatal(err)
	}
	keys, _ := s.List(t.Context(), revocationPrefix)
	retiredKeys, _ := s.List(t.Context(), retiredClientPrefix)
	second.Invalidate(t.Context(), revocationPrefix+keys[0])
	second.Invalidate(t.Context(), retiredClientPrefix+retiredKeys[0])
	summary, err := second.revocationSummary(t.Context(), s)
	if err != nil || summary["pending"] != 1 {
		t.Fatalf("the other node sees %v pending revocations (%v), want 1", summary["pending"], err)
	}
	if ids, err := second.retiredClientIDs(t.Context(), s); err != nil || len(ids) != 1 || ids[0] != testClientID {
		t.Fatalf("the other node sees retired clients %v (%v)", ids, err)
	}
}

// cancellingDelete cancels the request's context as the first queued record is deleted, as an
// operator whose retry is interrupted right after ev.energy confirmed one revocation.
type cancellingDelete struct {
	logical.Storage
	cancel context.CancelFunc
}

func (s cancellingDelete) Delete(ctx context.Context, key string) error {
	if strings.HasPrefix(key, revocationPrefix) {
		s.cancel()
	}
	return s.Storage.Delete(ctx, key)
}

// TestInterruptedRetryForgetsNothing: a forced retry whose request ends midway still deletes the
// record ev.energy confirmed, and memory keeps counting the rest.
func TestInterruptedRetryForgetsNothing(t *testing.T) {
	b, s, sw := newSwitchableUnit(t)
	var tokens []string
	for range 2 {
		_, tok := leasedToken(t, b, s, "token")
		tokens = append(tokens, tok)
		if err := b.queueRevocation(t.Context(), s, revocation{ClientID: testClientID, AccessToken: tok, Reason: reasonLeaseEnded}, nil); err != nil {
			t.Fatal(err)
		}
	}
	if _, err := b.revocations.all(t.Context(), s); err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(t.Context())
	_, _ = b.HandleRequest(ctx, &logical.Request{Operation: logical.UpdateOperation, Path: "revocations", Storage: cancellingDelete{s, cancel}}) // its caller is gone
	if sw.Active(tokens[0]) || !sw.Active(tokens[1]) {
		t.Fatal("want the first record revoked and the retry stopped before the second")
	}
	if stored, counted := len(pendingRevocations(t, s)), b.revocations.count(); stored != 1 || counted != 1 {
		t.Fatalf("after the interrupted retry storage holds %d records and the metric counts %d, want 1 and 1", stored, counted)
	}
}

// TestDisownWithNoBudgetNorQueueRevokesOutsideTheBudget: on a step-down the call budget is closed
// and storage refuses the queue; a token nothing owns is then revoked with one call outside the
// budget. Before, it was left alive and owned by nothing (simulator seed 78, 300 steps).
func TestDisownWithNoBudgetNorQueueRevokesOutsideTheBudget(t *testing.T) {
	b, s := newUnitBackend(t)
	sv := newUnitStandin(t, b, s)
	writeSharedRole(t, b, s, "fleet")
	tok := readShared(t, b, s, "fleet")
	b.budget.close()
	b.disown(t.Context(), failingStorage{Storage: s, prefix: revocationPrefix}, storedShared(t, s, "fleet").revocation(time.Time{}, reasonUnowned))
	if sv.Active(tok) {
		t.Fatal("a token disowned with the budget closed and the queue refused is alive at ev.energy")
	}
}
