package evenergy

import (
	"bytes"
	"context"
	"net/url"
	"os/exec"
	"regexp"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/chromedp/chromedp"
)

// chromiumPath finds the Chromium that scripts/install-chromium.sh installs.
func chromiumPath(t *testing.T) string {
	t.Helper()
	p, err := exec.LookPath("chromium")
	if err != nil {
		t.Fatal("chromium is not installed: run scripts/install-chromium.sh (or `make chromium`), then run this test again")
	}
	return p
}

// lockedBuffer collects the browser's output, which chromedp writes from its own goroutine.
type lockedBuffer struct {
	mu  sync.Mutex
	buf bytes.Buffer
}

func (b *lockedBuffer) Write(p []byte) (int, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.Write(p)
}

// redacted is s without URL queries, which carry codes and states.
func (b *lockedBuffer) redacted() string {
	b.mu.Lock()
	defer b.mu.Unlock()
	return redactQueries(b.buf.String())
}

var urlQuery = regexp.MustCompile(`\?[^\s"'<>]*`)

func redactQueries(s string) string { return urlQuery.ReplaceAllString(s, "?…") }

// withoutQuery is u without its query and fragment, for messages: the query holds the code and state.
func withoutQuery(u string) string {
	parsed, err := url.Parse(u)
	if err != nil {
		return "(unparsable URL)"
	}
	parsed.RawQuery, parsed.Fragment = "", ""
	return parsed.String()
}

// TestAccBrowserAuthorizationFlow walks the authorization code flow as a user does, in a real
// headless Chromium: auth-url, the stand-in's consent page, its redirect to this mount's
// unauthenticated callback, and the page Vault answers there.
func TestAccBrowserAuthorizationFlow(t *testing.T) {
	t.Parallel()
	chromium := chromiumPath(t)
	e := newAccEnv(t)

	const user = "driver-7"
	const account = "ada.driver7@example.com" // what the user types on the consent page
	callbackURL := e.vault.Address() + "/v1/" + e.mount + "/callback"
	authURL := e.write(t, "auth-url/"+user, map[string]any{"redirect_uri": callbackURL})
	authorizeURL, _ := authURL.Data["authorize_url"].(string)
	if !strings.HasPrefix(authorizeURL, e.url+"/o/authorize/") {
		t.Fatalf("authorize_url %q does not point at the stand-in %s", withoutQuery(authorizeURL), e.url)
	}

	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()

	var browserOutput lockedBuffer
	defer func() {
		if t.Failed() {
			t.Logf("Chromium output (URL queries redacted):\n%s", browserOutput.redacted())
		}
	}()
	// chromedp gives the browser a fresh temporary --user-data-dir, and removes it (killing any
	// leftover child processes first) when the allocator is canceled.
	opts := append(chromedp.DefaultExecAllocatorOptions[:],
		chromedp.ExecPath(chromium),
		chromedp.Flag("headless", true),
		chromedp.Flag("no-sandbox", true), // the tests run as root, where Chromium's sandbox cannot start
		chromedp.Flag("disable-gpu", true),
		chromedp.Flag("disable-quic", true),
		chromedp.Flag("no-first-run", true),
		chromedp.Flag("disable-background-networking", true),
		chromedp.Flag("disable-component-update", true),
		chromedp.Flag("disable-sync", true),
		chromedp.CombinedOutput(&browserOutput),
	)
	allocCtx, cancelAlloc := chromedp.NewExecAllocator(ctx, opts...)
	defer cancelAlloc() // after the browser closes: waits for the process and removes its profile
	browserCtx, cancelBrowser := chromedp.NewContext(allocCtx)
	defer cancelBrowser()

	step := func(what string, actions ...chromedp.Action[chromedp.Void]) {
		t.Helper()
		if err := chromedp.Do(browserCtx, actions...); err != nil {
			t.Fatalf("browser: %s: %s", what, redactQueries(err.Error()))
		}
	}
	step("open the consent page", chromedp.Navigate(authorizeURL), chromedp.WaitVisible(chromedp.ID("authorize")))
	step("fill in the ev.energy account", chromedp.SetValue(chromedp.ID("user"), account))

	// Authorize: the stand-in redirects the browser to Vault's callback, which exchanges the code.
	resp, err := chromedp.RunResponse(browserCtx, chromedp.Click(chromedp.ID("authorize")))
	if err != nil {
		t.Fatalf("browser: authorize: %s", redactQueries(err.Error()))
	}
	step("wait for Vault's callback page", chromedp.WaitVisible(chromedp.ID("result")))
	result, err := chromedp.Run(browserCtx, chromedp.Text(chromedp.ID("result")))
	if err != nil {
		t.Fatalf("browser: read #result: %v", err)
	}
	location, err := chromedp.Run(browserCtx, chromedp.Location())
	if err != nil {
		t.Fatalf("browser: read the location: %v", err)
	}
	if !strings.HasPrefix(location, callbackURL+"?") {
		t.Fatalf("the browser ended at %s, want Vault's callback %s", withoutQuery(location), callbackURL)
	}
	if q, _ := url.Parse(location); q == nil || q.Query().Get("code") == "" || q.Query().Get("state") == "" {
		t.Errorf("the callback URL the browser ended at has no code and state")
	}
	if result != "Connected" || resp.Status != 200 {
		message, _ := chromedp.Run(browserCtx, chromedp.Text(chromedp.CSS("p")))
		t.Fatalf("Vault's callback page answered HTTP %d %q (%s), want 200 \"Connected\"", resp.Status, result, message)
	}

	if status := e.read(t, "users/"+user).Data["status"]; status != "active" {
		t.Fatalf("users/%s status = %v, want active", user, status)
	}
	info, _ := e.standin.Token(e.standinToken(t, e.read(t, "users/"+user+"/token")))
	switch {
	case info.User != account:
		t.Errorf("the access_token is for ev.energy user %q, want %q as typed on the consent page", info.User, account)
	case info.Grant != "authorization_code" || info.ClientID != testClientID:
		t.Errorf("the access_token came from grant %q for client %q, want authorization_code for %q", info.Grant, info.ClientID, testClientID)
	}
}
