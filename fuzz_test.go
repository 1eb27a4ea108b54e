package evenergy

import (
	"bytes"
	"errors"
	"fmt"
	"html/template"
	"maps"
	"net/http"
	"net/netip"
	"net/url"
	"slices"
	"strings"
	"testing"

	"github.com/hashicorp/vault/sdk/helper/errutil"
	"github.com/hashicorp/vault/sdk/logical"
)

// Fuzz targets for the field parsers and the unauthenticated callback. `go test` runs their seeds;
// `go test -run '^$' -fuzz '^FuzzName$' .` fuzzes one. Every input gets a fresh unit backend.

// fuzzBaseURL refuses connections: nothing a fuzzed request does leaves the machine.
const fuzzBaseURL = "http://127.0.0.1:1"

// existsBefore is the bit of a fuzzed write's sent mask that stores an entry before the write, so
// that updates are fuzzed as well as creates.
const existsBefore = 0x80

// serve runs one request as Vault's core and HTTP layer do, and returns the HTTP status Vault would
// answer with (0: a success with a body; Vault answers 200 or 204).
func serve(t *testing.T, b *backend, s logical.Storage, op logical.Operation, path string, data map[string]any) (*logical.Response, int, error) {
	t.Helper()
	req := &logical.Request{Operation: op, Path: path, Storage: s, Data: data}
	if op == logical.UpdateOperation {
		// Vault's core runs the existence check first (vault/request_handling.go existenceCheck): it
		// picks create or update, and an error of it that is not a UserError becomes a 500 "internal
		// error" (a plugin's storage errors reach it as plain errors, through gRPC).
		checkFound, exists, err := b.HandleExistenceCheck(t.Context(), req)
		_, userErr := err.(errutil.UserError)
		switch {
		case errors.Is(err, logical.ErrUnsupportedPath): // Vault fails it later, at routing
		case userErr:
			return nil, http.StatusBadRequest, fmt.Errorf("existence check: %w", err)
		case err != nil:
			return nil, http.StatusInternalServerError, fmt.Errorf("existence check: %w", err)
		case checkFound && !exists:
			req.Operation = logical.CreateOperation
		}
	}
	resp, err := b.HandleRequest(t.Context(), req)
	status, statusErr := logical.RespondErrorCommon(req, resp, err)
	if statusErr != nil {
		logical.AdjustErrorStatusCode(&status, statusErr) // as Vault's respondError: a coded error keeps its code
	}
	return resp, status, err
}

// mustWrite is a setup write that must succeed.
func mustWrite(t *testing.T, b *backend, s logical.Storage, path string, data map[string]any) *logical.Response {
	t.Helper()
	resp, status, err := serve(t, b, s, logical.UpdateOperation, path, data)
	if status != 0 {
		t.Fatalf("setup write %s %v: HTTP %d %v %v", path, data, status, resp, err)
	}
	return resp
}

func is4xx(status int) bool { return status >= 400 && status < 500 }

// fuzzData is the data of a fuzzed write: names[i] is sent, with values[i], when bit i of sent is set.
func fuzzData(sent uint8, names []string, values ...string) map[string]any {
	data := map[string]any{}
	for i, name := range names {
		if sent&(1<<i) != 0 {
			data[name] = values[i]
		}
	}
	return data
}

// snapshot is every entry of s, by key; s is the inner storage, which takes relative keys too.
func snapshot(t *testing.T, s logical.Storage) map[string]string {
	t.Helper()
	entries := map[string]string{}
	var walk func(prefix string)
	walk = func(prefix string) {
		keys, err := s.List(t.Context(), prefix)
		if err != nil {
			t.Fatal(err)
		}
		for _, k := range keys {
			if strings.HasSuffix(k, "/") {
				walk(prefix + k)
				continue
			}
			entry, err := s.Get(t.Context(), prefix+k)
			if err != nil || entry == nil {
				t.Fatalf("storage lists %q but gives %v %v", prefix+k, entry, err)
			}
			entries[prefix+k] = string(entry.Value)
		}
	}
	walk("")
	return entries
}

// wantUnchanged fails when storage differs from before, naming the keys that changed.
func wantUnchanged(t *testing.T, before, after map[string]string, what string) {
	t.Helper()
	if maps.Equal(before, after) {
		return
	}
	var changed []string
	for k, v := range before {
		if w, ok := after[k]; !ok || w != v {
			changed = append(changed, k)
		}
	}
	for k := range after {
		if _, ok := before[k]; !ok {
			changed = append(changed, k)
		}
	}
	slices.Sort(changed)
	t.Fatalf("%s, yet changed storage entries %q", what, changed)
}

