package evenergy

import (
	"bytes"
	"context"
	"image/png"
	"net/url"
	"os"
	"os/exec"
	"path/filepath"
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

// callbackURLValues are the values in the query of a callback URL, which the page must never show.
func callbackURLValues(t *testing.T, location string) []string {
	t.Helper()
	parsed, err := url.Parse(location)
	if err != nil {
		t.Fatalf("the callback URL does not parse: %v", err)
	}
	var values []string
	for _, name := range []string{"code", "state"} {
		if v := parsed.Query().Get(name); v != "" {
			values = append(values, v)
		}
	}
	return values
}

// checkCallbackPage checks what a person reads on the callback page: every wanted sentence, and no
// value from the callback URL's query (in its text or its markup). It also checks that the page is
// self-contained.
func checkCallbackPage(t *testing.T, ctx context.Context, location string, want ...string) {
	t.Helper()
	visible, err := chromedp.Run(ctx, chromedp.Text(chromedp.CSS("body")))
	if err != nil {
		t.Fatalf("browser: read the page's text: %v", err)
	}
	html, err := chromedp.Run(ctx, chromedp.Evaluate[string](`document.documentElement.outerHTML`))
	if err != nil {
		t.Fatalf("browser: read the page's HTML: %v", err)
	}
	for _, w := range want {
		if !strings.Contains(visible, w) {
			t.Errorf("the page does not say %q; it reads:\n%s", w, visible)
		}
	}
	for _, v := range callbackURLValues(t, location) {
		if strings.Contains(html, v) {
			t.Errorf("the page carries a code or state value from its URL; it reads:\n%s", strings.ReplaceAll(visible, v, "…"))
		}
	}
	// The page must work with scripts and fetches forbidden: nothing runs, nothing is loaded.
	external, err := chromedp.Run(ctx, chromedp.Evaluate[[]string](
		`[...document.scripts].map(s => "script " + (s.src || "inline")).concat(performance.getEntriesByType("resource").map(r => r.name))`))
	if err != nil {
		t.Fatalf("browser: list scripts and loaded resources: %v", err)
	}
	if len(external) != 0 {
		t.Errorf("the page has scripts or loaded resources, want none: %s", redactQueries(strings.Join(external, ", ")))
	}
}

// screenshotDir is where the screenshots go: $EVENERGY_SCREENSHOTS, for a person to look at, or
// else a temporary directory.
func screenshotDir(t *testing.T) string {
	t.Helper()
	dir := os.Getenv("EVENERGY_SCREENSHOTS")
	if dir == "" {
		return t.TempDir()
	}
	if err := os.MkdirAll(dir, 0o755); err != nil {
		t.Fatal(err)
	}
	return dir
}

// screen is a browser window size the callback page must read well at.
type screen struct {
	name          string
	width, height int64
	scale         float64
	phone         bool
}

var screens = []screen{
	{name: "phone", width: 390, height: 844, scale: 2, phone: true},
	{name: "desktop", width: 1280, height: 800, scale: 1},
}

// screenshotPage captures the current page at every screen size into dir as <name>-<screen>.png,
// checking that each is a PNG of the screen's size and that the page fits the screen's width.
func screenshotPage(t *testing.T, ctx context.Context, dir, name string) {
	t.Helper()
	for _, s := range screens {
		opts := []chromedp.EmulateViewportOption{chromedp.EmulateScale(s.scale)}
		if s.phone {
			// A mobile viewport lays the page out 980 pixels wide unless it asks for the device's width.
			opts = append(opts, chromedp.EmulateMobile, chromedp.EmulateTouch, chromedp.EmulatePortrait)
		}
		if err := chromedp.Do(ctx, chromedp.EmulateViewport(s.width, s.height, opts...)); err != nil {
			t.Fatalf("browser: emulate the %s screen: %v", s.name, err)
		}
		widths, err := chromedp.Run(ctx, chromedp.Evaluate[[]int64](`[document.documentElement.clientWidth, document.documentElement.scrollWidth]`))
		if err != nil {
			t.Fatalf("browser: measure the page on the %s screen: %v", s.name, err)
		}
		if widths[0] != s.width || widths[1] > s.width {
			t.Errorf("on the %s screen the page is laid out %d pixels wide and scrolls to %d, want %d and no sideways scrolling", s.name, widths[0], widths[1], s.width)
		}
		shot, err := chromedp.Run(ctx, chromedp.FullScreenshot(100)) // quality 100 is PNG
		if err != nil {
			t.Fatalf("browser: screenshot on the %s screen: %v", s.name, err)
		}
		img, err := png.DecodeConfig(bytes.NewReader(shot))
		if err != nil {
			t.Fatalf("the %s screenshot of the %s page is not a PNG (%d bytes): %v", s.name, name, len(shot), err)
		}
		if wantWidth := int(float64(s.width) * s.scale); img.Width != wantWidth || img.Height < int(float64(s.height)*s.scale) {
			t.Errorf("the %s screenshot of the %s page is %dx%d, want %d wide and at least the screen's height", s.name, name, img.Width, img.Height, wantWidth)
		}
		file := filepath.Join(dir, name+"-"+s.name+".png")
		if err := os.WriteFile(file, shot, 0o644); err != nil {
			t.Fatal(err)
		}
		t.Logf("screenshot: %s", file)
	}
}

// TestAccBrowserAuthorizationFlow walks the authorization code flow as a user does, in a real
// headless Chromium: auth-url, the stand-in's consent page, its redirect to this mount's
// unauthenticated callback, and the page Vault answers there, once allowing access, once not,
// and once for a link a Vault entity made for itself, which shows a confirmation code. It
// screenshots the pages at phone and desktop sizes into $EVENERGY_SCREENSHOTS, if set.
func TestAccBrowserAuthorizationFlow(t *testing.T) {
	t.Parallel()
	chromium := chromiumPath(t)
	e := newAccEnv(t)
	shots := screenshotDir(t)

	const user = "driver-7"
	const account = "ada.driver7@example.com" // what the user types on the consent page
	callbackURL := e.vault.Address() + "/v1/" + e.mount + "/callback"
	authorizeURL := func(user string) string {
		t.Helper()
		authURL := e.write(t, "auth-url/"+user, map[string]any{"redirect_uri": callbackURL})
		authorizeURL, _ := authURL.Data["authorize_url"].(string)
		if !strings.HasPrefix(authorizeURL, e.url+"/o/authorize/") {
			t.Fatalf("authorize_url %q does not point at the stand-in %s", withoutQuery(authorizeURL), e.url)
		}
		return authorizeURL
	}

	ctx, cancel := context.WithTimeout(context.Background(), 120*time.Second)
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
	// leaveConsent clicks a button of the consent page, which sends the browser to Vault's
	// callback, and returns the callback page's HTTP status, #result and URL.
	leaveConsent := func(button string) (int64, string, string) {
		t.Helper()
		resp, err := chromedp.RunResponse(browserCtx, chromedp.Click(chromedp.ID(button)))
		if err != nil {
			t.Fatalf("browser: click %s: %s", button, redactQueries(err.Error()))
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
		return resp.Status, result, location
	}

	step("open the consent page", chromedp.Navigate(authorizeURL(user)), chromedp.WaitVisible(chromedp.ID("authorize")))
	step("fill in the ev.energy account", chromedp.SetValue(chromedp.ID("user"), account))
	// Authorize: the stand-in redirects the browser to Vault's callback, which exchanges the code.
	status, result, location := leaveConsent("authorize")
	if q, _ := url.Parse(location); q == nil || q.Query().Get("code") == "" || q.Query().Get("state") == "" {
		t.Errorf("the callback URL the browser ended at has no code and state")
	}
	if result != "Connected" || status != 200 {
		message, _ := chromedp.Run(browserCtx, chromedp.Text(chromedp.ID("happened")))
		t.Fatalf("Vault's callback page answered HTTP %d %q (%s), want 200 \"Connected\"", status, result, message)
	}
	checkCallbackPage(t, browserCtx, location,
		"Your ev.energy account is now connected to "+testClientID+".",
		"You can close this page and return to "+testClientID+".")
	screenshotPage(t, browserCtx, shots, "connected")

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

	// Cancel: the stand-in redirects with error=access_denied, and the user is told so.
	const refuser = "driver-8"
	step("open the consent page again", chromedp.Navigate(authorizeURL(refuser)), chromedp.WaitVisible(chromedp.ID("cancel")))
	status, result, location = leaveConsent("cancel")
	if q, _ := url.Parse(location); q == nil || q.Query().Get("error") != "access_denied" {
		t.Errorf("canceling at the consent page did not send error=access_denied to the callback")
	}
	if result != "Not connected" || status != 400 {
		t.Fatalf("Vault's callback page answered HTTP %d %q after Cancel, want 400 \"Not connected\"", status, result)
	}
	checkCallbackPage(t, browserCtx, location,
		"You chose not to allow "+testClientID+" to access your ev.energy account, so nothing was connected.",
		"ask "+testClientID+" for a new link and try again.",
		"access_denied")
	screenshotPage(t, browserCtx, shots, "not-connected")

	// A link a Vault entity makes for itself: the page names the Vault user it would connect the
	// account to, and the application by its display name, above the code its maker writes back.
	e.write(t, "config", map[string]any{"display_name": "Acme Fleet"})
	maker, makerID := e.userpass(t, e.selfServicePolicy())("driver-9")
	link, err := maker.Logical().Write(e.path("auth-url/"+makerID), map[string]any{"redirect_uri": callbackURL})
	if err != nil {
		t.Fatalf("auth-url for one's own entity: %v", err)
	}
	step("open the consent page of a link made for oneself", chromedp.Navigate(link.Data["authorize_url"].(string)), chromedp.WaitVisible(chromedp.ID("authorize")))
	status, result, location = leaveConsent("authorize")
	if result != "Not connected yet" || status != 200 {
		t.Fatalf("Vault's callback page answered HTTP %d %q for a link made for oneself, want 200 \"Not connected yet\"", status, result)
	}
	phone := screens[0]
	step("emulate a phone", chromedp.EmulateViewport(phone.width, phone.height, chromedp.EmulateScale(phone.scale), chromedp.EmulateMobile, chromedp.EmulateTouch, chromedp.EmulatePortrait))
	checkCallbackPage(t, browserCtx, location,
		"This connects your ev.energy account to the Vault user driver-9 (userpass login). If that is not you, close this page.",
		"To finish connecting it, enter this code in Acme Fleet yourself, within 10 minutes:",
		"Never give this code to anyone, not even to someone who sent you the link: whoever enters it gets access to your ev.energy account.")
	// On a phone the person reads who gets the account before scrolling, above the code.
	place, err := chromedp.Run(browserCtx, chromedp.Evaluate[[]float64](
		`[document.getElementById("who").getBoundingClientRect().bottom, document.getElementById("confirmation-code").getBoundingClientRect().top, window.innerHeight]`))
	if err != nil {
		t.Fatalf("browser: place #who: %v", err)
	}
	if whoBottom, codeTop, height := place[0], place[1], place[2]; whoBottom > height || whoBottom > codeTop {
		t.Errorf("on a phone, who gets the account ends at %.0f pixels, below the screen (%.0f) or the code (%.0f)", whoBottom, height, codeTop)
	}
	screenshotPage(t, browserCtx, shots, "confirm")
	code, err := chromedp.Run(browserCtx, chromedp.Text(chromedp.ID("confirmation-code")))
	if err != nil {
		t.Fatalf("browser: read #confirmation-code: %v", err)
	}
	if _, err := maker.Logical().Write(e.path("users/"+makerID), map[string]any{"confirmation_code": code}); err != nil {
		t.Fatalf("writing back the code the page showed: %v", err)
	}
	if status := e.read(t, "users/"+makerID).Data["status"]; status != "active" {
		t.Fatalf("users/%s status = %v after the confirmation, want active", makerID, status)
	}
}
