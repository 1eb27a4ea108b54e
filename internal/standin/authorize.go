package standin

import (
	"context"
	"errors"
	"fmt"
	"html"
	"html/template"
	"io"
	"net/http"
	"net/http/cookiejar"
	"net/url"
	"regexp"
	"slices"
	"strings"
	"time"
)

// authRequest is a validated authorization request.
type authRequest struct {
	client                                       Client
	redirectURI, scope, state, challenge, method string
}

// authFailure is a refused authorization request. With a redirect URI it goes back to the client
// (RFC 6749 section 4.1.2.1); without one the client or redirect_uri is bad, so DOT tells the user.
type authFailure struct {
	redirectURI, state string
	code, description  string
}

// parseAuthRequest validates the parameters of an authorization request, from the query of
// GET /o/authorize/ or the consent form POSTed back to it.
func (s *Server) parseAuthRequest(params url.Values) (authRequest, *authFailure) {
	id, redirectURI := params.Get("client_id"), params.Get("redirect_uri")
	c, known := s.clients[id]
	switch {
	case id == "":
		return authRequest{}, &authFailure{code: "invalid_request", description: "Missing client_id parameter."}
	case !known:
		return authRequest{}, &authFailure{code: "invalid_request", description: "Invalid client_id parameter value."}
	case redirectURI == "":
		return authRequest{}, &authFailure{code: "invalid_request", description: "Missing redirect URI."}
	case !redirectAllowed(c, redirectURI):
		return authRequest{}, &authFailure{code: "invalid_request", description: "Mismatching redirect URI."}
	}
	req := authRequest{
		client:      c,
		redirectURI: redirectURI,
		state:       params.Get("state"),
		challenge:   params.Get("code_challenge"),
		method:      params.Get("code_challenge_method"),
	}
	fail := func(code, description string) (authRequest, *authFailure) {
		return authRequest{}, &authFailure{redirectURI: redirectURI, state: req.state, code: code, description: description}
	}
	var ok bool
	req.scope, ok = scopeWithin(params.Get("scope"), c.Scopes)
	switch responseType := params.Get("response_type"); {
	case responseType == "":
		return fail("invalid_request", "Missing response_type parameter.")
	case responseType != "code":
		return fail("unsupported_response_type", "")
	case !ok:
		return fail("invalid_scope", "")
	case req.challenge != "" && req.method != "S256":
		// A missing method means "plain" (RFC 7636 section 4.3), which ev.energy's contract does not use.
		return fail("invalid_request", "Transform algorithm not supported.")
	case req.challenge == "" && c.Secret == "":
		return fail("invalid_request", "Code challenge required.") // DOT's PKCE_REQUIRED for public clients
	}
	return req, nil
}

// redirectAllowed reports whether uri may receive c's authorization responses.
func redirectAllowed(c Client, uri string) bool {
	if len(c.RedirectURIs) > 0 {
		return slices.Contains(c.RedirectURIs, uri)
	}
	u, err := url.Parse(uri)
	return err == nil && u.IsAbs() && !strings.Contains(uri, "#") // RFC 6749 section 3.1.2
}

func (s *Server) authorize(w http.ResponseWriter, r *http.Request) {
	if r.Method == http.MethodGet {
		s.mu.Lock()
		req, fail := s.parseAuthRequest(r.URL.Query())
		var code string
		if user := s.approvedBefore(r, req); fail == nil && user != "" {
			code = s.issueCode(req, user)
		}
		s.mu.Unlock()
		switch {
		case fail != nil:
			refuse(w, r, fail)
		case code != "":
			redirect(w, r, req.redirectURI, req.state, url.Values{"code": {code}})
		default:
			consent(w, req)
		}
		return
	}
	if err := r.ParseForm(); err != nil {
		refuse(w, r, &authFailure{code: "invalid_request", description: "Malformed form body."})
		return
	}
	form := r.PostForm
	s.mu.Lock()
	defer s.mu.Unlock()
	req, fail := s.parseAuthRequest(form)
	if fail == nil && strings.TrimSpace(form.Get("user")) == "" {
		fail = &authFailure{code: "login_required", description: "Log in: the user field is empty."}
	}
	if fail != nil {
		refuse(w, r, fail)
		return
	}
	user := strings.TrimSpace(form.Get("user"))
	// The user logged in to reach the consent page, as at DOT, whether or not they allow access.
	session := randomValue()
	s.sessions[session] = user
	http.SetCookie(w, &http.Cookie{Name: sessionCookie, Value: session, Path: "/", HttpOnly: true, SameSite: http.SameSiteLaxMode})
	params := url.Values{}
	if form.Get("allow") != "" {
		params.Set("code", s.issueCode(req, user))
	} else {
		params.Set("error", "access_denied")
	}
	redirect(w, r, req.redirectURI, req.state, params)
}

