package evenergy

import (
	"context"
	"errors"
	"fmt"
	"net/http"
	"time"

	"github.com/hashicorp/vault/sdk/framework"
	"github.com/hashicorp/vault/sdk/helper/locksutil"
	"github.com/hashicorp/vault/sdk/logical"
	"golang.org/x/oauth2"
)

const (
	userPrefix          = "users/"
	secretUserTokenType = "evenergy_user_token"
	grantActive         = "active"
	grantRevoked        = "revoked"
	grantOtherClient    = "other_client" // shown, never stored: the config names another client now
)

// grant is what Vault keeps of one ev.energy user's authorization; its tokens never leave except
// the access token through users/<user>/token.
type grant struct {
	ClientID        string    `json:"client_id"` // the ev.energy client the user authorized; empty in grants stored before v0.2
	RefreshToken    string    `json:"refresh_token"`
	AccessToken     string    `json:"access_token"`
	TokenType       string    `json:"token_type"`
	Scope           string    `json:"scope"`
	ExpiresAt       time.Time `json:"expires_at"`
	Status          string    `json:"status"`
	LastRefreshedAt time.Time `json:"last_refreshed_at"`
	LastError       string    `json:"last_error"`
}

func (g *grant) apply(tok *oauth2.Token) {
	g.AccessToken, g.TokenType, g.Scope, g.ExpiresAt = tok.AccessToken, tok.Type(), tokenScope(tok), tok.Expiry
	if tok.RefreshToken != "" {
		g.RefreshToken = tok.RefreshToken
	}
	g.Status, g.LastRefreshedAt, g.LastError = grantActive, time.Now().UTC(), ""
}

// ofOtherClient reports whether the grant was made for another client than the configured one:
// ev.energy would refuse its refresh token from this client, so it is never sent.
func (g *grant) ofOtherClient(cfg *config) bool {
	return g.ClientID != "" && g.ClientID != cfg.ClientID
}

// otherClientError says that a user's grant belongs to a client the engine no longer acts as.
type otherClientError struct{ user, grantClient, configClient string }

func (e *otherClientError) Error() string {
	return fmt.Sprintf("the grant of user %s was made for ev.energy client %s, not for the configured client %s: send the user through auth-url again, or delete the grant", e.user, e.grantClient, e.configClient)
}

func (e *otherClientError) Code() int { return http.StatusBadRequest }

// revokedGrantError says that ev.energy no longer accepts a user's refresh token.
type revokedGrantError struct{ user, lastError string }

func (e *revokedGrantError) Error() string {
	return fmt.Sprintf("ev.energy no longer accepts the grant of user %s (%s): send the user through auth-url again", e.user, e.lastError)
}

func (e *revokedGrantError) Code() int { return http.StatusBadRequest }

func pathUsers(b *backend) []*framework.Path {
	userSchema := &framework.FieldSchema{Type: framework.TypeString, Description: "Name this engine gives the ev.energy user.", Required: true}
	return []*framework.Path{
		{
			Pattern: userPrefix + userField + "$",
			Fields: map[string]*framework.FieldSchema{
				"user":          userSchema,
				"code":          {Type: framework.TypeString, Description: "Authorization code from ev.energy's redirect; goes with state.", DisplayAttrs: &framework.DisplayAttributes{Sensitive: true}},
				"state":         {Type: framework.TypeString, Description: "State from auth-url, as ev.energy's redirect returned it."},
				"refresh_token": {Type: framework.TypeString, Description: "A refresh token obtained elsewhere, to import instead of code and state.", DisplayAttrs: &framework.DisplayAttributes{Sensitive: true}},
			},
			Operations: map[logical.Operation]framework.OperationHandler{
				logical.ReadOperation:   &framework.PathOperation{Callback: b.pathUserRead},
				logical.UpdateOperation: &framework.PathOperation{Callback: b.pathUserWrite},
				logical.DeleteOperation: &framework.PathOperation{Callback: b.pathUserDelete},
			},
			HelpSynopsis: "Manage an ev.energy user's grant.",
			HelpDescription: `Write code and state (from ev.energy's redirect to the application) to finish an authorization
started at auth-url, or refresh_token to import a grant obtained elsewhere. Read shows the grant's
status, never a token. Delete revokes the grant at ev.energy and forgets it.`,
		},
		{
			Pattern: userPrefix + "?$",
			Operations: map[logical.Operation]framework.OperationHandler{
				logical.ListOperation: &framework.PathOperation{Callback: b.pathUserList},
			},
			HelpSynopsis:    "List the ev.energy users with a grant.",
			HelpDescription: "Lists the names of the users whose grants this engine keeps.",
		},
		{
			Pattern: userPrefix + userField + "/token$",
			Fields:  map[string]*framework.FieldSchema{"user": userSchema},
			Operations: map[logical.Operation]framework.OperationHandler{
				logical.ReadOperation: &framework.PathOperation{Callback: b.pathUserTokenRead},
			},
			HelpSynopsis: "Get an ev.energy user's current access token.",
			HelpDescription: `Returns the user's access token, refreshed first when less than the config's refresh_window
remains of it. ev.energy allows one live access token per grant, so every reader gets the same
one; its lease ends before the next refresh replaces it, and ending the lease revokes nothing.`,
		},
	}
}

