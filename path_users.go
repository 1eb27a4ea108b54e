package evenergy

import (
	"cmp"
	"context"
	"errors"
	"fmt"
	"net/http"
	"time"

	"github.com/hashicorp/vault/sdk/framework"
	"github.com/hashicorp/vault/sdk/logical"
)

const (
	userPrefix          = "users/"
	secretUserTokenType = "evenergy_user_token"
)

func pathUsers(b *backend) []*framework.Path {
	userSchema := &framework.FieldSchema{Type: framework.TypeString, Description: "Name this engine gives the ev.energy user.", Required: true}
	return []*framework.Path{
		{
			Pattern: userPrefix + userField + "$",
			Fields: map[string]*framework.FieldSchema{
				"user":              userSchema,
				"code":              {Type: framework.TypeString, Description: "Authorization code from ev.energy's redirect; goes with state.", DisplayAttrs: &framework.DisplayAttributes{Sensitive: true}},
				"state":             {Type: framework.TypeString, Description: "State from auth-url, as ev.energy's redirect returned it."},
				"refresh_token":     {Type: framework.TypeString, Description: "A refresh token obtained elsewhere, to import instead of code and state.", DisplayAttrs: &framework.DisplayAttributes{Sensitive: true}},
				"confirmation_code": {Type: framework.TypeString, Description: "The code the callback page showed for a link its maker made for itself, written by the link's maker; alone, or with the link's state.", DisplayAttrs: &framework.DisplayAttributes{Sensitive: true}},
			},
			DisplayAttrs: &framework.DisplayAttributes{OperationPrefix: operationPrefix, OperationSuffix: "user"},
			Operations: map[logical.Operation]framework.OperationHandler{
				logical.ReadOperation: &framework.PathOperation{Callback: b.pathUserRead, Summary: "Read the status of a user's grant, never a token."},
				logical.UpdateOperation: &framework.PathOperation{
					Callback:     b.pathUserWrite,
					Summary:      "Connect a user: finish an authorization with code and state, or import a refresh token.",
					DisplayAttrs: &framework.DisplayAttributes{OperationVerb: "connect"},
				},
				logical.DeleteOperation: &framework.PathOperation{Callback: b.pathUserDelete, Summary: "Revoke a user's grant at ev.energy and forget it."},
			},
			HelpSynopsis: "Manage an ev.energy user's grant.",
			HelpDescription: `Write code and state (from ev.energy's redirect to the application) to finish an authorization
started at auth-url, confirmation_code (from the callback page of a link its maker made for
itself; state is optional), or refresh_token to import a grant obtained elsewhere. A link a Vault entity made for
itself is finished only by that entity, with the confirmation code, never with code and state. Read shows the grant's status, never a token. Delete
revokes the grant at ev.energy and forgets it.`,
		},
		{
			Pattern:      userPrefix + "?$",
			DisplayAttrs: &framework.DisplayAttributes{OperationPrefix: operationPrefix, OperationSuffix: "users"},
			Operations: map[logical.Operation]framework.OperationHandler{
				logical.ListOperation: &framework.PathOperation{Callback: b.pathUserList, Summary: "List the users with a grant, and each grant's status in key_info."},
			},
			HelpSynopsis:    "List the ev.energy users with a grant.",
			HelpDescription: "Lists the names of the users whose grants this engine keeps, with each grant's status and, for a revoked grant, when ev.energy was found to refuse it.",
		},
		{
			Pattern: userPrefix + userField + "/token$",
			Fields:  map[string]*framework.FieldSchema{"user": userSchema},
			// Callbacks, not Operations: a fresh token is served without any call back to Vault (see pathToken).
			Callbacks:    map[logical.Operation]framework.OperationFunc{logical.ReadOperation: b.pathUserTokenRead},
			DisplayAttrs: &framework.DisplayAttributes{OperationPrefix: operationPrefix, OperationSuffix: "user-token"},
			HelpSynopsis: "Get an ev.energy user's current access token.",
			HelpDescription: `Returns the user's access token, refreshed first once its refresh point (users/<user>'s
refresh_at) has come: where the config's refresh_window began when the token was issued, or the
next attempt after a failed refresh. ev.energy allows one live access token per grant, so every
reader gets the same one; its lease ends by the refresh point, and ending the lease revokes nothing.`,
		},
	}
}

func (b *backend) pathUserWrite(ctx context.Context, req *logical.Request, d *framework.FieldData) (*logical.Response, error) {
	user := d.Get("user").(string)
	code, state, refreshToken := trimmedField(d, "code"), trimmedField(d, "state"), trimmedField(d, "refresh_token")
	confirmation := trimmedField(d, "confirmation_code")
	switch {
	case refreshToken != "" && (code != "" || state != "" || confirmation != ""):
		return logical.ErrorResponse("give either code and state, confirmation_code, or refresh_token alone"), nil
	case code != "" && confirmation != "":
		return logical.ErrorResponse("give either code and state, or confirmation_code, not both"), nil
	case refreshToken != "":
		if err := b.ensureWritable(); err != nil {
			return nil, err
		}
		cfg, client, err := b.config(ctx, req.Storage)
		if err != nil {
			return nil, err
		}
		// Refreshing at once checks the imported token and takes it over: ev.energy rotates it, so the
		// refresh must reach storage even if the caller goes away.
		ctx = context.WithoutCancel(ctx)
		landed, err := b.grantCalls.begin()
		if err != nil {
			return nil, err
		}
		defer landed()
		tok, err := client.refresh(ctx, refreshToken)
		if err != nil {
			return nil, err
		}
		return nil, b.storeGrant(ctx, req.Storage, cfg, user, tok)
	case confirmation != "":
		return nil, b.confirmGrant(ctx, req, user, state, confirmation)
	case state != "":
		pending, err := b.consumeAuthRequest(ctx, req.Storage, user, state)
		if err != nil {
			return nil, err
		}
		if pending.selfMade() { // whoever wrote the code may have it from someone the maker sent the link to
			return nil, logical.CodedError(http.StatusBadRequest, "this link was made by a Vault identity for itself: it completes only at the callback, "+
				"whose page shows a confirmation code that the identity writes back as confirmation_code; start again at auth-url")
		}
		return nil, b.completeAuthorization(ctx, req.Storage, pending, code)
	default:
		return logical.ErrorResponse("give code and state from ev.energy's redirect, the confirmation_code the callback page showed, or refresh_token to import a grant"), nil
	}
}

