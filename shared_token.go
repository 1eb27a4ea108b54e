package evenergy

import (
	"context"
	"crypto/rand"
	"errors"
	"fmt"
	"net/http"
	"strings"
	"sync/atomic"
	"time"

	"github.com/hashicorp/vault/sdk/framework"
	"github.com/hashicorp/vault/sdk/logical"
	"golang.org/x/oauth2"
)

// sharedTokenPrefix keeps, seal-wrapped, the one client-credentials token of each shared role.
const sharedTokenPrefix = "shared-tokens/"

const secretSharedTokenType = "evenergy_shared_token"

// sharedRole is a shared role's token as a heldToken: in the token store at shared-tokens/<role>, a
// grant without a refresh token, which every reader of token/<role> gets under a lease that ends by
// its refresh point, when the engine replaces it.
type sharedRole struct {
	b    *backend
	s    logical.Storage
	cfg  *config
	name string
	role *role
}

// unreadLead is how long before its expiry a shared token comes due at the latest, whatever the
// refresh_window: one periodic pass (a minute, Vault's default) and its budget, so that the pass after
// its point replaces a token nobody reads while it lives.
const unreadLead = time.Minute + passBudget

// mintedWith fingerprints what a shared token minted now is minted with: the client, a hash of its
// secret (never the secret itself) and the scopes. A stored token of another fingerprint is not
// served, whatever writes did or failed to set it aside.
func mintedWith(cfg *config, r *role) string {
	return cfg.ClientID + "\x00" + cfg.secretDigest() + "\x00" + strings.Join(r.tokenScopes(cfg), " ")
}

// mintedAs reports whether fingerprint is mintedWith(cfg, r), without building it: a shared read
// checks it every time.
func mintedAs(fingerprint string, cfg *config, r *role) bool {
	rest, ok := strings.CutPrefix(fingerprint, cfg.ClientID)
	for _, part := range [...]string{"\x00", cfg.secretDigest(), "\x00"} {
		if !ok {
			return false
		}
		rest, ok = strings.CutPrefix(rest, part)
	}
	for i, scope := range r.tokenScopes(cfg) {
		if i > 0 && ok {
			rest, ok = strings.CutPrefix(rest, " ")
		}
		if ok {
			rest, ok = strings.CutPrefix(rest, scope)
		}
	}
	return ok && rest == ""
}

func (t sharedRole) key() string      { return sharedTokenPrefix + t.name }
func (t sharedRole) describe() string { return "the shared token of role " + t.name }

// current is the role's stored token, or the zero grant, due at once, when it has none minted with
// the configured client, secret and scopes, or only one being ended (see grantEnding).
func (t sharedRole) current(ctx context.Context) (*grant, error) {
	g, _, err := t.stored(ctx)
	return g, err
}

// stored is current, and the token stored whatever its client (nil if none).
func (t sharedRole) stored(ctx context.Context) (current, stored *grant, err error) {
	stored, err = t.b.tokens.get(ctx, t.s, t.key())
	return t.served(stored), stored, err
}

// served is stored if readers may get it, else the zero grant.
func (t sharedRole) served(stored *grant) *grant {
	if stored == nil || stored.Status == grantEnding || !mintedAs(stored.MintedWith, t.cfg, t.role) {
		return &grant{}
	}
	return stored
}

