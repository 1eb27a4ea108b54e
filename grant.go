package evenergy

import (
	"cmp"
	"context"
	"errors"
	"fmt"
	"net/http"
	"time"
	"unique"

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
	ClientID        string     `json:"client_id"` // the ev.energy client the user authorized; empty in grants stored before v0.2
	RefreshToken    string     `json:"refresh_token"`
	AccessToken     string     `json:"access_token"`
	TokenType       string     `json:"token_type"`
	Scope           string     `json:"scope"`
	ExpiresAt       time.Time  `json:"expires_at"`
	Status          string     `json:"status"`
	LastRefreshedAt time.Time  `json:"last_refreshed_at"`
	LastError       string     `json:"last_error"`
	RevokedAt       *time.Time `json:"revoked_at,omitempty"` // when ev.energy was found to refuse the refresh token; a pointer costs a cached grant 16 bytes, a time.Time 32
}

// getGrant reads the user's stored grant (nil when there is none), its repeated strings shared.
func getGrant(ctx context.Context, s logical.Storage, user string) (*grant, error) {
	g, err := getJSON[grant](ctx, s, userPrefix+user)
	if g != nil {
		g.ClientID, g.TokenType, g.Scope, g.Status = intern(g.ClientID), intern(g.TokenType), intern(g.Scope), intern(g.Status)
	}
	return g, err
}

// intern returns a copy of s that the grants holding it share: their own copies of the strings most
// grants repeat (client_id, token_type, scope, status) were 80 of the 345 bytes a cached grant held.
func intern(s string) string { return unique.Make(s).Value() }