func (b *backend) pathUserRead(ctx context.Context, req *logical.Request, d *framework.FieldData) (*logical.Response, error) {
	user := d.Get("user").(string)
	g, err := b.grant(ctx, req.Storage, user)
	if err != nil || g == nil {
		return nil, err
	}
	cfg, _, err := b.config(ctx, req.Storage)
	if err != nil {
		return nil, err
	}
	data := g.statusData(cfg)
	data["client_id"], data["scope"] = g.ClientID, g.Scope
	data["access_token_expires_at"] = g.ExpiresAt.Format(time.RFC3339)
	data["refresh_window"] = int64(g.refreshWindow(cfg).Seconds())
	data["refresh_at"] = g.refreshAt(cfg).UTC().Format(time.RFC3339)
	data["last_error"] = cmp.Or(b.tokens.refreshes.lastFailure(userPrefix+user, g.RefreshToken), g.LastError)
	return &logical.Response{Data: data}, nil
}

// statusData is what a read and a list show of a grant's status: after a restore, the revoked
// grants, with when ev.energy was found to refuse them, are the users who must connect again.
func (g *grant) statusData(cfg *config) map[string]any {
	status := g.Status
	if g.ofOtherClient(cfg) {
		status = grantOtherClient
	}
	data := map[string]any{"status": status, "last_refreshed_at": g.LastRefreshedAt.Format(time.RFC3339)}
	if status == grantRevoked && g.RevokedAt != nil {
		data["revoked_at"] = g.RevokedAt.Format(time.RFC3339)
	}
	return data
}

func (b *backend) pathUserDelete(ctx context.Context, req *logical.Request, d *framework.FieldData) (*logical.Response, error) {
	if err := b.ensureWritable(); err != nil {
		return nil, err
	}
	user := d.Get("user").(string)
	defer b.lockUser(user)()
	g, err := b.grant(ctx, req.Storage, user)
	if err != nil || g == nil {
		return nil, err
	}
	resp := &logical.Response{}
	if g.Status != grantRevoked {
		// Marked first, so no read serves it once revoked; refused, nothing is revoked yet.
		if err := b.putGrant(ctx, req.Storage, user, g.ending()); err != nil {
			return nil, err
		}
		// The operator asked for it: revoked now, and queued when ev.energy does not confirm.
		rec := revocation{ClientID: g.ClientID, AccessToken: g.AccessToken, RefreshToken: g.RefreshToken, ExpiresAt: g.ExpiresAt, Reason: reasonDeletedUser}
		switch err := b.revokeRecord(ctx, req.Storage, &rec, urgentRevocation()); {
		case err == nil:
			resp.AddWarning(fmt.Sprintf("the grant is revoked at ev.energy; leases already handed out for its access token run until %s at the latest, and `vault lease revoke -prefix %s%s%s/token` ends them now",
				g.ExpiresAt.Format(time.RFC3339), req.MountPoint, userPrefix, user))
		case errors.As(err, new(*unknownClientError)):
			resp.AddWarning(err.Error() + "; the grant is forgotten without being revoked: revoke it at ev.energy as that client")
		default:
			if err := b.queueRevocation(ctx, req.Storage, rec, err); err != nil {
				return nil, err
			}
			resp.AddWarning(fmt.Sprintf("ev.energy did not confirm the revocation (%v): it is queued and retried until it does, see %srevocations", err, req.MountPoint))
		}
	}
	return resp, b.putGrant(ctx, req.Storage, user, nil)
}

func (b *backend) pathUserList(ctx context.Context, req *logical.Request, _ *framework.FieldData) (*logical.Response, error) {
	users, err := req.Storage.List(ctx, userPrefix)
	if err != nil {
		return nil, err
	}
	cfg, _, err := b.config(ctx, req.Storage)
	if errors.As(err, new(logical.HTTPCodedError)) {
		cfg, err = &config{}, nil // not configured: every grant is of a client other than the configured one
	}
	if err != nil {
		return nil, err
	}
	keyInfo := make(map[string]any, len(users))
	for _, user := range users {
		if g, err := b.grant(ctx, req.Storage, user); err != nil {
			return nil, err
		} else if g != nil { // deleted since the list
			keyInfo[user] = g.statusData(cfg)
		}
	}
	return logical.ListResponseWithInfo(users, keyInfo), nil
}

func (b *backend) pathUserTokenRead(ctx context.Context, req *logical.Request, d *framework.FieldData) (*logical.Response, error) {
	if err := b.ensureLeasable(); err != nil {
		return nil, err
	}
	cfg, client, err := b.config(ctx, req.Storage)
	if err != nil {
		return nil, err
	}
	g, lease, err := b.currentGrant(ctx, req.Storage, cfg, client, d.Get("user").(string))
	if err != nil {
		return nil, err
	}
	resp := b.Secret(secretUserTokenType).Response(tokenData(g.AccessToken, g.TokenType, g.Scope, g.ExpiresAt), nil)
	resp.Secret.TTL, resp.Secret.Renewable = lease, false
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
