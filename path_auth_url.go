package evenergy

import (
	"context"
	"fmt"
	"net/http"
	"time"

	"github.com/hashicorp/vault/sdk/framework"
	"github.com/hashicorp/vault/sdk/logical"
	"golang.org/x/oauth2"
)

const (
	authRequestPrefix = "auth-requests/"
	authRequestTTL    = 10 * time.Minute
)

// authRequest is a pending authorization, stored under the key its state names until the user comes back.
type authRequest struct {
	User        string    `json:"user"`
	RedirectURI string    `json:"redirect_uri"`
	Verifier    string    `json:"verifier"`
	ExpiresAt   time.Time `json:"expires_at"`
	MadeBy      string    `json:"made_by,omitempty"` // the Vault entity that wrote auth-url; "" for a token without one, such as root
}

// How a link from auth-url completes, as its answer says.
const (
	completionCallback         = "callback"          // at this mount's callback, in one visit
	completionConfirmationCode = "confirmation_code" // the callback shows a code that the link's maker writes back to users/<user>
	completionApplication      = "application"       // the application writes code and state to users/<user>
)

// selfMade reports whether an entity made the link for itself (the README's self-service policy).
// Whoever opens such a link may be someone the maker sent it to, so it completes only at the
// callback, whose page shows the code the maker must write back.
func (p *authRequest) selfMade() bool {
	return p.MadeBy != "" && p.MadeBy == p.User
}

// toCallback reports whether the link sends the user back to callbackURL, this mount's callback
// as the config names it in full; with none named, no link does.
func (p *authRequest) toCallback(callbackURL string) bool {
	return callbackURL != "" && sameURL(p.RedirectURI, callbackURL)
}

// completion is how the link completes.
func (p *authRequest) completion(callbackURL string) string {
	switch {
	case p.selfMade():
		return completionConfirmationCode
	case p.toCallback(callbackURL):
		return completionCallback
	default:
		return completionApplication
	}
}

// unsafeSelfMade returns why a link its maker made for itself may not be made or exchanged, or nil:
// only the callback, named in full by the config, keeps what it gives behind a confirmation code.
func (p *authRequest) unsafeSelfMade(callbackURL, mountPoint string) error {
	switch {
	case !p.selfMade() || p.toCallback(callbackURL):
		return nil
	case callbackURL == "":
		return logical.CodedError(http.StatusBadRequest, fmt.Sprintf("a link a Vault entity makes for itself completes only at this mount's callback, and the config names none: "+
			"an operator writes callback_url=https://VAULT/v1/%scallback (namespace path included) to config", mountPoint))
	}
	return logical.CodedError(http.StatusBadRequest, fmt.Sprintf("a link a Vault entity makes for itself must use this mount's callback as redirect_uri, %s, whose page shows a confirmation code to write back; "+
		"for another redirect_uri, have a trusted application make the link with its own Vault token", callbackURL))
}

// checkSelfMade refuses a self-made link whose redirect_uri is not the configured callback, such
// as one stored by a version that allowed it, before its code is exchanged.
func (b *backend) checkSelfMade(ctx context.Context, req *logical.Request, pending *authRequest) error {
	cfg, _, err := b.config(ctx, req.Storage)
	if err != nil {
		return err
	}
	return pending.unsafeSelfMade(cfg.CallbackURL, req.MountPoint)
}

func pathAuthURL(b *backend) *framework.Path {
	return &framework.Path{
		Pattern: "auth-url/" + userField + "$",
		Fields: map[string]*framework.FieldSchema{
			"user":         {Type: framework.TypeString, Description: "Name this engine gives the ev.energy user, e.g. driver-42 or a Vault entity ID.", Required: true},
			"redirect_uri": {Type: framework.TypeString, Description: "Where ev.energy sends the user back: this mount's callback (https://VAULT/v1/<mount>/callback) or the application's. Required.", Required: true},
			"scopes":       {Type: framework.TypeCommaStringSlice, Description: "Scopes to ask the user for; empty uses the config's scopes."},
		},
		DisplayAttrs: &framework.DisplayAttributes{OperationPrefix: operationPrefix, OperationVerb: "generate", OperationSuffix: "authorization-url"},
		Operations: map[logical.Operation]framework.OperationHandler{
			logical.UpdateOperation: &framework.PathOperation{
				Callback: b.pathAuthURLWrite,
				Summary:  "Start an ev.energy user's authorization: returns the URL to send the user to.",
			},
		},
		HelpSynopsis: "Start the authorization-code flow (with PKCE) for an ev.energy user.",
		HelpDescription: `Returns the authorize_url to send the user to, its state, and how it completes. The PKCE verifier
stays sealed in Vault. The authorization is single-use and expires after 10 minutes; a user has at
most 5 pending or held for a confirmation code, and a newer one replaces the oldest. ev.energy sends the user back to redirect_uri
with a code that is valid for 60 seconds: point it at this mount's callback so Vault exchanges it at
once, or write code and state to users/<user> from the application. A link a Vault entity makes for
itself must go to the callback, named in full by the config's callback_url (refused while it is
unset): the callback holds it behind a confirmation code that the entity writes back.`,
	}
}

