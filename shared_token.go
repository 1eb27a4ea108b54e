package evenergy

import (
	"context"
	"errors"
	"slices"
	"time"

	"github.com/hashicorp/vault/sdk/framework"
	"github.com/hashicorp/vault/sdk/logical"
)

// sharedTokenPrefix keeps, seal-wrapped, the one client-credentials token of each shared role.
const sharedTokenPrefix = "shared-tokens/"

const secretSharedTokenType = "evenergy_shared_token"

// sharedToken is a shared role's token, which every reader of token/<role> gets under a lease that
// ends by its refresh point (RefreshAt), when the engine replaces it.
type sharedToken struct {
	grant           // the token and its refresh point, under the grants' rules; it has no refresh token
	Scopes []string `json:"scopes"` // the scopes it was minted for: a role or config asking for others replaces it
}

// sharedRole is a shared role's token as a heldToken.
type sharedRole struct {
	b      *backend
	s      logical.Storage
	cfg    *config
	client *evenergyClient
	name   string
	scopes []string
}

// key keeps a role's entry in refreshes apart from the users': user names hold no colon.
func (t sharedRole) key() string      { return "role:" + t.name }
func (t sharedRole) describe() string { return "the shared token of role " + t.name }

// point is the stored refresh point; a token that is missing (the zero grant) is due at once.
func (t sharedRole) point(g *grant) time.Time { return g.RefreshAt }

// current is the role's stored token, or the zero grant, due at once, when it has none that fits.
func (t sharedRole) current(ctx context.Context) (*grant, error) {
	st, err := t.b.sharedTokens.get(ctx, t.s, t.name)
	if err != nil || !t.fits(st) {
		return &grant{}, err
	}
	return &st.grant, nil
}

// fits reports whether st was minted by the configured client for the role's scopes.
func (t sharedRole) fits(st *sharedToken) bool {
	return st != nil && st.ClientID == t.cfg.ClientID && slices.Equal(st.Scopes, t.scopes)
}

// renew mints the role's next token, under the role's lock, if the stored one is due or does not
// fit; it returns refresh's outcomes, a failed first mint as the zero grant and the failure, held
// back as a failed refresh is. The token it replaces is revoked once its leases have ended.
func (t sharedRole) renew(ctx context.Context) (*grant, error) {
	b := t.b
	defer b.sharedLocks.lock(t.name)()
	old, err := b.sharedTokens.get(ctx, t.s, t.name)
	if err != nil {
		return nil, err
	}
	if t.fits(old) && b.cache.refreshes.now().Before(old.RefreshAt) {
		return &old.grant, nil // replaced meanwhile
	}
	tok, err := t.client.clientCredentialsToken(ctx, t.scopes)
	if err != nil {
		if !t.fits(old) {
			// No token to give: readers get this failure, with no call, until the next attempt.
			b.cache.refreshes.failed(t.key(), &grant{}, err)
			return &grant{}, err
		}
		// The next attempt becomes the token's refresh point, as for a user's grant.
		held := *old
		held.RefreshAt = b.cache.refreshes.failed(t.key(), &old.grant, err)
		if stored := b.sharedTokens.put(ctx, t.s, t.name, &held); stored != nil {
			b.Logger().Warn("could not replace a role's shared ev.energy token nor store when to try again", "role", t.name, "error", err, "storage_error", stored)
			return &old.grant, err
		}
		b.Logger().Warn("could not replace a role's shared ev.energy token; readers get the current one until the next attempt", "role", t.name, "error", err, "next_attempt", held.RefreshAt)
		return &held.grant, err
	}
	b.retired.minted(tok.Expiry)
	next := &sharedToken{grant: *grant{ClientID: t.cfg.ClientID}.refreshed(tok, t.cfg), Scopes: t.scopes}
	if err := b.sharedTokens.put(ctx, t.s, t.name, next); err != nil {
		b.disown(ctx, t.s, revocation{ClientID: t.cfg.ClientID, AccessToken: tok.AccessToken, RefreshToken: tok.RefreshToken, ExpiresAt: tok.Expiry, Reason: reasonUnowned})
		return nil, err
	}
	b.metrics.sharedTokens.WithLabelValues(sharedMinted).Inc()
	if old != nil {
		b.metrics.sharedTokens.WithLabelValues(sharedReplaced).Inc()
		b.revokeAfterLeases(ctx, t.s, old.revocation(reasonReplacedShared))
	}
	return &next.grant, nil
}

