package evenergy

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"net/url"
	"strings"

	"golang.org/x/oauth2"
	"golang.org/x/oauth2/clientcredentials"
)

// evenergyClient calls ev.energy's OAuth 2 endpoints as the configured client.
type evenergyClient struct {
	cfg  *config
	http *http.Client
}

func newClient(cfg *config) *evenergyClient {
	return &evenergyClient{cfg: cfg, http: &http.Client{Timeout: cfg.RequestTimeout}}
}

func (c *evenergyClient) tokenURL() string  { return c.cfg.BaseURL + "/o/token" }
func (c *evenergyClient) revokeURL() string { return c.cfg.BaseURL + "/o/revoke_token/" } // 405 without the slash

// withHTTP makes x/oauth2 use this client's timeout.
func (c *evenergyClient) withHTTP(ctx context.Context) context.Context {
	return context.WithValue(ctx, oauth2.HTTPClient, c.http)
}

// clientCredentialsToken mints a token for the client itself; ev.energy wants HTTP Basic here.
func (c *evenergyClient) clientCredentialsToken(ctx context.Context, scopes []string) (*oauth2.Token, error) {
	if c.cfg.ClientSecret == "" {
		return nil, &upstreamError{Op: "token request", Status: http.StatusBadRequest, OAuthCode: "invalid_client",
			Description: "the config has no client_secret, which client-credentials tokens need"}
	}
	cc := clientcredentials.Config{
		ClientID:     c.cfg.ClientID,
		ClientSecret: c.cfg.ClientSecret,
		TokenURL:     c.tokenURL(),
		Scopes:       scopes,
		AuthStyle:    oauth2.AuthStyleInHeader,
	}
	tok, err := cc.Token(c.withHTTP(ctx))
	return tok, asUpstreamError("token request", err)
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
	tok, err := c.userConfig(redirectURI, nil).Exchange(c.withHTTP(ctx), code, oauth2.VerifierOption(verifier))
	return tok, asUpstreamError("authorization code exchange", err)
}

// refresh trades a refresh token for a new access token and, as ev.energy rotates them, a new refresh token.
func (c *evenergyClient) refresh(ctx context.Context, refreshToken string) (*oauth2.Token, error) {
	tok, err := c.userConfig("", nil).TokenSource(c.withHTTP(ctx), &oauth2.Token{RefreshToken: refreshToken}).Token()
	return tok, asUpstreamError("token refresh", err)
}

// revoke revokes an access or refresh token (RFC 7009); ev.energy answers 200 for tokens already invalid.
func (c *evenergyClient) revoke(ctx context.Context, token, hint string) error {
	form := url.Values{"client_id": {c.cfg.ClientID}, "token": {token}}
	if c.cfg.ClientSecret != "" {
		form.Set("client_secret", c.cfg.ClientSecret)
	}
	if hint != "" {
		form.Set("token_type_hint", hint)
	}
	req, err := http.NewRequestWithContext(ctx, http.MethodPost, c.revokeURL(), strings.NewReader(form.Encode()))
	if err != nil {
		return err
	}
	req.Header.Set("Content-Type", "application/x-www-form-urlencoded")
	resp, err := c.http.Do(req)
	if err != nil {
		return &upstreamError{Op: "token revocation", Err: err}
	}
	defer resp.Body.Close()
	body, _ := io.ReadAll(io.LimitReader(resp.Body, 1<<16))
	if resp.StatusCode == http.StatusOK {
		return nil
	}
	e := &upstreamError{Op: "token revocation", Status: resp.StatusCode}
	var oauthBody struct {
		Error            string `json:"error"`
		ErrorDescription string `json:"error_description"`
	}
	if json.Unmarshal(body, &oauthBody) == nil {
		e.OAuthCode, e.Description = oauthBody.Error, oauthBody.ErrorDescription
	}
	return e
}

// upstreamError is a failed call to ev.energy. It carries the OAuth error ev.energy gave, and as a
// logical.HTTPCodedError it reaches the Vault client as 400 (ev.energy refused) or 502 (ev.energy failed).
type upstreamError struct {
	Op          string
	Status      int // ev.energy's HTTP status; 0 when it could not be reached
	OAuthCode   string
	Description string
	Err         error
}

func (e *upstreamError) Error() string {
	switch {
	case e.OAuthCode != "" && e.Description != "":
		return fmt.Sprintf("ev.energy refused the %s: %s: %s", e.Op, e.OAuthCode, e.Description)
	case e.OAuthCode != "":
		return fmt.Sprintf("ev.energy refused the %s: %s", e.Op, e.OAuthCode)
	case e.Status != 0:
		return fmt.Sprintf("ev.energy answered the %s with HTTP %d", e.Op, e.Status)
	default:
		return fmt.Sprintf("could not reach ev.energy for the %s: %v", e.Op, e.Err)
	}
}

func (e *upstreamError) Code() int {
	if e.Status >= 400 && e.Status < 500 {
		return http.StatusBadRequest
	}
	return http.StatusBadGateway
}

func asUpstreamError(op string, err error) error {
	if err == nil {
		return nil
	}
	var re *oauth2.RetrieveError
	if errors.As(err, &re) {
		return &upstreamError{Op: op, Status: re.Response.StatusCode, OAuthCode: re.ErrorCode, Description: re.ErrorDescription}
	}
	return &upstreamError{Op: op, Err: err}
}
