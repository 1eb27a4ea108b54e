package evenergy

import (
	"strings"
	"testing"

	"github.com/evenergy/vault-plugin-secrets-evenergy/internal/standin"
	"github.com/hashicorp/vault/sdk/logical"
)

func TestRoleLifecycle(t *testing.T) {
	b, s := newUnitBackend(t)
	resp, err := request(t, b, s, logical.CreateOperation, "roles/fleet", map[string]any{"scopes": "vehicle:read", "ttl": "1h", "max_ttl": "2h"})
	if err != nil || resp.IsError() {
		t.Fatalf("create: %v %v", err, resp)
	}
	// An update changes only what it names.
	if _, err := request(t, b, s, logical.UpdateOperation, "roles/fleet", map[string]any{"ttl": "30m"}); err != nil {
		t.Fatal(err)
	}
	resp, err = request(t, b, s, logical.ReadOperation, "roles/fleet", nil)
	if err != nil {
		t.Fatal(err)
	}
	if resp.Data["ttl"] != int64(1800) || resp.Data["max_ttl"] != int64(7200) || strings.Join(resp.Data["scopes"].([]string), " ") != "vehicle:read" {
		t.Fatalf("role read = %v", resp.Data)
	}
	resp, err = request(t, b, s, logical.ListOperation, "roles/", nil)
	if err != nil || strings.Join(resp.Data["keys"].([]string), ",") != "fleet" {
		t.Fatalf("list = %v %v", resp, err)
	}
	if _, err := request(t, b, s, logical.DeleteOperation, "roles/fleet", nil); err != nil {
		t.Fatal(err)
	}
	if resp, _ := request(t, b, s, logical.ReadOperation, "roles/fleet", nil); resp != nil {
		t.Fatalf("role still there after delete: %v", resp.Data)
	}
}

func TestRoleRejectsTTLAboveMax(t *testing.T) {
	b, s := newUnitBackend(t)
	resp, err := request(t, b, s, logical.CreateOperation, "roles/bad", map[string]any{"ttl": "3h", "max_ttl": "1h"})
	if err != nil || !resp.IsError() || !strings.Contains(resp.Error().Error(), "ttl must not be greater than max_ttl") {
		t.Fatalf("want a 400 about ttl, got %v %v", resp, err)
	}
	if entry, _ := s.Get(t.Context(), "roles/bad"); entry != nil {
		t.Fatal("a rejected role was stored")
	}
}

func TestRoleDeleteDropsAFailedFirstMintsRecord(t *testing.T) {
	b, s := newUnitBackend(t)
	sv := newUnitStandin(t, b, s)
	writeSharedRole(t, b, s, "fleet")
	sv.SetFault(standin.Fault{Kind: standin.FaultServerError})
	if _, err := request(t, b, s, logical.ReadOperation, "token/fleet", nil); err == nil {
		t.Fatal("a read during ev.energy's failure got a token")
	}
	if b.tokens.refreshes.byKey[sharedTokenPrefix+"fleet"] == nil {
		t.Fatal("the failed first mint left no failure record: nothing to test")
	}
	if _, err := request(t, b, s, logical.DeleteOperation, "roles/fleet", nil); err != nil {
		t.Fatal(err)
	}
	if _, kept := b.tokens.refreshes.byKey[sharedTokenPrefix+"fleet"]; kept {
		t.Fatal("the deleted role's failure record is kept")
	}
}