func (b *backend) pathUserWrite(ctx context.Context, req *logical.Request, d *framework.FieldData) (*logical.Response, error) {
	user := d.Get("user").(string)
	code, state, refreshToken := d.Get("code").(string), d.Get("state").(string), d.Get("refresh_token").(string)
	switch {
	case refreshToken != "" && (code != "" || state != ""):
		return logical.ErrorResponse("give either code and state, or refresh_token, not both"), nil
	case refreshToken != "":
		if err := b.ensureWritable(); err != nil {
			return nil, err
		}
		cfg, err := getConfig(ctx, req.Storage)
		if err != nil {
			return nil, err
		}
		// Refreshing at once checks the imported token and takes it over: ev.energy rotates it, so the
		// refresh must reach storage even if the caller goes away.
		ctx = context.WithoutCancel(ctx)
		tok, err := newClient(cfg).refresh(ctx, refreshToken)
		if err != nil {
			return nil, err
		}
		return nil, b.storeGrant(ctx, req.Storage, cfg, user, tok)
	case state != "":
		pending, err := b.consumeAuthRequest(ctx, req.Storage, user, state)
		if err != nil {
			return nil, err
		}
		return nil, b.completeAuthorization(ctx, req.Storage, pending, code)
	default:
		return logical.ErrorResponse("give code and state from ev.energy's redirect, or refresh_token to import a grant"), nil
	}
}

func (b *backend) pathUserRead(ctx context.Context, req *logical.Request, d *framework.FieldData) (*logical.Response, error) {
	g, err := getJSON[grant](ctx, req.Storage, userPrefix+d.Get("user").(string))
	if err != nil || g == nil {
		return nil, err
	}
	cfg, err := getConfig(ctx, req.Storage)
	if err != nil {
		return nil, err
	}
	status := g.Status
	if g.ofOtherClient(cfg) {
		status = grantOtherClient
	}
	return &logical.Response{Data: map[string]any{
		"client_id":               g.ClientID,
		"scope":                   g.Scope,
		"access_token_expires_at": g.ExpiresAt.Format(time.RFC3339),
		"status":                  status,
		"last_refreshed_at":       g.LastRefreshedAt.Format(time.RFC3339),
		"last_error":              g.LastError,
	}}, nil
}

func (b *backend) pathUserDelete(ctx context.Context, req *logical.Request, d *framework.FieldData) (*logical.Response, error) {
	user := d.Get("user").(string)
	lock := locksutil.LockForKey(b.locks, userPrefix+user)
	lock.Lock()
	defer lock.Unlock()

	g, err := getJSON[grant](ctx, req.Storage, userPrefix+user)
	if err != nil || g == nil {
		return nil, err
	}
	if err := b.ensureWritable(); err != nil {
		return nil, err
	}
	cfg, err := getConfig(ctx, req.Storage)
	if err != nil {
		return nil, err
	}
	var resp *logical.Response
	switch {
	case g.ofOtherClient(cfg):
		resp = &logical.Response{}
		resp.AddWarning("the grant was made for ev.energy client " + g.ClientID + ", whose tokens the configured client cannot revoke: revoke it at ev.energy as that client")
	case g.Status == grantActive:
		// The grant stays stored until ev.energy has revoked both tokens, so a failure can be retried.
		if err := revokeMinted(ctx, newClient(cfg), mintedToken{AccessToken: g.AccessToken, RefreshToken: g.RefreshToken}); err != nil {
			return nil, err
		}
	}
	return resp, req.Storage.Delete(ctx, userPrefix+user)
}

func (b *backend) pathUserList(ctx context.Context, req *logical.Request, _ *framework.FieldData) (*logical.Response, error) {
	users, err := req.Storage.List(ctx, userPrefix)
	if err != nil {
		return nil, err
	}
	return logical.ListResponse(users), nil
}

