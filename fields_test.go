package evenergy

import (
	"context"
	"testing"

	"github.com/hashicorp/vault/sdk/logical"
)

// TestCredentialFieldsAreTrimmed writes every credential field as `@file` or `-` gives it, with a
// trailing newline (and stray spaces): the stand-in accepts the client secret, the code and state,
// and the imported refresh token only as ev.energy issued them.
func TestCredentialFieldsAreTrimmed(t *testing.T) {
	b, s := newUnitBackend(t)
	sv := newUnitStandin(t, b, s)
	if resp, err := request(t, b, s, logical.UpdateOperation, "config", map[string]any{"client_secret": " " + testClientSecret + "\n"}); err != nil || resp.IsError() {
		t.Fatalf("config write: %v %v", err, resp)
	}
	if resp, err := request(t, b, s, logical.ReadOperation, "token", nil); err != nil || resp.IsError() {
		t.Fatalf("a token with the client secret written with a newline: %v %v", err, resp)
	}

	resp, err := request(t, b, s, logical.UpdateOperation, "auth-url/driver", map[string]any{"redirect_uri": appRedirect})
	if err != nil || resp.IsError() {
		t.Fatalf("auth-url: %v %v", err, resp)
	}
	redirect, err := sv.Authorize(context.Background(), resp.Data["authorize_url"].(string), "driver", true)
	if err != nil {
		t.Fatal(err)
	}
	if resp, err := request(t, b, s, logical.UpdateOperation, "users/driver", map[string]any{
		"code": redirect.Query().Get("code") + "\n", "state": resp.Data["state"].(string) + "\n",
	}); err != nil || resp.IsError() {
		t.Fatalf("users write of code and state with a newline: %v %v", err, resp)
	}

	refreshToken, err := sv.IssueUserGrant(testClientID, "importer", "vehicle:read")
	if err != nil {
		t.Fatal(err)
	}
	if resp, err := request(t, b, s, logical.UpdateOperation, "users/importer", map[string]any{"refresh_token": refreshToken + " \n"}); err != nil || resp.IsError() {
		t.Fatalf("users write of a refresh token with a newline: %v %v", err, resp)
	}
}
