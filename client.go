package evenergy

import (
	"cmp"
	"context"
	"errors"
	"io"
	"net/http"
	"net/url"
	"strings"
	"time"

	"golang.org/x/oauth2"
	"golang.org/x/oauth2/clientcredentials"
)

// evenergyClient calls ev.energy's OAuth 2 endpoints as the configured client.
type evenergyClient struct {
	cfg     *config
	http    *http.Client
	metrics *metrics
}

// maxIdleConnections is how many idle connections to ev.energy one client keeps.
const maxIdleConnections = 64

// newClient makes the client of one config, with its own connection pool unless next is given (the
// simulation's in-memory ev.energy); request_timeout bounds each whole call (a retry included)
// through its context, not per attempt. It follows no redirect: a 3xx answer is an error, or the
// client's credentials and tokens would go where it points.
func newClient(cfg *config, m *metrics, next http.RoundTripper) *evenergyClient {
	if next == nil {
		pool := http.DefaultTransport.(*http.Transport).Clone()
		// Every call goes to one host: keep as many idle connections as the readers Vault serves at
		// once use, not net/http's default of 2, or concurrent mints each dial anew.
		pool.MaxIdleConnsPerHost = maxIdleConnections
		next = pool
	}
	transport := timedTransport{next: next, latency: m.latency}
	noRedirects := func(*http.Request, []*http.Request) error { return http.ErrUseLastResponse }
	return &evenergyClient{cfg: cfg, http: &http.Client{Transport: transport, CheckRedirect: noRedirects}, metrics: m}
}

// close lets go of the connections of a client whose config was replaced.
func (c *evenergyClient) close() {
	if pool, ok := c.http.Transport.(timedTransport).next.(*http.Transport); ok {
		pool.CloseIdleConnections()
	}
}

func (c *evenergyClient) tokenURL() string  { return c.cfg.BaseURL + "/o/token" }
func (c *evenergyClient) revokeURL() string { return c.cfg.BaseURL + "/o/revoke_token/" } // 405 without the slash

// clientCredentialsToken mints a token for the client itself; ev.energy wants HTTP Basic here.
func (c *evenergyClient) clientCredentialsToken(ctx context.Context, scopes []string) (*oauth2.Token, error) {
	if c.cfg.ClientSecret == "" {
		return nil, &upstreamError{Op: opToken, Status: http.StatusBadRequest, OAuthCode: "invalid_client",
			Description: "the config has no client_secret, which client-credentials tokens need"}
	}
	cc := clientcredentials.Config{
		ClientID:     c.cfg.ClientID,
		ClientSecret: c.cfg.ClientSecret,
		TokenURL:     c.tokenURL(),
		Scopes:       scopes,
		AuthStyle:    oauth2.AuthStyleInHeader,
	}
	return c.token(ctx, opToken, func(ctx context.Context) (*oauth2.Token, error) { return cc.Token(ctx) })
}

// userConfig is the authorization-code client; ev.energy wants its credentials as form fields.
func (c *evenergyClient) userConfig(redirectURI string, scopes []string) *oauth2.Config {
	return &oauth2.Config{
		ClientID:     c.cfg.ClientID,
		ClientSecret: c.cfg.ClientSecret,
		Endpoint: oauth2.Endpoint{
			AuthURL:   c.cfg.BaseURL + "/o/authorize/",
			TokenURL:  c.tokenURL(),
			AuthStyle: oauth2.AuthStyleInParams,
		},
		RedirectURL: redirectURI,
		Scopes:      scopes,
	}
}

// authorizeURL is where a user approves the client; PKCE S256 is always on.
func (c *evenergyClient) authorizeURL(redirectURI string, scopes []string, state, verifier string) string {
	return c.userConfig(redirectURI, scopes).AuthCodeURL(state, oauth2.S256ChallengeOption(verifier))
}

func (c *evenergyClient) exchangeCode(ctx context.Context, code, verifier, redirectURI string) (*oauth2.Token, error) {
	return c.token(ctx, opExchange, func(ctx context.Context) (*oauth2.Token, error) {
		return c.userConfig(redirectURI, nil).Exchange(ctx, code, oauth2.VerifierOption(verifier))
	})
}

