package evenergy

import (
	"context"
	"net/http"
	"strings"
	"testing"
	"time"

	"github.com/hashicorp/vault/sdk/logical"
)

func TestConfigRoundTripHidesSecret(t *testing.T) {
	b, s := newUnitBackend(t)
	resp, err := request(t, b, s, logical.CreateOperation, "config", map[string]any{
		"client_id": "app", "client_secret": "s3cret", "scopes": "vehicle:read,charging_session:read",
	})
	if err != nil || resp.IsError() {
		t.Fatalf("write: %v %v", err, resp)
	}
	resp, err = request(t, b, s, logical.ReadOperation, "config", nil)
	if err != nil {
		t.Fatal(err)
	}
	if _, ok := resp.Data["client_secret"]; ok {
		t.Fatal("config read returned client_secret")
	}
	want := map[string]any{"client_id": "app", "base_url": defaultBaseURL, "request_timeout": int64(30), "refresh_window": int64(600)}
	for k, v := range want {
		if resp.Data[k] != v {
			t.Errorf("%s = %v, want %v", k, resp.Data[k], v)
		}
	}
	if got := strings.Join(resp.Data["scopes"].([]string), " "); got != "vehicle:read charging_session:read" {
		t.Errorf("scopes = %q", got)
	}
}

func TestConfigUpdateKeepsUnsetFields(t *testing.T) {
	b, s := newUnitBackend(t)
	if _, err := request(t, b, s, logical.CreateOperation, "config", map[string]any{"client_id": "app", "client_secret": "s3cret", "request_timeout": "5s"}); err != nil {
		t.Fatal(err)
	}
	if _, err := request(t, b, s, logical.UpdateOperation, "config", map[string]any{"base_url": "https://example.test/"}); err != nil {
		t.Fatal(err)
	}
	cfg, err := getConfig(t.Context(), s)
	if err != nil {
		t.Fatal(err)
	}
	if cfg.ClientSecret != "s3cret" || cfg.ClientID != "app" || cfg.BaseURL != "https://example.test" || cfg.RequestTimeout.Seconds() != 5 {
		t.Fatalf("update lost or mangled fields: id=%q url=%q timeout=%v secret kept=%v", cfg.ClientID, cfg.BaseURL, cfg.RequestTimeout, cfg.ClientSecret == "s3cret")
	}
}

func TestConfigRejectsBadInput(t *testing.T) {
	cases := map[string]struct {
		data map[string]any
		want string
	}{
		"no client_id":        {map[string]any{"client_secret": "x"}, "client_id is required"},
		"plain http":          {map[string]any{"client_id": "a", "base_url": "http://api.ev.energy"}, "must use https://"},
		"not a URL":           {map[string]any{"client_id": "a", "base_url": "api.ev.energy"}, "absolute URL"},
		"query in URL":        {map[string]any{"client_id": "a", "base_url": "https://api.ev.energy?x=1"}, "without query"},
		"zero timeout":        {map[string]any{"client_id": "a", "request_timeout": 0}, "request_timeout must be a positive"},
		"negative window":     {map[string]any{"client_id": "a", "refresh_window": -1}, "cannot provide negative value"},
		"zero window":         {map[string]any{"client_id": "a", "refresh_window": 0}, "refresh_window must be a positive duration"},
		"http to a LAN host":  {map[string]any{"client_id": "a", "base_url": "http://10.0.0.1:8000"}, "loopback"},
		"http to localhostly": {map[string]any{"client_id": "a", "base_url": "http://localhost.evil.test"}, "loopback"},
		"user info in URL":    {map[string]any{"client_id": "a", "base_url": "https://user:pass@api.ev.energy"}, "must not carry user info"},
	}
	for name, tc := range cases {
		t.Run(name, func(t *testing.T) {
			b, s := newUnitBackend(t)
			resp, err := request(t, b, s, logical.CreateOperation, "config", tc.data)
			if err != nil || !resp.IsError() || !strings.Contains(resp.Error().Error(), tc.want) {
				t.Fatalf("want a 400 saying %q, got %v %v", tc.want, resp, err)
			}
			if entry, _ := s.Get(t.Context(), configPath); entry != nil {
				t.Fatal("a rejected config was stored")
			}
		})
	}
}

func TestConfigAllowsLoopbackHTTP(t *testing.T) {
	for _, u := range []string{"http://127.0.0.1:8400", "http://localhost:8400", "http://[::1]:8400", "https://api.ev.energy"} {
		if err := checkURL("base_url", u); err != nil {
			t.Errorf("%s: %v", u, err)
		}
	}
}

func TestAccConfig(t *testing.T) {
	t.Parallel()
	e := newAccEnv(t)
	got := e.read(t, "config")
	if _, ok := got.Data["client_secret"]; ok {
		t.Fatal("config read returned client_secret")
	}
	if got.Data["client_id"] != testClientID || got.Data["base_url"] != e.url {
		t.Fatalf("config read = %v", got.Data)
	}

	e.wantWriteError(t, "config", map[string]any{"base_url": "http://ev.example.com"}, http.StatusBadRequest, "base_url must use https://")
	if e.read(t, "config").Data["base_url"] != e.url {
		t.Fatal("a rejected update changed the stored config")
	}

	if _, err := e.vault.Logical().Delete(e.path("config")); err != nil {
		t.Fatal(err)
	}
	if s := e.read(t, "config"); s != nil {
		t.Fatalf("config still there after delete: %v", s.Data)
	}
	e.wantReadError(t, "token", http.StatusBadRequest, "not configured")
}