func (b *backend) pathUserTokenRead(ctx context.Context, req *logical.Request, d *framework.FieldData) (*logical.Response, error) {
	cfg, err := getConfig(ctx, req.Storage)
	if err != nil {
		return nil, err
	}
	g, err := b.currentGrant(ctx, req.Storage, cfg, d.Get("user").(string))
	if err != nil {
		return nil, err
	}
	resp := b.Secret(secretUserTokenType).Response(tokenData(g.AccessToken, g.TokenType, g.Scope, g.ExpiresAt), nil)
	// The lease ends before the planned refresh invalidates this token, so Vault Agent re-reads in time.
	resp.Secret.TTL = max(time.Until(g.ExpiresAt.Add(-cfg.RefreshWindow)).Truncate(time.Second), time.Second)
	resp.Secret.Renewable = false
	return resp, nil
}

func secretUserToken() *framework.Secret {
	return &framework.Secret{
		Type: secretUserTokenType,
		Fields: map[string]*framework.FieldSchema{
			"access_token": {Type: framework.TypeString, Description: "The user's ev.energy access token."},
		},
		// Every reader shares the user's token; it lives on at ev.energy until the next refresh.
		Revoke: func(context.Context, *logical.Request, *framework.FieldData) (*logical.Response, error) {
			return nil, nil
		},
	}
}

// storeGrant keeps a user's new tokens, replacing (and revoking) any grant the user had.
func (b *backend) storeGrant(ctx context.Context, s logical.Storage, cfg *config, user string, tok *oauth2.Token) error {
	lock := locksutil.LockForKey(b.locks, userPrefix+user)
	lock.Lock()
	defer lock.Unlock()

	client := newClient(cfg)
	old, err := getJSON[grant](ctx, s, userPrefix+user)
	if err == nil {
		g := &grant{ClientID: cfg.ClientID}
		g.apply(tok)
		err = putJSON(ctx, s, userPrefix+user, g)
	}
	if err != nil {
		// Vault could not keep the tokens, so ev.energy must not keep them either.
		b.revokeBestEffort(ctx, client, user, tok.RefreshToken)
		return err
	}
	if old != nil && old.Status == grantActive {
		b.revokeBestEffort(ctx, client, user, old.RefreshToken)
	}
	return nil
}

func (b *backend) revokeBestEffort(ctx context.Context, client *evenergyClient, user, refreshToken string) {
	if err := client.revoke(ctx, refreshToken, "refresh_token"); err != nil {
		b.Logger().Warn("could not revoke a replaced ev.energy grant", "user", user, "error", err)
	}
}

// currentGrant returns the user's grant, refreshed first when less than the refresh window remains
// of its access token. Refreshes are serialized per user: each one rotates the refresh token.
func (b *backend) currentGrant(ctx context.Context, s logical.Storage, cfg *config, user string) (*grant, error) {
	lock := locksutil.LockForKey(b.locks, userPrefix+user)
	lock.Lock()
	defer lock.Unlock()

	g, err := getJSON[grant](ctx, s, userPrefix+user)
	switch {
	case err != nil:
		return nil, err
	case g == nil:
		return nil, logical.CodedError(http.StatusBadRequest, "no grant for user "+user+": send the user through auth-url first")
	case g.Status == grantRevoked:
		return nil, &revokedGrantError{user: user, lastError: g.LastError}
	case g.ofOtherClient(cfg):
		return nil, &otherClientError{user: user, grantClient: g.ClientID, configClient: cfg.ClientID}
	case time.Until(g.ExpiresAt) > cfg.RefreshWindow:
		return g, nil
	}
	// Only a node that can write may refresh, or the rotated refresh token would be lost.
	if err := b.ensureWritable(); err != nil {
		return nil, err
	}
	// Once sent, the refresh must reach storage even if the reader goes away: the old token is dead.
	ctx = context.WithoutCancel(ctx)
	client := newClient(cfg)
	tok, err := client.refresh(ctx, g.RefreshToken)
	if err == nil {
		g.apply(tok)
		if err := putJSON(ctx, s, userPrefix+user, g); err != nil {
			// Vault could not keep the rotated tokens, so ev.energy must not keep them either.
			b.revokeBestEffort(ctx, client, user, tok.RefreshToken)
			return nil, err
		}
		return g, nil
	}
	b.Logger().Warn("could not refresh an ev.energy user token", "user", user, "error", err)
	g.LastError = err.Error()
	var upstream *upstreamError
	if errors.As(err, &upstream) && upstream.OAuthCode == "invalid_grant" {
		g.Status = grantRevoked
		err = &revokedGrantError{user: user, lastError: g.LastError}
	}
	if perr := putJSON(ctx, s, userPrefix+user, g); perr != nil {
		return nil, perr
	}
	// A refresh that failed for a passing reason leaves the current access token usable until it expires.
	if g.Status == grantActive && time.Now().Before(g.ExpiresAt) {
		return g, nil
	}
	return nil, err
}
