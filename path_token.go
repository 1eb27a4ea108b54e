package evenergy

import (
	"context"
	"errors"
	"fmt"
	"time"

	"github.com/hashicorp/vault/sdk/framework"
	"github.com/hashicorp/vault/sdk/logical"
	"golang.org/x/oauth2"
)

const secretAccessTokenType = "evenergy_access_token"

func pathToken(b *backend) []*framework.Path {
	// Callbacks, not Operations: the framework asks Vault for the replication state before every
	// Operations handler, a round trip the hot read paths do without: ensureLeasable asks once and
	// forwards from a performance standby, as ForwardPerformanceStandby would (it acts on Operations only).
	callbacks := map[logical.Operation]framework.OperationFunc{logical.ReadOperation: b.pathTokenRead}
	return []*framework.Path{
		{
			Pattern:         "token",
			DisplayAttrs:    &framework.DisplayAttributes{OperationPrefix: operationPrefix, OperationVerb: "generate", OperationSuffix: "token"},
			Callbacks:       callbacks,
			HelpSynopsis:    "Get a new client-credentials access token with the config's scopes.",
			HelpDescription: tokenHelp,
		},
		{
			Pattern: "token/" + roleField("role"),
			Fields: map[string]*framework.FieldSchema{
				"role": {Type: framework.TypeLowerCaseString, Description: "Role whose scopes and TTLs the token gets.", Required: true},
			},
			DisplayAttrs:    &framework.DisplayAttributes{OperationPrefix: operationPrefix, OperationVerb: "generate", OperationSuffix: "token-for-role"},
			Callbacks:       callbacks,
			HelpSynopsis:    "Get a new client-credentials access token with a role's scopes and TTLs.",
			HelpDescription: tokenHelp,
		},
	}
}

const tokenHelp = `Each read mints a new ev.energy access token with the client-credentials grant and returns it
under a lease. The lease never outlives the token: its max TTL is the token's life. When the lease
ends, the token is revoked at ev.energy as the client that minted it, or, when ev.energy does not
confirm, queued at the revocations path and retried until it does.`

func (b *backend) pathTokenRead(ctx context.Context, req *logical.Request, d *framework.FieldData) (*logical.Response, error) {
	if err := b.ensureLeasable(); err != nil {
		return nil, err
	}
	cfg, client, err := b.config(ctx, req.Storage)
	if err != nil {
		return nil, err
	}
	r := &role{}
	roleName, _ := d.GetOk("role")
	if roleName != nil {
		if r, err = b.role(ctx, req.Storage, roleName.(string)); err != nil {
			return nil, err
		}
	}
	if r.Shared {
		return b.readSharedToken(ctx, req.Storage, cfg, roleName.(string), r) // mints only where it may write
	}
	if err := b.ensureWritable(); err != nil {
		return nil, err
	}
	// The mint finishes even if the caller goes away: ev.energy may have issued the token already.
	tok, err := client.clientCredentialsToken(context.WithoutCancel(ctx), r.tokenScopes(cfg))
	if err != nil {
		return nil, err
	}
	b.retired.minted(tok.Expiry)
	name, _ := roleName.(string)
	return b.leaseMintedToken(ctx, req.Storage, cfg.ClientID, name, r, tok)
}

// leaseMintedToken answers tok, minted by clientID for role name ("" for none), under a lease of its
// own whose end revokes it.
func (b *backend) leaseMintedToken(ctx context.Context, s logical.Storage, clientID, name string, r *role, tok *oauth2.Token) (*logical.Response, error) {
	internal := map[string]any{
		"client_id":    clientID,
		"access_token": tok.AccessToken,
		"expires_at":   tok.Expiry.Format(time.RFC3339),
	}
	if tok.RefreshToken != "" {
		internal["refresh_token"] = tok.RefreshToken
	}
	if name != "" {
		internal["role"] = name
	}
	resp := b.Secret(secretAccessTokenType).Response(tokenData(tok.AccessToken, tok.Type(), tokenScope(tok), tok.Expiry), internal)
	resp.Secret.TTL, resp.Secret.MaxTTL = leaseTTLs(r, time.Now(), tok.Expiry)
	return b.leaseOrRevoke(ctx, s, clientID, tok, resp)
}