// urlProblem says what is wrong with a URL the engine would call or send users to; "" when nothing.
// It reads the raw string as well as url.Parse's result, which hides an empty query ("https://h?") or
// fragment ("https://h#").
func urlProblem(raw string) string {
	if strings.ContainsAny(raw, "?#") {
		return "it has a query or fragment"
	}
	u, err := url.Parse(raw)
	if err != nil {
		return "it does not parse: " + err.Error()
	}
	_, afterScheme, _ := strings.Cut(raw, "//")
	if authority, _, _ := strings.Cut(afterScheme, "/"); u.User != nil || strings.Contains(authority, "@") {
		return "it carries user info"
	}
	if u.Host == "" {
		return "it has no host"
	}
	if u.Scheme == "https" {
		return ""
	}
	if u.Scheme != "http" {
		return "its scheme is neither https nor http"
	}
	if addr, err := netip.ParseAddr(u.Hostname()); strings.EqualFold(u.Hostname(), "localhost") || err == nil && addr.Unmap().IsLoopback() {
		return ""
	}
	return "it is http:// to a host that is not loopback"
}

func FuzzCheckURL(f *testing.F) {
	for _, raw := range []string{
		"", "https://api.ev.energy", "https://api.ev.energy/", "https://api.ev.energy/v1/", "HTTPS://API.EV.ENERGY",
		"http://api.ev.energy", "http://localhost:8200", "http://LOCALHOST", "http://localhost.", "http://127.0.0.1:1",
		"http://127.1", "http://[::1]:8200", "http://[::ffff:127.0.0.1]", "http://[::1%25lo]", "http://0.0.0.0",
		"https://user:pass@api.ev.energy", "https://@api.ev.energy", "http://evil.example@127.0.0.1", "http://127.0.0.1@evil.example",
		"https://api.ev.energy?x=1", "https://api.ev.energy/#frag",
		"https:api.ev.energy", "https:///path", "//api.ev.energy", "api.ev.energy", "javascript:alert(1)", "ftp://api.ev.energy",
		"https://api.ev.energy/%00", "https://api.ev.energy/..", "https://ev.énergie.example", "https://api.ev.energy\\@evil",
		"https://[::1", "https://api.ev.energy:99999", "https://" + strings.Repeat("a", 1<<12),
	} {
		f.Add(raw)
	}
	f.Fuzz(func(t *testing.T, raw string) {
		if checkURL("base_url", raw) != nil {
			return
		}
		if problem := urlProblem(raw); problem != "" {
			t.Fatalf("checkURL accepts %q, but %s", raw, problem)
		}
	})
}

var configFields = []string{"client_id", "client_secret", "base_url", "scopes", "request_timeout", "refresh_window"}