// sessionCookie is the cookie of a user logged in at the stand-in, as Django's session cookie.
const sessionCookie = "sessionid"

// approvedBefore returns the user logged in with r's session cookie when req asks for
// approval_prompt=auto and that user holds a live access token of req's client covering req's
// scopes: DOT then redirects at once, without a consent page. Call it with s.mu held.
func (s *Server) approvedBefore(r *http.Request, req authRequest) string {
	cookie, err := r.Cookie(sessionCookie)
	if err != nil || r.URL.Query().Get("approval_prompt") != "auto" || s.sessions[cookie.Value] == "" {
		return ""
	}
	user := s.sessions[cookie.Value]
	for _, t := range s.tokens {
		if t.User == user && t.Kind == "access" && t.ClientID == req.client.ID && t.active(s.now()) {
			if _, covered := scopeWithin(req.scope, strings.Fields(t.Scope)); covered {
				return user
			}
		}
	}
	return ""
}

// issueCode issues an authorization code of req for user; call it with s.mu held.
func (s *Server) issueCode(req authRequest, user string) string {
	code := randomValue()
	s.codes[code] = &grant{
		clientID:    req.client.ID,
		user:        user,
		redirectURI: req.redirectURI,
		scope:       req.scope,
		challenge:   req.challenge,
		issued:      s.now(),
	}
	return code
}

func refuse(w http.ResponseWriter, r *http.Request, fail *authFailure) {
	if fail.redirectURI != "" {
		params := url.Values{"error": {fail.code}}
		if fail.description != "" {
			params.Set("error_description", fail.description)
		}
		redirect(w, r, fail.redirectURI, fail.state, params)
		return
	}
	w.Header().Set("Content-Type", "text/html; charset=utf-8")
	w.WriteHeader(http.StatusBadRequest)
	errorPage.Execute(w, map[string]string{"Code": fail.code, "Description": fail.description})
}

// redirect sends the browser back to the client, adding params and state to redirectURI's query.
func redirect(w http.ResponseWriter, r *http.Request, redirectURI, state string, params url.Values) {
	u, _ := url.Parse(redirectURI) // parseAuthRequest checked it
	query := u.Query()
	for name, values := range params {
		query[name] = values
	}
	if state != "" {
		query.Set("state", state)
	}
	u.RawQuery = query.Encode()
	http.Redirect(w, r, u.String(), http.StatusFound)
}

type hiddenField struct{ Name, Value string }

func consent(w http.ResponseWriter, req authRequest) {
	var hidden []hiddenField
	for _, f := range []hiddenField{
		{"client_id", req.client.ID},
		{"redirect_uri", req.redirectURI},
		{"response_type", "code"},
		{"scope", req.scope},
		{"state", req.state},
		{"code_challenge", req.challenge},
		{"code_challenge_method", req.method},
	} {
		if f.Value != "" {
			hidden = append(hidden, f)
		}
	}
	w.Header().Set("Content-Type", "text/html; charset=utf-8")
	consentPage.Execute(w, map[string]any{
		"Client": req.client.ID,
		"Scopes": strings.Fields(req.scope),
		"Hidden": hidden,
	})
}

var consentPage = template.Must(template.New("consent").Parse(`<!DOCTYPE html>
<html>
<head><title>Authorize {{.Client}}?</title></head>
<body>
<h1>Authorize {{.Client}}?</h1>
<p>The application requires the following permissions:</p>
<ul>
{{- range .Scopes}}
<li>{{.}}</li>
{{- end}}
</ul>
<form method="post" action="/o/authorize/">
{{- range .Hidden}}
<input type="hidden" name="{{.Name}}" value="{{.Value}}">
{{- end}}
<label for="user">ev.energy account</label>
<input type="text" name="user" id="user" value="driver@example.com">
<button type="submit" name="allow" value="Authorize" id="authorize">Authorize</button>
<button type="submit" id="cancel">Cancel</button>
</form>
</body>
</html>
`))

