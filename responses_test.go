package evenergy

import (
	"errors"
	"net/http"
	"strings"
	"testing"
	"time"

	"github.com/hashicorp/vault/sdk/logical"

	"github.com/evenergy/vault-plugin-secrets-evenergy/internal/standin"
)

// TestCallerMistakesAreErrorResponses checks that a coded 400 reaches Vault as an error response
// with ErrInvalidRequest, which Vault answers as 400 with the response's one line.
func TestCallerMistakesAreErrorResponses(t *testing.T) {
	b, s := newUnitBackend(t)
	resp, status, err := serve(t, b, s, logical.ReadOperation, "token", nil)
	if status != http.StatusBadRequest || err != logical.ErrInvalidRequest || resp.Error().Error() != notConfigured {
		t.Fatalf("token without a config: HTTP %d, %v, %v", status, resp, err)
	}
	mustWrite(t, b, s, "config", map[string]any{"client_id": testClientID, "client_secret": testClientSecret, "base_url": "https://api.ev.energy"})
	resp, status, err = serve(t, b, s, logical.ReadOperation, "token/nope", nil)
	if status != http.StatusBadRequest || err != logical.ErrInvalidRequest || resp.Error().Error() != "role nope does not exist: write it to roles/nope first" {
		t.Fatalf("token of a missing role: HTTP %d, %v, %v", status, resp, err)
	}
}

// TestRevokeNeverAnswersInvalidRequest checks that a lease's revocation that cannot reach ev.energy
// is queued, or, on a mount being disabled, fails with its plain error: Vault makes a lease
// irrevocable at once when its Revoke returns ErrInvalidRequest, and retries any other error.
func TestRevokeNeverAnswersInvalidRequest(t *testing.T) {
	b, s := newUnitBackend(t) // no config: the revocation cannot call ev.energy
	revoke := func() (*logical.Response, error) {
		return b.HandleRequest(t.Context(), &logical.Request{
			Operation: logical.RevokeOperation,
			Storage:   s,
			Secret: &logical.Secret{InternalData: map[string]any{
				"secret_type":  secretAccessTokenType,
				"access_token": "a-token",
				"expires_at":   time.Now().Add(time.Hour).Format(time.RFC3339),
			}},
		})
	}
	if resp, err := revoke(); err != nil || resp.IsError() || len(pendingRevocations(t, s)) != 1 {
		t.Fatalf("revocation without a config: %v, %v; want it queued", resp, err)
	}
	b.System().(*logical.StaticSystemView).TaintedVal = true
	if resp, err := revoke(); err == nil || errors.Is(err, logical.ErrInvalidRequest) || resp.IsError() || !strings.HasSuffix(err.Error(), notConfigured) {
		t.Fatalf("revocation without a config on a mount being disabled: %v, %v; want the plain error, to be retried", resp, err)
	}
}

// TestAccCLIPrintsOneLine runs the Vault CLI against the real dev Vault: a caller's mistake prints
// as the one line the engine says; ev.energy's 502 keeps its status, in the list Vault wraps every
// error that is not a response in.
func TestAccCLIPrintsOneLine(t *testing.T) {
	t.Parallel()
	e := newAccEnv(t)
	for _, tc := range []struct {
		args []string
		want string
	}{
		{[]string{"read", e.path("token/nope")}, "Code: 400. Errors:\n\n* role nope does not exist: write it to roles/nope first"},
		{[]string{"write", e.path("config"), "base_url=http://api.ev.energy"}, "Code: 400. Errors:\n\n* base_url must use https:// (http:// is allowed only for localhost and loopback addresses)"},
		{[]string{"read", e.path("users/nobody/token")}, "Code: 400. Errors:\n\n* no grant for user nobody: send the user through auth-url first"},
	} {
		_, stderr, err := e.cli(t, tc.args...)
		if err == nil || !strings.HasSuffix(strings.TrimRight(stderr, "\n"), tc.want) {
			t.Errorf("vault %s printed\n%s\nwant it to end with\n%s", strings.Join(tc.args, " "), stderr, tc.want)
		}
	}

	e.standin.SetFault(standin.Fault{Kind: standin.FaultServerError, Count: 1})
	_, stderr, err := e.cli(t, "read", e.path("token"))
	want := "Code: 502. Errors:\n\n* 1 error occurred:\n\t* ev.energy failed the token request with HTTP 500"
	if err == nil || !strings.HasSuffix(strings.TrimRight(stderr, "\n"), want) {
		t.Errorf("vault read token during a 500 at ev.energy printed\n%s\nwant it to end with\n%s", stderr, want)
	}
}
