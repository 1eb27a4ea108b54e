package evenergy

import (
	"errors"
	"net/http"
	"net/http/httptest"
	"testing"
	"time"
)

func TestUpstreamErrorPassesOnOAuthError(t *testing.T) {
	server := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Type", "application/json")
		w.WriteHeader(http.StatusUnauthorized)
		w.Write([]byte(`{"error": "invalid_client", "error_description": "Client authentication failed."}`))
	}))
	defer server.Close()
	client := newClient(&config{ClientID: "app", ClientSecret: "s3cret", BaseURL: server.URL, RequestTimeout: time.Second})

	for op, err := range map[string]error{
		"token request":    func() error { _, err := client.clientCredentialsToken(t.Context(), nil); return err }(),
		"token refresh":    func() error { _, err := client.refresh(t.Context(), "rt"); return err }(),
		"token revocation": client.revoke(t.Context(), "tok", ""),
	} {
		var upstream *upstreamError
		if !errors.As(err, &upstream) || upstream.Code() != http.StatusBadRequest ||
			err.Error() != "ev.energy refused the "+op+": invalid_client: Client authentication failed." {
			t.Errorf("%s: got %v", op, err)
		}
	}
}

func TestUpstreamErrorWhenEvenergyFails(t *testing.T) {
	server := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		http.Error(w, "oops", http.StatusInternalServerError)
	}))
	client := newClient(&config{ClientID: "app", ClientSecret: "s3cret", BaseURL: server.URL, RequestTimeout: time.Second})
	err := client.revoke(t.Context(), "tok", "")
	if upstream, ok := err.(*upstreamError); !ok || upstream.Code() != http.StatusBadGateway || err.Error() != "ev.energy answered the token revocation with HTTP 500" {
		t.Errorf("HTTP 500: got %v", err)
	}
	server.Close()
	_, err = client.clientCredentialsToken(t.Context(), nil)
	if upstream, ok := err.(*upstreamError); !ok || upstream.Code() != http.StatusBadGateway || upstream.Err == nil {
		t.Errorf("unreachable: got %v", err)
	}
}
