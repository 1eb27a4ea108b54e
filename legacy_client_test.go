package evenergy

import (
	"strings"
	"testing"
	"time"

	"github.com/hashicorp/vault/sdk/logical"
)

// startOn starts this version of the engine on storage s, as Vault does at an upgrade or unseal.
func startOn(t *testing.T, s logical.Storage) *backend {
	t.Helper()
	b, counted, _ := newCountedBackend(t, s)
	if err := b.Initialize(t.Context(), &logical.InitializationRequest{Storage: counted}); err != nil {
		t.Fatal(err)
	}
	return b
}

// queueLegacyRecord stores a queued record as versions before v0.3 did, naming no client.
func queueLegacyRecord(t *testing.T, s logical.Storage, key, accessToken string) {
	t.Helper()
	if err := putJSON(t.Context(), s, revocationPrefix+key, &revocation{AccessToken: accessToken, Reason: reasonLeaseEnded, QueuedAt: time.Now().UTC()}); err != nil {
		t.Fatal(err)
	}
}

// TestRecordsFromBeforeV03AreRevokedAsTheClientOfTheFirstStart: a queued record and a lease from
// before v0.3 name no client; after the config moves to another client (which ev.energy answers
// 200 and ignores), they are still revoked as the client configured at this version's first start,
// recorded once: a later start does not change it.
func TestRecordsFromBeforeV03AreRevokedAsTheClientOfTheFirstStart(t *testing.T) {
	old, s, sw := newSwitchableUnit(t) // as version 0.2 ran
	_, tok := leasedToken(t, old, s, "token")
	leased, leasedTok := leasedToken(t, old, s, "token")
	delete(leased.InternalData, "client_id") // a lease handed out before v0.3
	queueLegacyRecord(t, s, "from-v0.2", tok)

	first := startOn(t, s)
	if recs := pendingRevocations(t, s); len(recs) != 1 || recs[0].ClientID != testClientID {
		t.Fatalf("the first start did not name the configured client in the queued record: %+v", recs)
	}
	switchClient(t, first, s, sw.Server)
	second := startOn(t, s)
	if err := revokeLease(t, second, s, leased); err != nil {
		t.Fatal(err)
	}
	if _, err := second.retryRevocations(t.Context(), s, time.Now().Add(time.Minute), true, false); err != nil {
		t.Fatal(err)
	}
	if sw.Active(tok) || sw.Active(leasedTok) || len(pendingRevocations(t, s)) != 0 {
		t.Fatalf("tokens of records from before v0.3 alive at ev.energy (queued: %v, lease: %v): revoked as %s, which ev.energy ignores", sw.Active(tok), sw.Active(leasedTok), otherClientID)
	}
}

// TestRecordsFromBeforeV03WithoutAConfigAtTheFirstStartStayUnknown: no config existed at this
// version's first start, so a record naming no client is kept, and revocations says why.
func TestRecordsFromBeforeV03WithoutAConfigAtTheFirstStartStayUnknown(t *testing.T) {
	s := &logical.InmemStorage{}
	queueLegacyRecord(t, s, "from-v0.2", "some-token")
	b := startOn(t, s)
	unitConfig(t, b, s, newTestStandin())
	if _, err := b.retryRevocations(t.Context(), s, time.Now().Add(time.Minute), true, false); err != nil {
		t.Fatal(err)
	}
	summary, err := b.revocationSummary(t.Context(), s)
	if err != nil || summary["pending"] != 1 {
		t.Fatalf("revocations shows %v pending (%v), want the record of an unknown client kept", summary["pending"], err)
	}
	if c := summary["clients"].(map[string]any)[""].(*clientRevocations); !strings.Contains(c.LastError, "its client is unknown") {
		t.Fatalf("last_error %q does not say the record's client is unknown", c.LastError)
	}
}
