package evenergy

import (
	"net/http"
	"testing"

	"golang.org/x/oauth2"
	"golang.org/x/oauth2/clientcredentials"
)

func TestAccRevokeLeakedToken(t *testing.T) {
	t.Parallel()
	e := newAccEnv(t)
	// A token minted outside Vault, as a leaked one would be.
	leaked, err := (&clientcredentials.Config{
		ClientID: testClientID, ClientSecret: testClientSecret, TokenURL: e.url + "/o/token", AuthStyle: oauth2.AuthStyleInHeader,
	}).Token(t.Context())
	if err != nil {
		t.Fatal(err)
	}
	if !e.standin.Active(leaked.AccessToken) {
		t.Fatal("stand-in did not issue the token")
	}
	e.write(t, "revoke", map[string]any{"token": leaked.AccessToken, "token_type_hint": "access_token"})
	if !e.revoked(leaked.AccessToken) {
		t.Fatal("token still live after evenergy/revoke")
	}
	// ev.energy answers 200 for a token it no longer knows: revoking again is no error.
	e.write(t, "revoke", map[string]any{"token": leaked.AccessToken})

	e.wantWriteError(t, "revoke", map[string]any{"token": "x", "token_type_hint": "id_token"}, http.StatusBadRequest, "token_type_hint must be access_token or refresh_token")
	e.wantWriteError(t, "revoke", map[string]any{}, http.StatusBadRequest, "token is required")

	e.write(t, "config", map[string]any{"client_secret": "wrong"})
	e.wantWriteError(t, "revoke", map[string]any{"token": "anything"}, http.StatusBadRequest, "ev.energy refused the token revocation: invalid_client")
}