func FuzzConfigWrite(f *testing.F) {
	const all = 0x3f
	for _, seed := range []struct {
		sent                                                             uint8
		clientID, secret, baseURL, scopes, requestTimeout, refreshWindow string
	}{
		{all, "app", "s3cret", "https://api.ev.energy", "vehicle:read,charging_session:read", "30s", "10m"},
		{all | existsBefore, "app", "", "http://[::1]:8200/", "", "1h", "0"},
		{0, "", "", "", "", "", ""},
		{existsBefore, "", "", "", "", "", ""},
		{existsBefore | 1<<4, "", "", "", "", "-1", ""},            // only a negative request_timeout
		{existsBefore | 1, "other-app", "", "", "", "", ""},        // a new client_id without its secret
		{all, "  ", "x", "https://api.ev.energy", "", "30", "600"}, // a blank client_id
		{all, "app", "x", "https://user:pass@api.ev.energy", "", "30", "600"},
		{all, "app", "x", "http://api.ev.energy", "", "30", "600"},
		{all, "app", "x", "https://api.ev.energy/..", " , ,", "1ns", "1d"},
		{all, "app", "x", "https://%00", "%00", "0", "-10m"},
		{all, "ü", "ü", "https://ev.énergie.example", "ü", "1e3", "9223372036854775807"},
		{all, "app", "x", "https://api.ev.energy", "", "9223372036s", "99999999999999999999"},
		{all, strings.Repeat("a", 1<<12), strings.Repeat("s", 1<<12), "https://" + strings.Repeat("a", 1<<12), strings.Repeat("s,", 1<<11), "30s", "1h"},
	} {
		f.Add(seed.sent, seed.clientID, seed.secret, seed.baseURL, seed.scopes, seed.requestTimeout, seed.refreshWindow)
	}
	f.Fuzz(func(t *testing.T, sent uint8, clientID, secret, baseURL, scopes, requestTimeout, refreshWindow string) {
		b, s := newUnitBackend(t)
		if sent&existsBefore != 0 {
			mustWrite(t, b, s, configPath, map[string]any{"client_id": "app", "client_secret": "s3cret", "scopes": "vehicle:read"})
		}
		before := snapshot(t, s)
		data := fuzzData(sent, configFields, clientID, secret, baseURL, scopes, requestTimeout, refreshWindow)
		resp, status, err := serve(t, b, s, logical.UpdateOperation, configPath, data)
		switch {
		case is4xx(status):
			wantUnchanged(t, before, snapshot(t, s), fmt.Sprintf("config write %q was refused with HTTP %d", data, status))
			return
		case status != 0:
			t.Fatalf("config write %q (config stored before: %v): HTTP %d, want success or 4xx: %v %v", data, sent&existsBefore != 0, status, resp, err)
		}
		read, err := request(t, b, s, logical.ReadOperation, configPath, nil)
		if err != nil || read == nil {
			t.Fatalf("config write %q succeeded, but reading it back gives %v %v", data, read, err)
		}
		if _, ok := read.Data["client_secret"]; ok {
			t.Fatalf("reading config back returns its client_secret")
		}
		baseURL = read.Data["base_url"].(string)
		if err := checkURL("base_url", baseURL); err != nil {
			t.Fatalf("config write %q stored base_url %q, which checkURL refuses: %v", data, baseURL, err)
		}
		if problem := urlProblem(baseURL); problem != "" {
			t.Fatalf("config write %q stored base_url %q, but %s", data, baseURL, problem)
		}
	})
}

var roleFields = []string{"scopes", "ttl", "max_ttl"}

func FuzzRoleWrite(f *testing.F) {
	const all = 0x7
	for _, seed := range []struct {
		sent                      uint8
		name, scopes, ttl, maxTTL string
	}{
		{all, "fleet", "vehicle:read", "1h", "2h"},
		{all | existsBefore, "FLEET", "", "30m", ""}, // an update, of the stored role fleet
		{existsBefore | 1<<1, "fleet", "", "3h", ""}, // ttl above the stored max_ttl
		{0, "fleet", "", "", ""},
		{all, "", "", "", ""},
		{all, "a", "", "-1", "-1s"},
		{all, "a", ",", "0", "0"},
		{all, "a/b", "", "", ""},
		{all, "..", "", "", ""},
		{all, "a%00", "%00", "1d", "2d"},
		{all, "ü", "ü", "1h", "1"},
		{all, "a", "", "9223372036", "9223372037"},
		{all, "a", "", "1e3", "99999999999999999999"},
		{all, strings.Repeat("a", 1<<12), strings.Repeat("s,", 1<<11), "3600", "7200"},
	} {
		f.Add(seed.sent, seed.name, seed.scopes, seed.ttl, seed.maxTTL)
	}
	f.Fuzz(func(t *testing.T, sent uint8, name, scopes, ttl, maxTTL string) {
		b, inmem := newUnitBackend(t)
		s := barrierStorage{inmem}
		if sent&existsBefore != 0 {
			mustWrite(t, b, s, rolePrefix+"fleet", map[string]any{"ttl": "1h", "max_ttl": "2h"})
		}
		before := snapshot(t, inmem)
		path := rolePrefix + name
		data := fuzzData(sent, roleFields, scopes, ttl, maxTTL)
		resp, status, err := serve(t, b, s, logical.UpdateOperation, path, data)
		switch {
		case is4xx(status):
			wantUnchanged(t, before, snapshot(t, inmem), fmt.Sprintf("write %q %q was refused with HTTP %d", path, data, status))
			return
		case status != 0:
			t.Fatalf("write %q %q (role fleet stored before: %v): HTTP %d, want success or 4xx: %v %v", path, data, sent&existsBefore != 0, status, resp, err)
		}
		read, err := request(t, b, s, logical.ReadOperation, path, nil)
		if err != nil || read == nil {
			t.Fatalf("write %q %q succeeded, but reading it back gives %v %v", path, data, read, err)
		}
		if ttl, maxTTL := read.Data["ttl"].(int64), read.Data["max_ttl"].(int64); ttl < 0 || maxTTL < 0 || maxTTL > 0 && ttl > maxTTL {
			t.Fatalf("write %q %q stored ttl %d and max_ttl %d", path, data, ttl, maxTTL)
		}
	})
}