// leaseTTLs are the role's TTL and max TTL, capped so the lease never outlives the token. A zero
// TTL lets Vault apply the mount's default lease TTL and max, as tuned at that moment.
func leaseTTLs(r *role, issued, expiry time.Time) (ttl, maxTTL time.Duration) {
	ttl, maxTTL = r.TTL, r.MaxTTL
	if !expiry.IsZero() {
		if life := expiry.Sub(issued); maxTTL == 0 || life < maxTTL {
			maxTTL = life
		}
		if ttl > 0 {
			ttl = min(ttl, time.Until(expiry))
		}
	}
	return ttl, maxTTL
}

func secretAccessToken(b *backend) *framework.Secret {
	return &framework.Secret{
		Type: secretAccessTokenType,
		Fields: map[string]*framework.FieldSchema{
			"access_token": {Type: framework.TypeString, Description: "ev.energy access token."},
			"token_type":   {Type: framework.TypeString, Description: "Token type, Bearer."},
			"scope":        {Type: framework.TypeString, Description: "Scopes the token grants."},
			"expires_at":   {Type: framework.TypeString, Description: "When the token expires at ev.energy (RFC 3339)."},
		},
		Renew:  b.renewAccessToken,
		Revoke: b.revokeAccessToken,
	}
}

// renewAccessToken extends the lease within the role's TTLs and the token's expiry; the token stays the same.
func (b *backend) renewAccessToken(ctx context.Context, req *logical.Request, _ *framework.FieldData) (*logical.Response, error) {
	expiry, err := internalExpiry(req.Secret.InternalData)
	if err != nil {
		return nil, err
	}
	r := &role{}
	if name, ok := req.Secret.InternalData["role"].(string); ok {
		if r, err = b.role(ctx, req.Storage, name); err != nil {
			return nil, err
		}
	}
	resp := &logical.Response{Secret: req.Secret}
	resp.Secret.TTL, resp.Secret.MaxTTL = leaseTTLs(r, req.Secret.IssueTime, expiry)
	return resp, nil
}

// revokeAccessToken revokes the lease's tokens at ev.energy as the client that minted them. When
// ev.energy does not confirm, the revocation is queued and the lease ends all the same: Vault gives
// up on a lease after a few failed attempts and marks it irrevocable, the queue never gives up.
func (b *backend) revokeAccessToken(ctx context.Context, req *logical.Request, _ *framework.FieldData) (*logical.Response, error) {
	internal := req.Secret.InternalData
	rec := revocation{Reason: reasonLeaseEnded}
	rec.ClientID, _ = internal["client_id"].(string)
	rec.AccessToken, _ = internal["access_token"].(string)
	rec.RefreshToken, _ = internal["refresh_token"].(string)
	rec.ExpiresAt, _ = internalExpiry(internal)
	if b.System().Tainted() {
		// The mount is being disabled (or moved), which wipes its storage and so any queued record:
		// only ev.energy's confirmation ends this lease, and an error keeps it for Vault to retry.
		if err := b.revokeRecord(ctx, req.Storage, &rec, urgentRevocation()); err != nil {
			return nil, fmt.Errorf("the mount's storage is going away, so this revocation cannot be queued: %w", err)
		}
		return nil, nil
	}
	return nil, b.revokeOrQueue(ctx, req.Storage, rec)
}

func internalExpiry(internal map[string]any) (time.Time, error) {
	raw, _ := internal["expires_at"].(string)
	if raw == "" {
		return time.Time{}, errors.New("lease has no token expiry")
	}
	return time.Parse(time.RFC3339, raw)
}