// revocation is what revoking the token takes, not before its refresh point, by which every lease
// handed out for it has ended.
func (st *sharedToken) revocation(reason string) revocation {
	return revocation{ClientID: st.ClientID, AccessToken: st.AccessToken, RefreshToken: st.RefreshToken,
		ExpiresAt: st.ExpiresAt, NotBefore: st.RefreshAt, Reason: reason}
}

// sharedRoleToken is the heldToken of the named shared role r.
func (b *backend) sharedRoleToken(s logical.Storage, cfg *config, client *evenergyClient, name string, r *role) sharedRole {
	scopes := r.Scopes
	if len(scopes) == 0 {
		scopes = cfg.Scopes
	}
	return sharedRole{b: b, s: s, cfg: cfg, client: client, name: name, scopes: scopes}
}

// readSharedToken answers a read of a shared role's token: the stored one, from memory, under a
// lease that ends by its refresh point and cannot be renewed (see currentToken).
func (b *backend) readSharedToken(ctx context.Context, s logical.Storage, cfg *config, client *evenergyClient, name string, r *role) (*logical.Response, error) {
	g, lease, err := b.currentToken(ctx, cfg, b.sharedRoleToken(s, cfg, client, name, r))
	if err != nil {
		return nil, err
	}
	for _, limit := range []time.Duration{r.TTL, r.MaxTTL} {
		if limit > 0 {
			lease = min(lease, limit)
		}
	}
	internal := map[string]any{"client_id": g.ClientID, "access_token": g.AccessToken, "expires_at": g.ExpiresAt.Format(time.RFC3339), "role": name}
	resp := b.Secret(secretSharedTokenType).Response(tokenData(g.AccessToken, g.TokenType, g.Scope, g.ExpiresAt), internal)
	resp.Secret.TTL, resp.Secret.MaxTTL, resp.Secret.Renewable = lease, lease, false
	return resp, nil
}

func secretSharedToken(b *backend) *framework.Secret {
	return &framework.Secret{
		Type: secretSharedTokenType,
		Fields: map[string]*framework.FieldSchema{
			"access_token": {Type: framework.TypeString, Description: "The role's shared ev.energy access token."},
		},
		Revoke: b.revokeSharedLease,
	}
}

// revokeSharedLease revokes nothing, as every reader of the role shares the token and the engine
// revokes it once replaced; except while the mount is being disabled, which wipes the stored token.
func (b *backend) revokeSharedLease(ctx context.Context, req *logical.Request, _ *framework.FieldData) (*logical.Response, error) {
	if !b.System().Tainted() {
		return nil, nil
	}
	return b.revokeAccessToken(ctx, req, nil)
}

// replaceDueSharedTokens replaces, for the periodic pass, the shared tokens whose refresh point has
// come or whose role or config asks for another; what is due is known from memory.
func (b *backend) replaceDueSharedTokens(ctx context.Context, s logical.Storage) error {
	stored, err := b.sharedTokens.all(ctx, s)
	if err != nil || len(stored) == 0 {
		return err
	}
	cfg, client, err := b.config(ctx, s)
	if err != nil {
		return nil // not configured: nothing to mint with
	}
	var errs []error
	for name := range stored {
		r, err := b.role(ctx, s, name)
		if err != nil || !r.Shared {
			continue // the role's delete or write retires its token
		}
		if err := b.refreshTokenIfDue(ctx, cfg, b.sharedRoleToken(s, cfg, client, name, r)); err != nil {
			errs = append(errs, err)
		}
	}
	return errors.Join(errs...)
}

// endSharedToken forgets the role's shared token and revokes it: now (an operator's rotation, the
// role's delete), or once its leases have ended (the role no longer shares).
// It answers the warning an operator needs when leases still point at a token revoked now.
func (b *backend) endSharedToken(ctx context.Context, s logical.Storage, name string, now bool) ([]string, error) {
	defer b.sharedLocks.lock(name)()
	st, err := b.sharedTokens.get(ctx, s, name)
	if err != nil || st == nil {
		return nil, err
	}
	if err := b.sharedTokens.delete(ctx, s, name); err != nil {
		return nil, err
	}
	if !now {
		b.revokeAfterLeases(ctx, s, st.revocation(reasonReplacedShared))
		return nil, nil
	}
	rec := st.revocation(reasonRevokedShared)
	rec.NotBefore = time.Time{}
	if err := b.revokeOrQueue(context.WithoutCancel(ctx), s, rec); err != nil {
		return nil, err
	}
	return []string{"the shared token of role " + name + " is revoked, but Vault's leases for it run until " +
		st.RefreshAt.UTC().Format(time.RFC3339) + " at the latest, and Vault Agents keep rendering it until they read the role again: restart them"}, nil
}