// renew mints the role's next token, under its lock, if the stored one is due or minted otherwise,
// with the role and the config in force now: a write of either that changes what the token is
// minted with ends the stored one, and a read that started before must not mint it again. It
// returns refresh's outcomes, a failed first mint as the zero grant and the failure, held back as a
// failed refresh is. The token it replaces is revoked once its leases have ended.
func (t sharedRole) renew(ctx context.Context) (*grant, error) {
	b := t.b
	defer b.tokens.lock(t.key())()
	cfg, client, err := b.config(ctx, t.s)
	if err != nil {
		return nil, err
	}
	r, err := b.role(ctx, t.s, t.name)
	if err != nil {
		return nil, err
	}
	if !r.Shared {
		return nil, logical.CodedError(http.StatusConflict, "role "+t.name+" no longer shares its token: read it again")
	}
	t.cfg, t.role = cfg, r
	// From storage, not memory: a mint over a token memory missed (a start-up load racing the mint
	// that stored it) would replace it unqueued. A replacement is rare; the read is cheap.
	old, err := getGrant(ctx, t.s, t.key())
	if err != nil {
		return nil, err
	}
	current := t.served(old)
	if !current.due(cfg, b.tokens.refreshes.now()) {
		b.tokens.invalidate(t.key()) // memory found it due: read storage again next time
		return current, nil          // replaced meanwhile
	}
	// The old token is queued before the mint: while storage refuses, nothing is minted that nothing
	// could own (the old token serves until its leases end), and once it is queued the new one may
	// replace it whenever storage takes it.
	queued := ""
	if old != nil {
		queued = rand.Text()
		if err := b.queueRevocationAt(ctx, t.s, queued, old.revocation(old.leasesEnd(cfg), reasonReplacedShared), nil); err != nil {
			b.tokens.refreshes.failed(t.key(), current, err) // held back as a failed mint
			return current, err
		}
	}
	tok, err := client.clientCredentialsToken(ctx, r.tokenScopes(cfg))
	if err != nil {
		retryAt := b.tokens.refreshes.failed(t.key(), current, err)
		if current.AccessToken == "" {
			return current, err // no token to give: readers get this failure, with no call, until the next attempt
		}
		if queued != "" {
			// Still served: not revoked where its leases end now, as the next attempt moves that end.
			if unqueue := b.revocations.delete(context.WithoutCancel(ctx), t.s, queued); unqueue != nil {
				return current, err // queued where its leases end: the stored point stays there
			}
		}
		if retryAt.Before(current.leasesEnd(cfg)) {
			// Made due early (check-grants): the stored point stays where its leases end, as the old token
			// is revoked there once replaced; memory holds the next attempt back.
			return current, err
		}
		held := *current
		held.RefreshAt = retryAt
		// The next attempt becomes the token's refresh point, as for a user's grant.
		if stored := b.tokens.put(ctx, t.s, t.key(), &held); stored != nil {
			b.Logger().Warn("could not replace a role's shared ev.energy token nor store when to try again", "role", t.name, "error", err, "storage_error", stored)
			return current, err
		}
		b.Logger().Warn("could not replace a role's shared ev.energy token; readers get the current one until the next attempt", "role", t.name, "error", err, "next_attempt", held.RefreshAt)
		return &held, err
	}
	b.retired.minted(tok.Expiry)
	next := grant{ClientID: cfg.ClientID, MintedWith: intern(mintedWith(cfg, r))}.refreshed(tok, cfg)
	if latest := next.ExpiresAt.Add(-min(unreadLead, next.ExpiresAt.Sub(next.LastRefreshedAt)/2)); latest.Before(next.RefreshAt) {
		next.RefreshAt = latest
	}
	if err = b.tokens.put(ctx, t.s, t.key(), next); err != nil {
		if queued != "" {
			// Still stored and served: a later failed mint moves the end of its leases.
			_ = b.revocations.delete(context.WithoutCancel(ctx), t.s, queued) // refused too: queued where its leases end now
		}
		// Held back as a failed mint, or every read would mint a token while storage refuses.
		b.tokens.refreshes.failed(t.key(), current, err)
		return current, &unstoredSharedToken{err: err, rec: revocation{ClientID: cfg.ClientID, AccessToken: tok.AccessToken, RefreshToken: tok.RefreshToken, ExpiresAt: tok.Expiry, Reason: reasonUnowned}, b: b, s: t.s}
	}
	b.metrics.sharedTokens.WithLabelValues(sharedMinted).Inc()
	if old != nil {
		b.metrics.sharedTokens.WithLabelValues(sharedReplaced).Inc()
	}
	return next, nil
}

// unstoredSharedToken is the error of a shared token ev.energy minted but storage refused: one reader
// claims it and gets the token under a lease of its own, which revokes it (no revocation nor queue
// call that could fail too), and whoever else is left with it unclaimed disowns it.
type unstoredSharedToken struct {
	err     error // storage's
	rec     revocation
	b       *backend
	s       logical.Storage
	claimed atomic.Bool
}

func (u *unstoredSharedToken) Error() string { return u.err.Error() }
func (u *unstoredSharedToken) Unwrap() error { return u.err }

// claim reports whether the caller is the first to take the token.
func (u *unstoredSharedToken) claim() bool { return u.claimed.CompareAndSwap(false, true) }

// disownUnclaimed revokes or queues the unstored token err carries, unless a reader claimed it.
func disownUnclaimed(ctx context.Context, err error) {
	if unstored := (*unstoredSharedToken)(nil); errors.As(err, &unstored) && unstored.claim() {
		unstored.b.disown(ctx, unstored.s, unstored.rec)
	}
}