func (b *backend) pathAuthURLWrite(ctx context.Context, req *logical.Request, d *framework.FieldData) (*logical.Response, error) {
	user := d.Get("user").(string)
	redirectURI := d.Get("redirect_uri").(string)
	if err := checkURL("redirect_uri", redirectURI); err != nil {
		return logical.ErrorResponse(err.Error()), nil
	}
	cfg, client, err := b.config(ctx, req.Storage)
	if err != nil {
		return nil, err
	}
	scopes := d.Get("scopes").([]string)
	if len(scopes) == 0 {
		scopes = cfg.Scopes
	}

	pending := authRequest{
		User:        user,
		RedirectURI: redirectURI,
		Verifier:    oauth2.GenerateVerifier(),
		ExpiresAt:   time.Now().Add(authRequestTTL).UTC(),
		MadeBy:      req.EntityID,
	}
	if err := pending.unsafeSelfMade(cfg.CallbackURL, req.MountPoint); err != nil {
		return nil, err
	}
	if pending.selfMade() {
		if err := b.checkSelfServiceRoom(ctx, req.Storage, cfg); err != nil {
			return nil, err
		}
	}
	state, replaced, err := b.putPending(ctx, req.Storage, &pending)
	if err != nil {
		return nil, err
	}
	resp := &logical.Response{Data: map[string]any{
		"authorize_url": client.authorizeURL(redirectURI, scopes, state, pending.Verifier),
		"state":         state,
		"expires_at":    pending.ExpiresAt.Format(time.RFC3339),
		"completion":    pending.completion(cfg.CallbackURL),
	}}
	if replaced > 0 {
		resp.AddWarning(fmt.Sprintf("user %s had %d pending authorization links, the most kept per user with connections waiting for a confirmation code: this link replaced the oldest %d, which no longer work", user, maxPendingPerUser, replaced))
	}
	return resp, nil
}

// consumeAuthRequest takes the pending authorization of state out of storage: it is single use.
// wantUser, when set, must be the user the authorization was started for.
func (b *backend) consumeAuthRequest(ctx context.Context, s logical.Storage, wantUser, state string) (*authRequest, error) {
	var pending *authRequest
	key, issued := pendingKey(state) // any other state was never issued, and may not be a storage key
	if issued {
		defer b.pendingLocks.lock(key)()
		var err error
		if pending, err = getJSON[authRequest](ctx, s, key); err != nil {
			return nil, err
		}
	}
	if pending == nil || time.Now().After(pending.ExpiresAt) || (wantUser != "" && pending.User != wantUser) {
		return nil, logical.CodedError(http.StatusBadRequest, "the state is unknown, expired, already used, replaced by a newer link or for another user: start again at auth-url")
	}
	if err := s.Delete(ctx, key); err != nil || !pending.selfMade() {
		return pending, err
	}
	return pending, b.selfMadeLinks.delete(ctx, s, state) // held from now on, if at all, and counted so
}

// completeAuthorization exchanges the code ev.energy gave for a pending authorization and keeps the grant.
func (b *backend) completeAuthorization(ctx context.Context, s logical.Storage, pending *authRequest, code string) error {
	// Once sent, the exchange must reach storage even if the caller goes away, or its tokens are orphans.
	ctx = context.WithoutCancel(ctx)
	landed, err := b.grantCalls.begin()
	if err != nil {
		return err
	}
	defer landed()
	cfg, tok, err := b.exchangeAuthorization(ctx, s, pending, code)
	if err != nil {
		return err
	}
	return b.storeGrant(ctx, s, cfg, pending.User, tok)
}

// exchangeAuthorization exchanges the code ev.energy gave for a pending authorization, as the
// configured client, which it returns with the tokens; ctx must outlive the caller (see completeAuthorization).
func (b *backend) exchangeAuthorization(ctx context.Context, s logical.Storage, pending *authRequest, code string) (*config, *oauth2.Token, error) {
	if code == "" {
		return nil, nil, logical.CodedError(http.StatusBadRequest, "code is required: the code ev.energy added to the redirect")
	}
	cfg, client, err := b.config(ctx, s)
	if err != nil {
		return nil, nil, err
	}
	tok, err := client.exchangeCode(ctx, code, pending.Verifier, pending.RedirectURI)
	return cfg, tok, err
}
