package evenergy

import (
	"strings"
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

// TestRevokePathWorksWithRetiredClientsAlone: with the config deleted, the retired client sends
// the revocation of its own token.
func TestRevokePathWorksWithRetiredClientsAlone(t *testing.T) {
	b, s, sw := newSwitchableUnit(t)
	_, tok := leasedToken(t, b, s, "token")
	if _, err := request(t, b, s, logical.DeleteOperation, "config", nil); err != nil {
		t.Fatal(err)
	}
	resp, err := request(t, b, s, logical.UpdateOperation, "revoke", map[string]any{"token": tok})
	if err != nil || resp.IsError() || sw.Active(tok) {
		t.Fatalf("revoke with a retired client and no config: %v %v (token alive: %v)", err, resp, sw.Active(tok))
	}
	if sent := resp.Data["revoked_as"].([]string); len(sent) != 1 || sent[0] != testClientID {
		t.Fatalf("revoked_as = %v, want the retired client", sent)
	}
}

// TestRevokePathAnswersPerClient: a retired client whose credentials ev.energy refuses (its
// application deleted there) does not fail the revocation the configured client sent; the answer
// says what happened per client, and revocations shows the refused client.
func TestRevokePathAnswersPerClient(t *testing.T) {
	b, s, sw := newSwitchableUnit(t)
	switchClient(t, b, s, sw.Server)
	_, tok := leasedToken(t, b, s, "token")
	sw.AddClient(standin.Client{ID: testClientID, Secret: "a-new-secret", Scopes: testScopes}) // the retired client's secret no longer works
	resp, err := request(t, b, s, logical.UpdateOperation, "revoke", map[string]any{"token": tok})
	if err != nil || resp.IsError() || sw.Active(tok) {
		t.Fatalf("revoke: %v %v (token alive: %v)", err, resp, sw.Active(tok))
	}
	const refused = "ev.energy refused the token revocation: invalid_client"
	outcomes := resp.Data["clients"].(map[string]string)
	if outcomes[otherClientID] != "sent" || !strings.HasPrefix(outcomes[testClientID], refused) || len(resp.Warnings) != 1 || !strings.Contains(resp.Warnings[0], testClientID) {
		t.Fatalf("want %s sent and %s refused, with a warning naming it: %v %v", otherClientID, testClientID, outcomes, resp.Warnings)
	}
	queue, err := request(t, b, s, logical.ReadOperation, "revocations", nil)
	if err != nil {
		t.Fatal(err)
	}
	if c, _ := queue.Data["clients"].(map[string]any)[testClientID].(*clientRevocations); c == nil || !strings.HasPrefix(c.LastError, refused) {
		t.Fatalf("revocations does not show the refused retired client: %v", queue.Data)
	}

	// When no client can send it, the write fails as before.
	sw.AddClient(standin.Client{ID: otherClientID, Secret: "another-new-secret", Scopes: testScopes})
	resp, _ = request(t, b, s, logical.UpdateOperation, "revoke", map[string]any{"token": tok})
	if !resp.IsError() || !strings.Contains(resp.Error().Error(), refused) {
		t.Fatalf("no client could send it: want the 400 %q, got %v", refused, resp)
	}
}

// TestRefusedConfigCreateKeepsTheRetiredClient: a config write naming a retired client again, whose
// write storage refuses, leaves that client's credentials kept, so its tokens are still revoked.
func TestRefusedConfigCreateKeepsTheRetiredClient(t *testing.T) {
	b, s, sw := newSwitchableUnit(t)
	secret, tok := leasedToken(t, b, s, "token")
	cfg, _, err := b.config(t.Context(), s)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := request(t, b, s, logical.DeleteOperation, "config", nil); err != nil {
		t.Fatal(err)
	}
	refusing := &refusingStorage{Storage: s}
	refusing.refuse.Store(true)
	if _, err := request(t, b, refusing, logical.CreateOperation, "config", map[string]any{"client_id": cfg.ClientID, "client_secret": cfg.ClientSecret, "base_url": cfg.BaseURL, "callback_url": cfg.CallbackURL}); err == nil {
		t.Fatal("a config write storage refused answered success")
	}
	if err := revokeLease(t, b, s, secret); err != nil || sw.Active(tok) {
		t.Fatalf("a lease of the retired client, after a refused config write naming it: %v (alive: %v)", err, sw.Active(tok))
	}
}
