package evenergy

import (
	"encoding/json"
	"strings"
	"testing"
	"time"

	"github.com/hashicorp/vault/sdk/logical"

	"github.com/evenergy/vault-plugin-secrets-evenergy/internal/standin"
)

// rollbackTick is how often Vault's rollback manager calls the periodic function.
const rollbackTick = time.Minute

// TestAccRevocationOutlivesAnOutage revokes leases by prefix while ev.energy is unreachable: the
// leases end at once and none is irrevocable, the engine queues the tokens, and they die at
// ev.energy within two rollback ticks of its return.
func TestAccRevocationOutlivesAnOutage(t *testing.T) {
	t.Parallel()
	e := newAccEnv(t)
	const leases = 5
	var tokens []string
	for range leases {
		tokens = append(tokens, e.standinToken(t, e.read(t, "token")))
	}
	e.stopStandin()
	if _, err := e.vault.Logical().Write("sys/leases/revoke-prefix/"+e.path("token"), map[string]any{"sync": true}); err != nil {
		t.Fatalf("revoke -sync -prefix while ev.energy is down: %v", err)
	}
	e.wantLeases(t, "token", 0)
	irrevocable, err := e.vault.Logical().ReadWithData("sys/leases", map[string][]string{"type": {"irrevocable"}, "limit": {"none"}})
	if err != nil {
		t.Fatal(err)
	}
	if irrevocable != nil {
		list, _ := irrevocable.Data["leases"].([]any)
		for _, lease := range list {
			if id, _ := lease.(map[string]any)["lease_id"].(string); strings.HasPrefix(id, e.mount+"/") {
				t.Fatalf("Vault marked lease %s irrevocable", id)
			}
		}
	}
	if pending := e.metrics(t)["evenergy_revocations_pending{}"]; pending != leases {
		t.Fatalf("metrics show %v pending revocations, want %d", pending, leases)
	}
	queue := e.read(t, "revocations")
	client, _ := queue.Data["clients"].(map[string]any)[testClientID].(map[string]any)
	if n, _ := client["pending"].(json.Number).Int64(); n != leases || !strings.Contains(client["last_error"].(string), "connection refused") {
		t.Fatalf("revocations of %s: %v", testClientID, client)
	}
	for _, tok := range tokens {
		if !e.standin.Active(tok) {
			t.Fatal("a token died while ev.energy was unreachable")
		}
	}

	e.startStandin(t)
	eventually(t, 2*rollbackTick+30*time.Second, "every queued token to die at ev.energy within two rollback ticks", func() bool {
		for _, tok := range tokens {
			if e.standin.Active(tok) {
				return false
			}
		}
		return true
	})
	if pending := e.metrics(t)["evenergy_revocations_pending{}"]; pending != 0 {
		t.Fatalf("metrics show %v pending revocations after all were revoked", pending)
	}
}

// TestAccClientSwitchRevokesWithTheMintingClient mints under one client, moves the config to
// another and revokes by prefix: ev.energy revokes only for the client that holds a token.
func TestAccClientSwitchRevokesWithTheMintingClient(t *testing.T) {
	t.Parallel()
	e := newAccEnv(t)
	var tokens []string
	for range 5 {
		tokens = append(tokens, e.standinToken(t, e.read(t, "token")))
	}
	e.standin.AddClient(standin.Client{ID: otherClientID, Secret: otherClientSecret, Scopes: testScopes})
	e.write(t, "config", map[string]any{"client_id": otherClientID, "client_secret": otherClientSecret})
	if err := e.vault.Sys().RevokePrefix(e.path("token")); err != nil {
		t.Fatal(err)
	}
	alive := 0
	for _, tok := range tokens {
		if e.standin.Active(tok) {
			alive++
		}
	}
	if alive != 0 {
		t.Fatalf("%d of %s's 5 tokens alive after revoke -prefix under %s", alive, testClientID, otherClientID)
	}
}

// TestRevocationsWriteRevokesDeferredRecordsOnRequest: a replaced grant waits for its leases; a
// forced retry leaves it, include_deferred=true revokes it now and warns that leases end early.
func TestRevocationsWriteRevokesDeferredRecordsOnRequest(t *testing.T) {
	b, s := newUnitBackend(t)
	sv := newUnitStandin(t, b, s)
	old := connectUnitUser(t, b, s, sv, "driver")
	connectUnitUser(t, b, s, sv, "driver") // the user connects again: the old grant waits for its leases
	resp, err := request(t, b, s, logical.UpdateOperation, "revocations", nil)
	if err != nil || resp.Data["pending"] != 1 || !sv.Active(old.RefreshToken) {
		t.Fatalf("a forced retry without include_deferred: %v %v", resp, err)
	}
	resp, err = request(t, b, s, logical.UpdateOperation, "revocations", map[string]any{"include_deferred": true})
	if err != nil || resp.Data["pending"] != 0 || sv.Active(old.RefreshToken) {
		t.Fatalf("include_deferred=true left the replaced grant: %v %v (alive: %v)", resp, err, sv.Active(old.RefreshToken))
	}
	if len(resp.Warnings) != 1 || !strings.Contains(resp.Warnings[0], "before their leases ended") {
		t.Fatalf("want a warning that leases end early, got %v", resp.Warnings)
	}
}

// TestRevocationsWriteDropsAClientsRecords: records of a client whose credentials are gone can
// never be revoked; drop_client deletes them, and the warning names the client, what they hold and
// until when.
func TestRevocationsWriteDropsAClientsRecords(t *testing.T) {
	b, s, _ := newSwitchableUnit(t)
	expiry := time.Now().Add(time.Hour).UTC().Truncate(time.Second)
	for _, rec := range []revocation{
		{ClientID: "deleted-app", AccessToken: "a1", RefreshToken: "r1", ExpiresAt: expiry, Reason: reasonDeletedUser},
		{ClientID: "deleted-app", AccessToken: "a2", ExpiresAt: expiry.Add(-time.Minute), Reason: reasonLeaseEnded},
		{ClientID: testClientID, AccessToken: "a3", NotBefore: time.Now().Add(time.Hour), Reason: reasonReplacedGrant},
	} {
		if err := b.queueRevocation(t.Context(), s, rec, nil); err != nil {
			t.Fatal(err)
		}
	}
	resp, err := request(t, b, s, logical.UpdateOperation, "revocations", map[string]any{"drop_client": "deleted-app"})
	if err != nil || resp.Data["pending"] != 1 || len(pendingRevocations(t, s)) != 1 {
		t.Fatalf("drop_client=deleted-app: %v %v, want only the other client's record left", resp, err)
	}
	if len(resp.Warnings) != 1 || !strings.Contains(resp.Warnings[0], `client "deleted-app"`) ||
		!strings.Contains(resp.Warnings[0], "1 refresh tokens, which never expire") || !strings.Contains(resp.Warnings[0], expiry.Format(time.RFC3339)) {
		t.Fatalf("the warning must name the client, its refresh token and until when access tokens live: %v", resp.Warnings)
	}
	for _, secret := range []string{"a1", "r1", "a2"} {
		if strings.Contains(resp.Warnings[0], secret) {
			t.Fatal("the warning shows a token")
		}
	}
}
