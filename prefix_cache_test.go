package evenergy

import (
	"context"
	"testing"
	"time"

	"github.com/hashicorp/vault/sdk/logical"
)

// lateListing lists prefix at once but answers only once release is closed (or a generous bound
// passed), as a listing that read storage just before a write landed and is still in flight.
type lateListing struct {
	logical.Storage
	prefix  string
	listed  chan struct{} // closed once the listing has read storage
	release chan struct{}
}

func newLateListing(s logical.Storage, prefix string) *lateListing {
	return &lateListing{Storage: s, prefix: prefix, listed: make(chan struct{}), release: make(chan struct{})}
}

func (s *lateListing) List(ctx context.Context, prefix string) ([]string, error) {
	keys, err := s.Storage.List(ctx, prefix)
	if prefix == s.prefix && s.listed != nil {
		close(s.listed)
		s.listed = nil // only the first listing is late
		select {
		case <-s.release:
		case <-time.After(30 * time.Second):
		}
	}
	return keys, err
}

// loadRacing runs load while write stores an entry after load listed storage but before it
// answered, and waits for both.
func loadRacing(t *testing.T, late *lateListing, load func() error, write func()) {
	t.Helper()
	listed := late.listed
	loaded := make(chan error, 1)
	go func() { loaded <- load() }()
	select {
	case <-listed:
	case <-time.After(30 * time.Second):
		t.Fatal("the load did not list storage: the entries were in memory already")
	}
	write()
	close(late.release)
	if err := <-loaded; err != nil {
		t.Fatal(err)
	}
}

// TestRevocationQueuedWhileTheQueueLoadsIsRetried: a lease that ends while the queue is being
// listed (at every start, when Vault revokes what expired during the seal) is counted and retried.
func TestRevocationQueuedWhileTheQueueLoadsIsRetried(t *testing.T) {
	b, s, sw := newSwitchableUnit(t)
	_, tok := leasedToken(t, b, s, "token")
	late := newLateListing(s, revocationPrefix)
	loadRacing(t, late, func() error { _, err := b.revocations.all(t.Context(), late); return err }, func() {
		if err := b.queueRevocation(t.Context(), late, revocation{ClientID: testClientID, AccessToken: tok, Reason: reasonLeaseEnded}, nil); err != nil {
			t.Fatal(err)
		}
	})
	summary, err := b.revocationSummary(t.Context(), s)
	if err != nil || summary["pending"] != 1 || b.revocations.count() != 1 {
		t.Fatalf("revocations shows %v pending (%v) and the metric %d, want the record stored during the load", summary["pending"], err, b.revocations.count())
	}
	if _, err := b.retryRevocations(t.Context(), s, time.Now().Add(time.Minute), false, false); err != nil {
		t.Fatal(err)
	}
	if sw.Active(tok) || len(pendingRevocations(t, s)) != 0 {
		t.Fatal("the record stored during the load was not retried: its token lives at ev.energy")
	}
}

// TestClientRetiredWhileRetiredClientsLoadIsFound: a config deleted while the retired clients are
// being listed keeps its client for the revocation of its leases.
func TestClientRetiredWhileRetiredClientsLoadIsFound(t *testing.T) {
	b, s, sw := newSwitchableUnit(t)
	secret, tok := leasedToken(t, b, s, "token")
	b.Invalidate(t.Context(), retiredClientPrefix) // the retired clients are not in memory, as at a start
	late := newLateListing(s, retiredClientPrefix)
	loadRacing(t, late, func() error { _, err := b.retiredClientIDs(t.Context(), late); return err }, func() {
		if _, err := request(t, b, late, logical.DeleteOperation, "config", nil); err != nil {
			t.Fatal(err)
		}
	})
	if ids, err := b.retiredClientIDs(t.Context(), s); err != nil || len(ids) != 1 || ids[0] != testClientID {
		t.Fatalf("retired clients %v (%v), want the client retired during the load", ids, err)
	}
	if err := revokeLease(t, b, s, secret); err != nil || sw.Active(tok) {
		t.Fatalf("the lease of the client retired during the load: %v (token alive: %v)", err, sw.Active(tok))
	}
}
