package evenergy

import (
	"testing"
	"time"

	"github.com/hashicorp/vault/sdk/logical"

	"github.com/evenergy/vault-plugin-secrets-evenergy/internal/standin"
)

const otherClientID, otherClientSecret = "other-app", "other-secret"

// switchClient moves a unit backend's config to the other client, which the stand-in knows too.
func switchClient(t *testing.T, b *backend, s logical.Storage, sv *standin.Server) {
	t.Helper()
	sv.AddClient(standin.Client{ID: otherClientID, Secret: otherClientSecret, Scopes: testScopes})
	if resp, err := request(t, b, s, logical.UpdateOperation, "config", map[string]any{"client_id": otherClientID, "client_secret": otherClientSecret}); err != nil || resp.IsError() {
		t.Fatalf("config: %v %v", err, resp)
	}
}

func TestLeaseOfARetiredClientIsRevokedAsThatClient(t *testing.T) {
	b, s, sw := newSwitchableUnit(t)
	secret, tok := leasedToken(t, b, s, "token")
	switchClient(t, b, s, sw.Server)
	if err := revokeLease(t, b, s, secret); err != nil {
		t.Fatal(err)
	}
	if sw.Active(tok) || len(pendingRevocations(t, s)) != 0 {
		t.Fatal("the lease's token is alive at ev.energy: it was revoked as the configured client, which ev.energy ignores")
	}
}

func TestRevokePathSendsAsEveryClientItHolds(t *testing.T) {
	b, s, sw := newSwitchableUnit(t)
	_, tok := leasedToken(t, b, s, "token")
	switchClient(t, b, s, sw.Server)
	resp, err := request(t, b, s, logical.UpdateOperation, "revoke", map[string]any{"token": tok})
	if err != nil || resp.IsError() {
		t.Fatalf("revoke: %v %v", err, resp)
	}
	if sent := resp.Data["revoked_as"].([]string); len(sent) != 2 || sent[0] != otherClientID || sent[1] != testClientID {
		t.Fatalf("revoked_as = %v, want the configured client, then the retired one", sent)
	}
	if sw.Active(tok) {
		t.Fatal("a token of the retired client survived the revoke path")
	}
}

func TestRetiredClientIsKeptWhileAnythingOfItMayLive(t *testing.T) {
	b, s := newUnitBackend(t)
	sv := newUnitStandin(t, b, s)
	g := connectUnitUser(t, b, s, sv, "driver")
	leasedToken(t, b, s, "token")
	switchClient(t, b, s, sv)
	retired := func() int {
		keys, err := s.List(t.Context(), retiredClientPrefix)
		if err != nil {
			t.Fatal(err)
		}
		return len(keys)
	}
	if retired() != 1 {
		t.Fatal("the previous client's credentials were not kept")
	}
	pastTokens := time.Now().Add(tokenLifetime + time.Minute)
	if err := b.forgetSpentClients(t.Context(), s, pastTokens); err != nil || retired() != 1 {
		t.Fatalf("the retired client was forgotten while a grant of it is stored: %v", err)
	}
	if _, err := request(t, b, s, logical.DeleteOperation, "users/driver", nil); err != nil || sv.Active(g.RefreshToken) {
		t.Fatalf("delete: %v", err)
	}
	if err := b.forgetSpentClients(t.Context(), s, time.Now()); err != nil || retired() != 1 {
		t.Fatalf("the retired client was forgotten while its minted tokens may live: %v", err)
	}
	if err := b.forgetSpentClients(t.Context(), s, pastTokens); err != nil || retired() != 0 {
		t.Fatalf("a retired client of which nothing can live is still kept: %v", err)
	}

	// Configuring a retired client again takes it out of retirement.
	switchClient(t, b, s, sv)
	if resp, err := request(t, b, s, logical.UpdateOperation, "config", map[string]any{"client_id": testClientID, "client_secret": testClientSecret}); err != nil || resp.IsError() {
		t.Fatalf("config: %v %v", err, resp)
	}
	ids, err := b.retiredClientIDs(t.Context(), s)
	if err != nil || len(ids) != 1 || ids[0] != otherClientID {
		t.Fatalf("retired clients after moving back: %v %v", ids, err)
	}
}

func TestDeletedConfigKeepsItsClientForRevocation(t *testing.T) {
	b, s, sw := newSwitchableUnit(t)
	secret, tok := leasedToken(t, b, s, "token")
	if _, err := request(t, b, s, logical.DeleteOperation, "config", nil); err != nil {
		t.Fatal(err)
	}
	if err := revokeLease(t, b, s, secret); err != nil || sw.Active(tok) {
		t.Fatalf("a lease minted before the config was deleted: %v (alive: %v)", err, sw.Active(tok))
	}
}
