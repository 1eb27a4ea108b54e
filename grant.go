package evenergy

import (
	"context"
	"errors"
	"fmt"
	"net/http"
	"time"

	"github.com/hashicorp/vault/sdk/helper/locksutil"
	"github.com/hashicorp/vault/sdk/logical"
	"golang.org/x/oauth2"
)

const (
	grantActive      = "active"
	grantRevoked     = "revoked"
	grantOtherClient = "other_client" // shown, never stored: the config names another client now
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

// refreshed is a copy of g holding the tokens of a refresh or a code exchange.
func (g grant) refreshed(tok *oauth2.Token) *grant {
	g.AccessToken, g.TokenType, g.Scope, g.ExpiresAt = tok.AccessToken, tok.Type(), tokenScope(tok), tok.Expiry
	if tok.RefreshToken != "" {
		g.RefreshToken = tok.RefreshToken
	}
	g.Status, g.LastRefreshedAt, g.LastError = grantActive, time.Now().UTC(), ""
	return &g
}

// ofOtherClient reports whether the grant was made for another client than the configured one:
// ev.energy would refuse its refresh token from this client, so it is never sent.
func (g *grant) ofOtherClient(cfg *config) bool {
	return g.ClientID != "" && g.ClientID != cfg.ClientID
}

// readAhead is how long before the refresh window a read refreshes. No lease is then shorter than
// it, so Vault Agent's reads come at least a second apart (it drops a read answered in the same
// second as the one before), and the periodic pass, which waits for the window itself, never
// rotates a token between the reads of an active reader.
const readAhead = 2 * time.Second

// due reports whether a read refreshes the access token first.
func (g *grant) due(cfg *config, now time.Time) bool {
	return g.ExpiresAt.Sub(now) <= cfg.RefreshWindow+readAhead
}

// unattended reports whether the token entered the refresh window with no reader refreshing it.
func (g *grant) unattended(cfg *config, now time.Time) bool {
	return g.ExpiresAt.Sub(now) <= cfg.RefreshWindow
}

// leasesEndBy is when the last lease handed out for g's access token ends: reads lease it until
// the refresh window, or, once inside the window, until its expiry at the latest.
func (g *grant) leasesEndBy(cfg *config, now time.Time) time.Time {
	if end := g.ExpiresAt.Add(-cfg.RefreshWindow); now.Before(end) {
		return end
	}
	return g.ExpiresAt
}

// usable returns why the user's grant cannot give a token now, or nil.
func (g *grant) usable(cfg *config, user string) error {
	switch {
	case g == nil:
		return logical.CodedError(http.StatusBadRequest, "no grant for user "+user+": send the user through auth-url first")
	case g.Status == grantRevoked:
		return &revokedGrantError{user: user, lastError: g.LastError}
	case g.ofOtherClient(cfg):
		return &otherClientError{user: user, grantClient: g.ClientID, configClient: cfg.ClientID}
	}
	return nil
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

// lockUser serializes work on one user's grant: ev.energy rotates its refresh token on each refresh.
func (b *backend) lockUser(user string) func() {
	lock := locksutil.LockForKey(b.locks, userPrefix+user)
	lock.Lock()
	return lock.Unlock
}

// storeGrant keeps a user's new tokens, replacing any grant the user had; the replaced grant is
// revoked once the leases handed out from it have ended.
func (b *backend) storeGrant(ctx context.Context, s logical.Storage, cfg *config, user string, tok *oauth2.Token) error {
	defer b.lockUser(user)()
	old, err := b.grant(ctx, s, user)
	if err == nil {
		err = b.putGrant(ctx, s, user, grant{ClientID: cfg.ClientID}.refreshed(tok))
	}
	if err != nil {
		// Vault could not keep the tokens, so ev.energy must not keep them either.
		b.disown(ctx, s, revocation{ClientID: cfg.ClientID, AccessToken: tok.AccessToken, RefreshToken: tok.RefreshToken, ExpiresAt: tok.Expiry, Reason: reasonUnowned})
		return err
	}
	if old != nil && old.Status == grantActive {
		replaced := revocation{ClientID: old.ClientID, AccessToken: old.AccessToken, RefreshToken: old.RefreshToken,
			ExpiresAt: old.ExpiresAt, NotBefore: old.leasesEndBy(cfg, time.Now()), Reason: reasonReplacedGrant}
		if err := b.queueRevocation(ctx, s, replaced, nil); err != nil {
			b.disown(ctx, s, replaced) // better end the readers' leases early than leave the grant alive
		}
	}
	return nil
}

// disown revokes tokens that nothing in Vault owns, now or through the queue.
func (b *backend) disown(ctx context.Context, s logical.Storage, rec revocation) {
	rec.NotBefore = time.Time{}
	if err := b.revokeOrQueue(context.WithoutCancel(ctx), s, rec); err != nil {
		b.Logger().Error("ev.energy tokens that Vault does not own could not be revoked nor queued", "client_id", rec.ClientID, "reason", rec.Reason, "error", err)
	}
}

// currentGrant returns the user's grant, refreshed first when its access token is inside the
// refresh window. A fresh grant comes from memory without a lock; refreshes are serialized per
// user, and the rotated refresh token is stored before anyone sees the new access token.
func (b *backend) currentGrant(ctx context.Context, s logical.Storage, cfg *config, client *evenergyClient, user string) (*grant, error) {
	g, err := b.grant(ctx, s, user)
	if err == nil && g.usable(cfg, user) == nil && !g.due(cfg, time.Now()) {
		return g, nil
	}
	defer b.lockUser(user)()
	// Again under the lock: another request may have refreshed it meanwhile.
	if g, err = b.grant(ctx, s, user); err != nil {
		return nil, err
	}
	if err := g.usable(cfg, user); err != nil {
		return nil, err
	}
	if !g.due(cfg, time.Now()) {
		return g, nil
	}
	// Only a node that can write may refresh, or the rotated refresh token would be lost.
	if err := b.ensureWritable(); err != nil {
		return nil, err
	}
	// Once sent, the refresh must reach storage even if the reader goes away: the old token is dead.
	ctx = context.WithoutCancel(ctx)
	tok, err := client.refresh(ctx, g.RefreshToken)
	b.metrics.refreshes.WithLabelValues(refreshOutcome(err)).Inc()
	if err == nil {
		next := g.refreshed(tok)
		if err := b.putGrant(ctx, s, user, next); err != nil {
			// Vault could not keep the rotated tokens, so ev.energy must not keep them either.
			b.disown(ctx, s, revocation{ClientID: cfg.ClientID, AccessToken: tok.AccessToken, RefreshToken: tok.RefreshToken, ExpiresAt: tok.Expiry, Reason: reasonUnowned})
			return nil, err
		}
		return next, nil
	}
	b.Logger().Warn("could not refresh an ev.energy user token", "user", user, "error", err)
	failed := *g
	failed.LastError = err.Error()
	if refreshOutcome(err) == refreshRevoked {
		failed.Status = grantRevoked
		err = &revokedGrantError{user: user, lastError: failed.LastError}
	}
	if perr := b.putGrant(ctx, s, user, &failed); perr != nil {
		return nil, perr
	}
	// A refresh that failed for a passing reason leaves the current access token usable until it expires.
	if failed.Status == grantActive && time.Now().Before(failed.ExpiresAt) {
		return &failed, nil
	}
	return nil, err
}

// refreshOutcome says what a refresh's error means for the grant: ev.energy's invalid_grant ends it.
func refreshOutcome(err error) string {
	var upstream *upstreamError
	switch {
	case err == nil:
		return refreshOK
	case errors.As(err, &upstream) && upstream.OAuthCode == "invalid_grant":
		return refreshRevoked
	default:
		return refreshFailed
	}
}