var errorPage = template.Must(template.New("error").Parse(`<!DOCTYPE html>
<html>
<head><title>Authorization error</title></head>
<body>
<h1>Error: {{.Code}}</h1>
<p id="error">{{.Description}}</p>
</body>
</html>
`))

var (
	hiddenInput  = regexp.MustCompile(`<input type="hidden" name="([^"]*)" value="([^"]*)">`)
	errorMessage = regexp.MustCompile(`<p id="error">([^<]*)</p>`)
)

// Authorize plays user in a new browser at authorizeURL; see Browser.Authorize.
func (s *Server) Authorize(ctx context.Context, authorizeURL, user string, allow bool) (*url.URL, error) {
	return NewBrowser().Authorize(ctx, authorizeURL, user, allow)
}

// Browser is one person's browser: it keeps the session cookie the stand-in sets when its user logs
// in at the consent page.
type Browser struct{ client *http.Client }

// NewBrowser returns a browser that nobody has logged in with yet.
func NewBrowser() *Browser {
	jar, _ := cookiejar.New(nil) // never fails without options
	return &Browser{client: &http.Client{
		Jar:           jar,
		Timeout:       10 * time.Second,
		CheckRedirect: func(*http.Request, []*http.Request) error { return http.ErrUseLastResponse },
	}}
}

// Authorize plays user in this browser at authorizeURL: it loads the consent page, submits it
// (allowing or denying) and returns where the stand-in redirects the browser. A browser whose user
// logged in and allowed the client before is sent back at once when the URL has
// approval_prompt=auto, without a consent page: user and allow then play no part. When the
// stand-in refuses the request by redirecting with an error, as DOT does once client and
// redirect_uri are valid, that redirect is returned along with the error.
func (b *Browser) Authorize(ctx context.Context, authorizeURL, user string, allow bool) (*url.URL, error) {
	do := func(method, target string, form url.Values) (*http.Response, []byte, error) {
		req, err := http.NewRequestWithContext(ctx, method, target, strings.NewReader(form.Encode()))
		if err != nil {
			return nil, nil, err
		}
		if form != nil {
			req.Header.Set("Content-Type", "application/x-www-form-urlencoded")
		}
		resp, err := b.client.Do(req)
		if err != nil {
			return nil, nil, err
		}
		defer resp.Body.Close()
		body, err := io.ReadAll(resp.Body)
		return resp, body, err
	}

	resp, page, err := do(http.MethodGet, authorizeURL, nil)
	if err != nil {
		return nil, err
	}
	if resp.StatusCode == http.StatusFound {
		location, err := resp.Location()
		if err != nil || location.Query().Has("code") {
			return location, err // approved before: no consent page
		}
		return location, fmt.Errorf("stand-in refused the authorize request: %s %s",
			location.Query().Get("error"), location.Query().Get("error_description"))
	}
	if resp.StatusCode != http.StatusOK {
		return nil, refusal(resp, page)
	}
	if !strings.Contains(string(page), `id="authorize"`) {
		return nil, errors.New("stand-in: the authorize page is not the consent page")
	}

	form := url.Values{}
	for _, m := range hiddenInput.FindAllStringSubmatch(string(page), -1) {
		form.Add(html.UnescapeString(m[1]), html.UnescapeString(m[2]))
	}
	form.Set("user", user)
	if allow {
		form.Set("allow", "Authorize")
	}
	action := resp.Request.URL.ResolveReference(&url.URL{Path: "/o/authorize/"})
	resp, page, err = do(http.MethodPost, action.String(), form)
	if err != nil {
		return nil, err
	}
	if resp.StatusCode != http.StatusFound {
		return nil, refusal(resp, page)
	}
	return resp.Location()
}

// refusal turns the stand-in's HTML error page into an error.
func refusal(resp *http.Response, page []byte) error {
	message := resp.Status
	if m := errorMessage.FindSubmatch(page); m != nil {
		message += ": " + html.UnescapeString(string(m[1]))
	}
	return errors.New("stand-in refused the authorize request: " + message)
}