// refresh trades a refresh token for a new access token and, as ev.energy rotates them, a new refresh token.
func (c *evenergyClient) refresh(ctx context.Context, refreshToken string) (*oauth2.Token, error) {
	return c.token(ctx, opRefresh, func(ctx context.Context) (*oauth2.Token, error) {
		return c.userConfig("", nil).TokenSource(ctx, &oauth2.Token{RefreshToken: refreshToken}).Token()
	})
}

// token runs one token-endpoint call through this client's HTTP client, within request_timeout.
func (c *evenergyClient) token(ctx context.Context, op string, call func(context.Context) (*oauth2.Token, error)) (*oauth2.Token, error) {
	ctx = context.WithValue(ctx, oauth2.HTTPClient, c.http)
	var tok *oauth2.Token
	err := c.withRetry(ctx, op, func(ctx context.Context) error {
		var err error
		tok, err = call(ctx)
		return asUpstreamError(op, err)
	})
	if err == nil {
		c.metrics.minted.WithLabelValues(grantTypes[op]).Inc()
	}
	return tok, err
}

// grantTypes are the grant types of the token-endpoint calls, as metrics label them.
var grantTypes = map[string]string{opToken: "client_credentials", opExchange: "authorization_code", opRefresh: "refresh_token"}

// revoke revokes an access or refresh token (RFC 7009); ev.energy answers 200 for tokens already invalid,
// always with an empty body: any other 200 (a proxy's or a maintenance page) confirms nothing.
func (c *evenergyClient) revoke(ctx context.Context, token, hint string) error {
	form := url.Values{"client_id": {c.cfg.ClientID}, "token": {token}}
	if c.cfg.ClientSecret != "" {
		form.Set("client_secret", c.cfg.ClientSecret)
	}
	if hint != "" {
		form.Set("token_type_hint", hint)
	}
	err := c.withRetry(ctx, opRevoke, func(ctx context.Context) error {
		req, err := http.NewRequestWithContext(ctx, http.MethodPost, c.revokeURL(), strings.NewReader(form.Encode()))
		if err != nil {
			return err
		}
		req.Header.Set("Content-Type", "application/x-www-form-urlencoded")
		resp, err := c.http.Do(req)
		if err != nil {
			return asUpstreamError(opRevoke, err)
		}
		defer resp.Body.Close()
		body, _ := io.ReadAll(io.LimitReader(resp.Body, 1<<16))
		if resp.StatusCode == http.StatusOK && len(body) == 0 {
			return nil // ev.energy's confirmation, as oauthlib answers it
		}
		if resp.StatusCode == http.StatusOK {
			return &upstreamError{Op: opRevoke, Status: resp.StatusCode, Fault: faultNotConfirmed}
		}
		return answerError(opRevoke, resp, body)
	})
	if err == nil {
		c.metrics.revoked.WithLabelValues(cmp.Or(hint, "unknown")).Inc()
	}
	return err
}

// callsUntilKey marks the context of work that sends no call after a time (a periodic pass's budget).
type callsUntilKey struct{}

// callsUntil is ctx for work that sends no call after end: a 429's retry due later waits for the next pass.
func callsUntil(ctx context.Context, end time.Time) context.Context {
	return context.WithValue(ctx, callsUntilKey{}, end)
}

// withRetry runs call within request_timeout, and once more after a 429 whose Retry-After still fits
// in it and in the time the work may send calls (see callsUntil).
func (c *evenergyClient) withRetry(ctx context.Context, op string, call func(context.Context) error) (err error) {
	defer func() {
		if err != nil {
			c.metrics.failures.WithLabelValues(endpoints[op], failureLabel(err)).Inc()
		}
	}()
	ctx, cancel := context.WithTimeout(ctx, c.cfg.RequestTimeout)
	defer cancel()
	err = call(ctx)
	var upstream *upstreamError
	if !errors.As(err, &upstream) || upstream.Status != http.StatusTooManyRequests {
		return err
	}
	deadline, _ := ctx.Deadline()
	if until, ok := ctx.Value(callsUntilKey{}).(time.Time); ok && until.Before(deadline) {
		deadline = until
	}
	if upstream.RetryAfter == 0 || upstream.RetryAfter > time.Until(deadline) {
		return err
	}
	select {
	case <-time.After(upstream.RetryAfter):
	case <-ctx.Done():
		return err
	}
	return call(ctx)
}