// newConfiguredBackend is a unit backend configured against fuzzBaseURL, on storage that refuses
// relative keys as Vault's barrier does; inmem is the storage under it.
func newConfiguredBackend(t *testing.T) (b *backend, s, inmem logical.Storage) {
	t.Helper()
	b, inmem = newUnitBackend(t)
	s = barrierStorage{inmem}
	mustWrite(t, b, s, configPath, map[string]any{"client_id": "app", "client_secret": "s3cret", "base_url": fuzzBaseURL})
	return b, s, inmem
}

func FuzzUserName(f *testing.F) {
	for _, user := range []string{
		"driver-1", "a", "A", "_", "a@example.com", "a+b", "entity.1f2e", "", ".", "..", ".a", "a/b",
		"a/token", "a/", "/a", "a\n", "a b", "%00", "a%00", "\x00", "ü", "aü", "a\xff", strings.Repeat("a", 1<<12),
	} {
		f.Add(user)
	}
	f.Fuzz(func(t *testing.T, user string) {
		b, s, _ := newConfiguredBackend(t)
		// wantRoutedAnswer fails on a 5xx, and on a user name that userNamePattern accepts but no path takes.
		wantRoutedAnswer := func(op logical.Operation, path string, data map[string]any) int {
			t.Helper()
			resp, status, err := serve(t, b, s, op, path, data)
			switch {
			case errors.Is(err, logical.ErrUnsupportedPath):
				if userNamePattern.MatchString(user) {
					t.Fatalf("userNamePattern accepts %q, but %s %q does not route", user, op, path)
				}
			case status != 0 && !is4xx(status):
				t.Fatalf("%s %q %v: HTTP %d, want success, 4xx or an unsupported path: %v %v", op, path, data, status, resp, err)
			}
			return status
		}
		authURLStatus := wantRoutedAnswer(logical.UpdateOperation, "auth-url/"+user, map[string]any{"redirect_uri": "https://app.example.com/cb"})
		readStatus := wantRoutedAnswer(logical.ReadOperation, userPrefix+user, nil)
		wantRoutedAnswer(logical.UpdateOperation, userPrefix+user, map[string]any{"state": strings.Repeat("A", 26), "code": "c"}) // nothing pending
		wantRoutedAnswer(logical.UpdateOperation, userPrefix+user, nil)
		wantRoutedAnswer(logical.ReadOperation, userPrefix+user+"/token", nil)
		wantRoutedAnswer(logical.DeleteOperation, userPrefix+user, nil)
		// A user auth-url accepts must have a grant key storage takes: users/<user> is then a 404 (no
		// grant yet), not an error about the key.
		if authURLStatus == 0 && readStatus != http.StatusNotFound {
			t.Fatalf("auth-url accepts user %q, but reading %q answers HTTP %d: Vault could never store the user's grant", user, userPrefix+user, readStatus)
		}
	})
}

// pendingState in a fuzzed callback state stands for the state of a real pending authorization.
const pendingState = "$STATE"

// newPendingBackend is a configured backend with one pending authorization, of user driver-1.
func newPendingBackend(t *testing.T) (b *backend, s, inmem logical.Storage, state string) {
	t.Helper()
	b, s, inmem = newConfiguredBackend(t)
	resp := mustWrite(t, b, s, "auth-url/driver-1", map[string]any{"redirect_uri": "https://app.example.com/cb"})
	return b, s, inmem, resp.Data["state"].(string)
}

// servePage runs a callback request; it must answer with the HTML page.
func servePage(t *testing.T, b *backend, s logical.Storage, data map[string]any) (int, string) {
	t.Helper()
	resp, status, err := serve(t, b, s, logical.ReadOperation, "callback", data)
	if err != nil || resp == nil {
		t.Fatalf("callback %q answers HTTP %d with Vault's JSON error, not the page: %v %v", data, status, resp, err)
	}
	body, _ := resp.Data[logical.HTTPRawBody].([]byte)
	contentType, _ := resp.Data[logical.HTTPContentType].(string)
	pageStatus, _ := resp.Data[logical.HTTPStatusCode].(int)
	if !strings.HasPrefix(contentType, "text/html") || !bytes.HasPrefix(body, []byte("<!DOCTYPE html>")) || pageStatus == 0 {
		t.Fatalf("callback %q answers %v, not the HTML page", data, resp.Data)
	}
	return pageStatus, string(body)
}