func TestConfigNewClientNeedsItsOwnSecret(t *testing.T) {
	b, s := newUnitBackend(t)
	if _, err := request(t, b, s, logical.CreateOperation, "config", map[string]any{"client_id": "app", "client_secret": "s3cret"}); err != nil {
		t.Fatal(err)
	}
	resp, err := request(t, b, s, logical.UpdateOperation, "config", map[string]any{"client_id": "other-app"})
	if err != nil || !resp.IsError() || !strings.Contains(resp.Error().Error(), "client_id changes from app to other-app: give client_secret too") {
		t.Fatalf("want a 400 asking for the new client's secret, got %v %v", resp, err)
	}
	if cfg, _ := getConfig(t.Context(), s); cfg.ClientID != "app" {
		t.Fatal("a refused update changed the config")
	}
	// A public client has no secret: an empty one says so and drops the previous client's.
	if resp, err := request(t, b, s, logical.UpdateOperation, "config", map[string]any{"client_id": "public-app", "client_secret": ""}); err != nil || resp.IsError() {
		t.Fatalf("switching to a public client: %v %v", resp, err)
	}
	if cfg, _ := getConfig(t.Context(), s); cfg.ClientID != "public-app" || cfg.ClientSecret != "" {
		t.Fatalf("config after the switch: client %q, secret kept: %v", cfg.ClientID, cfg.ClientSecret != "")
	}
}

// stalledConfigRead answers the config write's read of the previous config and then holds it
// until release is closed or a generous bound passed, as a write that read the config just before
// another write replaced it.
type stalledConfigRead struct {
	logical.Storage
	reading chan struct{} // closed once the write has read the previous config
	release chan struct{}
}

func (s *stalledConfigRead) Get(ctx context.Context, key string) (*logical.StorageEntry, error) {
	entry, err := s.Storage.Get(ctx, key)
	if key == configPath && s.reading != nil {
		close(s.reading)
		s.reading = nil
		select {
		case <-s.release:
		case <-time.After(3 * time.Second): // the other write waits for this one: it cannot release it
		}
	}
	return entry, err
}

// TestConcurrentConfigWritesEachRetireWhatTheyReplace: A->C reads config A; meanwhile A->B is
// written; A->C then stores C. Both A and B must stay revocable, each with its own secret.
func TestConcurrentConfigWritesEachRetireWhatTheyReplace(t *testing.T) {
	t.Parallel()
	b, s := newUnitBackend(t)
	write := func(s logical.Storage, id, secret string) error {
		resp, err := request(t, b, s, logical.UpdateOperation, "config", map[string]any{"client_id": id, "client_secret": secret})
		if err == nil && resp.IsError() {
			err = resp.Error()
		}
		return err
	}
	if _, err := request(t, b, s, logical.CreateOperation, "config", map[string]any{"client_id": "app-a", "client_secret": "secret-a"}); err != nil {
		t.Fatal(err)
	}
	stalled := &stalledConfigRead{Storage: s, reading: make(chan struct{}), release: make(chan struct{})}
	toC, reading := make(chan error, 1), stalled.reading
	go func() { toC <- write(stalled, "app-c", "secret-c") }()
	<-reading
	if err := write(s, "app-b", "secret-b"); err != nil {
		t.Fatal(err)
	}
	close(stalled.release)
	if err := <-toC; err != nil {
		t.Fatal(err)
	}
	for id, secret := range map[string]string{"app-a": "secret-a", "app-b": "secret-b"} {
		client, err := b.clientFor(t.Context(), s, id)
		if err != nil || client.cfg.ClientSecret != secret {
			t.Errorf("%s cannot revoke its tokens after the concurrent config writes: %v", id, err)
		}
	}
}

// TestConfigReadShowsTheCallbackPageFields: an operator reads back every field the callback page
// depends on, display_name included (docs/api.md's sample response shows it).
func TestConfigReadShowsTheCallbackPageFields(t *testing.T) {
	b, s := newUnitBackend(t)
	written := map[string]any{"client_id": "app", "callback_url": unitCallback, "display_name": "Acme Fleet", "max_self_service_links": 7}
	if resp, err := requestAs(t, b, s, "", logical.CreateOperation, "config", written); err != nil || resp.IsError() {
		t.Fatalf("write: %v %v", err, resp)
	}
	resp, err := requestAs(t, b, s, "", logical.ReadOperation, "config", nil)
	if err != nil {
		t.Fatal(err)
	}
	for k, v := range written {
		if resp.Data[k] != v {
			t.Errorf("config read: %s = %v, want %v", k, resp.Data[k], v)
		}
	}
}