// readSharedToken answers a read of a shared role's token: the stored one, from memory, under a
// lease that ends by its refresh point and cannot be renewed (see currentToken). The lease names
// only the role: what crosses to Vault and into each lease entry is what Vault needs.
func (b *backend) readSharedToken(ctx context.Context, s logical.Storage, cfg *config, name string, r *role) (*logical.Response, error) {
	g, lease, err := b.currentToken(ctx, cfg, sharedRole{b, s, cfg, name, r})
	if unstored := (*unstoredSharedToken)(nil); errors.As(err, &unstored) && unstored.claim() {
		tok := &oauth2.Token{AccessToken: unstored.rec.AccessToken, RefreshToken: unstored.rec.RefreshToken, Expiry: unstored.rec.ExpiresAt}
		return b.leaseMintedToken(ctx, s, unstored.rec.ClientID, name, r, tok)
	}
	if err != nil {
		return nil, err
	}
	for _, limit := range []time.Duration{r.TTL, r.MaxTTL} {
		if limit > 0 {
			lease = min(lease, limit)
		}
	}
	resp := b.Secret(secretSharedTokenType).Response(tokenData(g.AccessToken, g.TokenType, g.Scope, g.ExpiresAt), map[string]any{"role": name})
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
// revokes it once replaced; except while the mount is being disabled, which wipes the stored token:
// then the token of the lease's role is revoked now, and only ev.energy's confirmation ends the lease.
func (b *backend) revokeSharedLease(ctx context.Context, req *logical.Request, _ *framework.FieldData) (*logical.Response, error) {
	if !b.System().Tainted() {
		return nil, nil
	}
	name, _ := req.Secret.InternalData["role"].(string)
	key := sharedTokenPrefix + name
	defer b.tokens.lock(key)()
	g, err := b.tokens.get(ctx, req.Storage, key)
	if err != nil || g == nil {
		return nil, err // the role has no token now: the engine revoked or queued the last one as it forgot it
	}
	rec := g.revocation(time.Time{}, reasonLeaseEnded)
	if err := b.revokeRecord(ctx, req.Storage, &rec, urgentRevocation()); err != nil {
		return nil, fmt.Errorf("the mount's storage is going away, so the shared token of role %s cannot be queued for revocation: %w", name, err)
	}
	return nil, b.tokens.put(ctx, req.Storage, key, nil) // revoked: the role's other leases find nothing left to revoke
}

// endSharedToken revokes the role's shared token and then forgets it: now (an operator's rotation,
// the role's delete), stored as ending first so that no read serves it once revoked; or once its
// leases have ended (the role no longer shares). When storage refuses the mark or the revocation's
// queueing, the token stays stored, owned, and the caller gets the error.
// It answers the warning an operator needs when leases still point at a token revoked now.
func (b *backend) endSharedToken(ctx context.Context, s logical.Storage, name string, now bool) ([]string, error) {
	key := sharedTokenPrefix + name
	defer b.tokens.lock(key)()
	g, err := b.tokens.get(ctx, s, key)
	if err != nil || g == nil {
		return nil, err
	}
	if now {
		// Marked first, so no read serves it once revoked; refused, nothing is revoked yet.
		if err := b.tokens.put(ctx, s, key, g.ending()); err != nil {
			return nil, err
		}
		err = b.revokeOrQueue(context.WithoutCancel(ctx), s, g.revocation(time.Time{}, reasonRevokedShared))
	} else {
		err = b.queueRevocation(ctx, s, g.revocation(g.RefreshAt, reasonReplacedShared), nil)
	}
	if err != nil {
		return nil, err
	}
	if err := b.tokens.put(ctx, s, key, nil); err != nil {
		return nil, err // its revocation is queued or done: a retry queues it again, which costs one more call
	}
	if !now {
		b.metrics.sharedTokens.WithLabelValues(sharedReplaced).Inc()
		return nil, nil
	}
	return []string{"the shared token of role " + name + " is revoked, but Vault's leases for it run until " +
		g.RefreshAt.UTC().Format(time.RFC3339) + " at the latest, and Vault Agents keep rendering it until they read the role again: restart them"}, nil
}

// endSharedTokens ends every shared role's token once its leases have ended, as the config it was
// minted with changed: the next read or pass mints anew.
func (b *backend) endSharedTokens(ctx context.Context, s logical.Storage) error {
	names, err := s.List(ctx, sharedTokenPrefix)
	if err != nil {
		return err
	}
	for _, name := range names {
		if _, err := b.endSharedToken(ctx, s, name, false); err != nil {
			return err
		}
	}
	return nil
}