var textEscaper = template.Must(template.New("text").Parse(`{{.}}`))

// htmlText is s as the callback page writes text: html/template's escaping in element content.
func htmlText(t *testing.T, s string) string {
	t.Helper()
	var b strings.Builder
	if err := textEscaper.Execute(&b, s); err != nil {
		t.Fatal(err)
	}
	return b.String()
}

// callbackFixedText is what the engine itself writes on each callback page that fuzzing can reach.
func callbackFixedText(t *testing.T) string {
	t.Helper()
	var pages []string
	for _, data := range []map[string]any{
		{"state": "x", "code": "c"},                       // unknown state
		{"state": pendingState, "code": ""},               // no code
		{"state": pendingState, "code": "c"},              // ev.energy unreachable
		{"state": pendingState, "error": "access_denied"}, // the user said no
		{"state": pendingState, "error": "e"},             // ev.energy's other errors
	} {
		b, s, _, state := newPendingBackend(t)
		data["state"] = strings.ReplaceAll(data["state"].(string), pendingState, state)
		_, body := servePage(t, b, s, data)
		pages = append(pages, body)
	}
	return strings.Join(pages, "\x00")
}

func FuzzCallback(f *testing.F) {
	for _, seed := range [][4]string{ // state, code, error, error_description
		{pendingState, "a-real-looking-code", "", ""},
		{pendingState, "", "", ""},
		{pendingState, "a-real-looking-code", "access_denied", "The user <b>denied</b> access"},
		{pendingState, "", "access_denied", ""},
		{pendingState + "x", "a-real-looking-code", "", ""},
		{"../" + pendingState, "a-real-looking-code", "", ""},
		{"", "", "", ""},
		{"..", "../config", "", ""},
		{"../config", "c", "", ""},
		{"a/b", "c", "", ""},
		{strings.Repeat("A", 26), "a-real-looking-code", "", ""},
		{strings.Repeat("A", 27), "c", "", ""},
		{"%00", "%00", "%00", "%00"},
		{"\x00", "<script>alert(1)</script>", "<script>", "</p><p>"},
		{"ü", "code-with-ümlauts", "ü", "ü"},
		{"AAAAAAAAAAAAAAAAAAAAAAAAA1", strings.Repeat("c", 1<<12), strings.Repeat("e", 1<<12), strings.Repeat("d", 1<<12)},
	} {
		f.Add(seed[0], seed[1], seed[2], seed[3])
	}
	var fixedText string // set by the first call: the fuzz function runs one input at a time
	f.Fuzz(func(t *testing.T, state, code, oauthErr, errDesc string) {
		if fixedText == "" {
			fixedText = callbackFixedText(t)
		}
		b, s, inmem, pending := newPendingBackend(t)
		state = strings.ReplaceAll(state, pendingState, pending)
		data := map[string]any{"state": state, "code": code, "error": oauthErr, "error_description": errDesc}
		before := snapshot(t, inmem)
		status, body := servePage(t, b, s, data)

		// Only the real state with a code and no error gets the code exchanged, which fails with a 502:
		// ev.energy is unreachable here.
		if exchanged := state == pending && oauthErr == "" && code != ""; exchanged && status != http.StatusBadGateway ||
			!exchanged && !is4xx(status) {
			t.Fatalf("callback %q (pending state %s): page with HTTP %d, want 4xx (502 after an exchange with unreachable ev.energy): %s", data, pending, status, body)
		}

		// The page says what error came in its own words, never error_description; the code may
		// show only where the fixed text or those words hold it.
		words := htmlText(t, authorizationErrorDetails(oauthErr))
		if len(errDesc) >= 8 && strings.Contains(body, htmlText(t, errDesc)) && !strings.Contains(fixedText+words, htmlText(t, errDesc)) {
			t.Fatalf("callback %q: the page shows error_description", data)
		}
		if len(code) >= 8 && !strings.Contains(fixedText, code) && !strings.Contains(fixedText, htmlText(t, code)) {
			rest := strings.ReplaceAll(body, words, "\x00")
			if strings.Contains(rest, code) || strings.Contains(rest, htmlText(t, code)) {
				t.Fatalf("callback %q: the page shows the code: %s", data, body)
			}
		}

		// The pending authorization is single use: the real state consumes it, whatever else came.
		want := maps.Clone(before)
		if state == pending {
			key, _ := pendingKey(pending)
			delete(want, key)
		}
		wantUnchanged(t, want, snapshot(t, inmem), fmt.Sprintf("callback %q authorized nobody", data))
	})
}