// refreshed is a copy of g holding the tokens of a refresh or a code exchange.
func (g grant) refreshed(tok *oauth2.Token) *grant {
	// The expiry as storage holds it, without a monotonic reading: every cached grant comes due by one clock.
	g.AccessToken, g.TokenType, g.Scope, g.ExpiresAt = tok.AccessToken, intern(tok.Type()), intern(tokenScope(tok)), tok.Expiry.Round(0)
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

// refreshWindow is the config's refresh_window for this grant's token, capped at half the token's
// life: a window as long as the token would have every read rotate it, killing the token the
// previous reader got. A config stored before the window was checked may hold 0: the default then.
func (g *grant) refreshWindow(cfg *config) time.Duration {
	window := cfg.RefreshWindow
	if window <= 0 {
		window = defaultRefreshWindow
	}
	if life := g.ExpiresAt.Sub(g.LastRefreshedAt).Round(time.Second); !g.LastRefreshedAt.IsZero() && window >= life {
		return life / 2
	}
	return window
}

// windowOpens is when the token enters the refresh window: at once for a grant that a check
// (check-grants) started after its last refresh has yet to refresh.
func (g *grant) windowOpens(cfg *config) time.Time {
	opens := g.ExpiresAt.Add(-g.refreshWindow(cfg))
	if g.LastRefreshedAt.Before(cfg.CheckGrantsBefore) && cfg.CheckGrantsBefore.Before(opens) {
		return cfg.CheckGrantsBefore
	}
	return opens
}

// due reports whether a read refreshes the access token first.
func (g *grant) due(cfg *config, now time.Time) bool {
	return !now.Before(g.windowOpens(cfg).Add(-readAhead))
}

// unattended reports whether the token entered the refresh window with no reader refreshing it.
func (g *grant) unattended(cfg *config, now time.Time) bool {
	return !now.Before(g.windowOpens(cfg))
}

// leasesEndBy is when the last lease handed out for g's access token ends: reads lease it until
// the refresh window, or, once inside the window, until its expiry at the latest.
func (g *grant) leasesEndBy(cfg *config, now time.Time) time.Time {
	if end := g.windowOpens(cfg); now.Before(end) {
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
	return b.userLocks.lock(user)
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

// currentGrant returns the user's grant, refreshed first when its access token is due, and how long
// a reader may keep the token (its lease). A fresh grant comes from memory without a lock. A due one
// is refreshed by one call at a time, which every reader arriving meanwhile waits for; after a
// failure, readers get the still-valid token until the next attempt may go. The call waits for its
// turn under the call budget: a reader's (reader set) before the background pass's.
func (b *backend) currentGrant(ctx context.Context, s logical.Storage, cfg *config, client *evenergyClient, user string, reader bool) (*grant, time.Duration, error) {
	now := b.cache.refreshes.now()
	g, err := b.grant(ctx, s, user)
	if err == nil {
		err = g.usable(cfg, user)
	}
	if err != nil {
		return nil, 0, err
	}
	if !g.due(cfg, now) {
		return g, g.lease(cfg, now), nil
	}
	// Only a node that can write may refresh, or the rotated refresh token would be lost.
	if err := b.ensureWritable(); err != nil {
		return nil, 0, err
	}
	f, start, held := b.cache.refreshes.join(user, g.RefreshToken, now)
	if held != nil {
		return g.heldLease(held, now)
	}
	if reader {
		b.budget.hurry(f.turn)
	}
	if start {
		// The flight is every waiting reader's, and once sent the refresh must reach storage (the
		// old token is dead then): it goes on if its starter goes away.
		detached := context.WithoutCancel(ctx)
		b.cache.refreshes.fly(user, f, func() (*grant, error) {
			if err := b.awaitTurn(detached, cfg, 1, f.turn); err != nil {
				return g, err // no call went: the token still serves until the next attempt
			}
			return b.refresh(detached, s, cfg, client, user)
		})
	}
	select {
	case <-f.done:
	case <-ctx.Done():
		return nil, 0, ctx.Err()
	}
	now = b.cache.refreshes.now()
	switch {
	case f.err != nil:
		return nil, 0, f.err
	case f.held != nil:
		return f.g.heldLease(f.held, now)
	}
	return f.g, f.g.lease(cfg, now), nil
}

// lease is how long a reader may keep the grant's token: until the planned refresh begins, so that
// Vault Agent re-reads in time, and at least readAhead.
func (g *grant) lease(cfg *config, now time.Time) time.Duration {
	return max(g.windowOpens(cfg).Sub(now), readAhead).Truncate(time.Second)
}

// refresh refreshes the user's grant, under the user's lock, if it is still due; its ctx is not the
// caller's (see currentGrant). It returns the refreshed grant; or after a passing failure the
// unchanged grant, whose token still serves, and the failure; or no grant and the error that
// leaves no token to give. The only storage write is the rotated grant, or the grant's new status
// when ev.energy no longer accepts it.
func (b *backend) refresh(ctx context.Context, s logical.Storage, cfg *config, client *evenergyClient, user string) (*grant, error) {
	defer b.lockUser(user)()
	// Again under the lock: a new authorization or a delete may have replaced the grant meanwhile.
	g, err := b.grant(ctx, s, user)
	if err == nil {
		err = g.usable(cfg, user)
	}
	if err != nil {
		return nil, err
	}
	if !g.due(cfg, b.cache.refreshes.now()) {
		return g, nil
	}
	tok, err := client.refresh(ctx, g.RefreshToken)
	outcome := refreshOutcome(err)
	b.metrics.refreshes.WithLabelValues(outcome).Inc()
	switch outcome {
	case refreshOK:
		next := g.refreshed(tok)
		next.ClientID = cmp.Or(next.ClientID, cfg.ClientID) // a grant stored before grants recorded their client adopts it
		b.putRotatedGrant(ctx, s, user, next)
		return next, nil
	case refreshRevoked:
		b.Logger().Warn("ev.energy no longer accepts a user's grant", "user", user, "error", err)
		revoked := *g
		found := b.cache.refreshes.now().UTC()
		revoked.Status, revoked.LastError, revoked.RevokedAt = grantRevoked, err.Error(), &found
		if err := b.putGrant(ctx, s, user, &revoked); err != nil {
			return nil, err
		}
		return nil, &revokedGrantError{user: user, lastError: revoked.LastError}
	}
	b.Logger().Warn("could not refresh an ev.energy user token; readers get the current one until the next attempt", "user", user, "error", err)
	return g, err
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
