package evenergy

import (
	"net/http"
	"testing"

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
