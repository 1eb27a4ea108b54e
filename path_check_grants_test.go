package evenergy

import (
	"strings"
	"testing"

	"github.com/hashicorp/vault/sdk/logical"
)

// TestCheckGrantsRefreshesEveryGrant starts a check as after a restore: every active grant is due at
// once, whatever its token's age; the periodic pass refreshes each (ending the token its readers
// hold) and marks revoked the one whose refresh token ev.energy no longer accepts.
func TestCheckGrantsRefreshesEveryGrant(t *testing.T) {
	b, s := newUnitBackend(t)
	sv := newUnitStandin(t, b, s)
	before := map[string]*grant{}
	for _, user := range []string{"u1", "u2", "rotated-away"} {
		before[user] = connectUnitUser(t, b, s, sv, user) // 10-hour tokens, far from their window
	}
	if resp, err := request(t, b, s, logical.UpdateOperation, "revoke", map[string]any{"token": before["rotated-away"].RefreshToken}); err != nil || resp.IsError() {
		t.Fatalf("revoke: %v %v", err, resp)
	}
	if resp, _ := request(t, b, s, logical.ReadOperation, "check-grants", nil); !resp.IsError() {
		t.Fatalf("check-grants read before any check = %v, want an error saying none was started", resp.Data)
	}

	resp, err := request(t, b, s, logical.UpdateOperation, "check-grants", nil)
	if err != nil || resp.IsError() {
		t.Fatalf("check-grants: %v %v", err, resp)
	}
	if resp.Data["pending"] != 3 || len(resp.Warnings) != 1 || !strings.Contains(resp.Warnings[0], "ends the access token its readers hold") || !strings.Contains(resp.Warnings[0], "about 1200 refreshes a minute") {
		t.Fatalf("check-grants answered %v with warnings %q, want 3 pending and a warning that readers' tokens end, at about 1200 a minute (the default call_budget)", resp.Data, resp.Warnings)
	}
	if err := b.periodic(t.Context(), &logical.Request{Storage: s}); err != nil {
		t.Fatal(err)
	}
	for _, user := range []string{"u1", "u2"} {
		after, _ := getJSON[grant](t.Context(), s, userPrefix+user)
		if after.AccessToken == before[user].AccessToken || sv.Active(before[user].AccessToken) {
			t.Errorf("the check did not refresh %s's grant", user)
		}
	}
	if after, _ := getJSON[grant](t.Context(), s, userPrefix+"rotated-away"); after.Status != grantRevoked || after.RevokedAt == nil {
		t.Errorf("the grant ev.energy refuses is %s, revoked_at %v; want revoked with when", after.Status, after.RevokedAt)
	}
	resp, err = request(t, b, s, logical.ReadOperation, "check-grants", nil)
	if err != nil || resp.IsError() || resp.Data["pending"] != 0 || resp.Data["revoked_since_start"] != 1 {
		t.Fatalf("check-grants after the pass = %v %v, want 0 pending and 1 revoked", resp, err)
	}
	// Checked grants are due again only by their windows: the next pass sends nothing.
	issued := len(sv.Tokens())
	if err := b.periodic(t.Context(), &logical.Request{Storage: s}); err != nil {
		t.Fatal(err)
	}
	if len(sv.Tokens()) != issued {
		t.Fatal("a pass after the check refreshed checked grants again")
	}
}
