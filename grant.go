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
	ClientID     string    `json:"client_id"` // the ev.energy client the user authorized; empty in grants stored before v0.2
	RefreshToken string    `json:"refresh_token"`
	AccessToken  string    `json:"access_token"`
	TokenType    string    `json:"token_type"`
	Scope        string    `json:"scope"`
	ExpiresAt    time.Time `json:"expires_at"`
	// RefreshAt is the refresh point, fixed when the token is issued or a refresh fails: no refresh
	// starts before it, and every lease handed out for the access token ends by it. Zero in grants
	// stored before v0.4 (see refreshAt).
	RefreshAt       time.Time `json:"refresh_at"`
	Status          string    `json:"status"`
	LastRefreshedAt time.Time `json:"last_refreshed_at"`
	LastError       string    `json:"last_error"`
	// RevokedAt is when ev.energy was found to refuse the refresh token; a pointer costs a cached
	// grant 16 bytes, a time.Time 32.
	RevokedAt *time.Time `json:"revoked_at,omitempty"`
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

// refreshed is a copy of g holding the tokens of a refresh or a code exchange, to be refreshed
// where cfg's refresh window opens for them.
func (g grant) refreshed(tok *oauth2.Token, cfg *config) *grant {
	// The expiry as storage holds it, without a monotonic reading: every cached grant comes due by one clock.
	g.AccessToken, g.TokenType, g.Scope, g.ExpiresAt = tok.AccessToken, intern(tok.Type()), intern(tokenScope(tok)), tok.Expiry.Round(0)
	if tok.RefreshToken != "" {
		g.RefreshToken = tok.RefreshToken
	}
	g.Status, g.LastRefreshedAt, g.LastError = grantActive, time.Now().UTC(), ""
	g.RefreshAt = g.windowOpens(cfg)
	return &g
}

// ofOtherClient reports whether the grant was made for another client than the configured one:
// ev.energy would refuse its refresh token from this client, so it is never sent.
func (g *grant) ofOtherClient(cfg *config) bool {
	return g.ClientID != "" && g.ClientID != cfg.ClientID
}

// readAhead is the shortest lease a read hands out: a read within it of the refresh point waits for
// the point and the refresh instead, so Vault Agent's reads come at least a second apart (it drops
// a read answered in the same second as the one before).
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

// windowOpens is when the token enters cfg's refresh window.
func (g *grant) windowOpens(cfg *config) time.Time {
	return g.ExpiresAt.Add(-g.refreshWindow(cfg))
}

// refreshAt is the grant's refresh point. A grant stored before grants recorded it takes it from
// the config in force when it is read, as the leases of earlier versions ended there. A check
// (check-grants) started after the grant's last refresh brings it forward to the check's start: the
// operator asked for it, and was warned that it ends the token readers hold.
func (g *grant) refreshAt(cfg *config) time.Time {
	at := g.RefreshAt
	if at.IsZero() {
		at = g.windowOpens(cfg)
	}
	if g.LastRefreshedAt.Before(cfg.CheckGrantsBefore) && cfg.CheckGrantsBefore.Before(at) {
		return cfg.CheckGrantsBefore
	}
	return at
}

// due reports whether a refresh of the grant may start.
func (g *grant) due(cfg *config, now time.Time) bool {
	return !now.Before(g.refreshAt(cfg))
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
		err = b.putGrant(ctx, s, user, grant{ClientID: cfg.ClientID}.refreshed(tok, cfg))
	}
	if err != nil {
		// Vault could not keep the tokens, so ev.energy must not keep them either.
		b.disown(ctx, s, revocation{ClientID: cfg.ClientID, AccessToken: tok.AccessToken, RefreshToken: tok.RefreshToken, ExpiresAt: tok.Expiry, Reason: reasonUnowned})
		return err
	}
	if old != nil && old.Status == grantActive {
		b.revokeAfterLeases(ctx, s, revocation{ClientID: old.ClientID, AccessToken: old.AccessToken, RefreshToken: old.RefreshToken,
			ExpiresAt: old.ExpiresAt, NotBefore: old.refreshAt(cfg), Reason: reasonReplacedGrant})
	}
	return nil
}

// revokeAfterLeases queues the revocation of replaced tokens until rec.NotBefore, by which the
// leases handed out for them end.
func (b *backend) revokeAfterLeases(ctx context.Context, s logical.Storage, rec revocation) {
	if err := b.queueRevocation(ctx, s, rec, nil); err != nil {
		b.disown(ctx, s, rec) // better end the readers' leases early than leave the tokens alive
	}
}

// disown revokes tokens that nothing in Vault owns, now or through the queue.
func (b *backend) disown(ctx context.Context, s logical.Storage, rec revocation) {
	rec.NotBefore = time.Time{}
	if err := b.revokeOrQueue(context.WithoutCancel(ctx), s, rec); err != nil {
		b.Logger().Error("ev.energy tokens that Vault does not own could not be revoked nor queued", "client_id", rec.ClientID, "reason", rec.Reason, "error", err)
	}
}

// usableGrant returns the user's grant, or why it cannot give a token.
func (b *backend) usableGrant(ctx context.Context, s logical.Storage, cfg *config, user string) (*grant, error) {
	g, err := b.grant(ctx, s, user)
	if err == nil {
		err = g.usable(cfg, user)
	}
	if err != nil {
		return nil, err
	}
	return g, nil
}

// heldToken is a token the engine holds and rotates, a user's grant or a shared role's token: one
// set of rules serves both (a lease until its refresh point, one refresh in flight, backoff).
type heldToken interface {
	key() string                                 // its entry in refreshes
	describe() string                            // whose token it is, for errors
	current(ctx context.Context) (*grant, error) // the token held now, or why none can be given
	point(g *grant) time.Time                    // g's refresh point
	renew(ctx context.Context) (*grant, error)   // refreshes it if still due, with refresh's outcomes
}

// userToken is a user's grant as a heldToken.
type userToken struct {
	b      *backend
	s      logical.Storage
	cfg    *config
	client *evenergyClient
	user   string
}

func (t userToken) key() string      { return t.user }
func (t userToken) describe() string { return "user " + t.user }
func (t userToken) current(ctx context.Context) (*grant, error) {
	return t.b.usableGrant(ctx, t.s, t.cfg, t.user)
}
func (t userToken) point(g *grant) time.Time { return g.refreshAt(t.cfg) }
func (t userToken) renew(ctx context.Context) (*grant, error) {
	return t.b.refresh(ctx, t.s, t.cfg, t.client, t.user)
}

// currentGrant returns the user's grant and how long a reader may keep its token (see currentToken).
func (b *backend) currentGrant(ctx context.Context, s logical.Storage, cfg *config, client *evenergyClient, user string) (*grant, time.Duration, error) {
	return b.currentToken(ctx, cfg, userToken{b, s, cfg, client, user})
}

// currentToken returns the held token and how long a reader may keep it (its lease): until its
// refresh point, so that no refresh kills the token while the lease lives. A token well before its
// point comes from memory without a lock. A read within readAhead of the point waits for it and
// then for the refresh, sent by one call at a time, which every reader arriving meanwhile waits
// for; after a passing failure the token's next attempt is its new point, and readers get the
// still-valid token until then. The refresh takes its turn under the call budget before the
// background's.
func (b *backend) currentToken(ctx context.Context, cfg *config, t heldToken) (*grant, time.Duration, error) {
	for {
		now := b.cache.refreshes.now()
		g, err := t.current(ctx)
		if err != nil {
			return nil, 0, err
		}
		at := t.point(g)
		if g.ExpiresAt.Before(at) && now.Before(at) {
			// A refresh failed after the token expired, and the next attempt is not due yet.
			return nil, 0, b.cache.refreshes.failure(t, g, at)
		}
		if now.Before(at.Add(-readAhead)) {
			return g, at.Sub(now).Truncate(time.Second), nil
		}
		// Only a node that can write may refresh, or the rotated refresh token would be lost.
		if err := b.ensureWritable(); err != nil {
			return nil, 0, err
		}
		if now.Before(at) {
			if err := b.cache.refreshes.waitUntil(ctx, at); err != nil {
				return nil, 0, err
			}
		}
		next, err := b.joinRefresh(ctx, cfg, t, g, true)
		now = b.cache.refreshes.now()
		switch {
		case next == nil:
			return nil, 0, err
		case err == nil && next.AccessToken != g.AccessToken:
			// A fresh token is answered at once; only one living under 2*readAhead could have its point
			// that close, and Vault reads a TTL of 0 as the mount's default.
			return next, max(t.point(next).Sub(now).Truncate(time.Second), time.Second), nil
		case err != nil && (next.ExpiresAt.Sub(now) < readAhead || !t.point(next).After(at)):
			return nil, 0, err // the token is about to expire, or no next attempt could be stored: nothing to promise
		}
		// Not refreshed: the token's point lies ahead, so the next round leases until it or waits for it.
	}
}

// refreshIfDue refreshes the user's grant if its refresh point has come (see refreshTokenIfDue).
func (b *backend) refreshIfDue(ctx context.Context, s logical.Storage, cfg *config, client *evenergyClient, user string) error {
	return b.refreshTokenIfDue(ctx, cfg, userToken{b, s, cfg, client, user})
}

// refreshTokenIfDue refreshes the held token if its refresh point has come, for the periodic pass,
// which neither waits for a point nor tries again. A passing failure is no error while the token
// still serves: its next attempt is stored with it.
func (b *backend) refreshTokenIfDue(ctx context.Context, cfg *config, t heldToken) error {
	g, err := t.current(ctx)
	if err != nil || b.cache.refreshes.now().Before(t.point(g)) {
		return err
	}
	next, err := b.joinRefresh(ctx, cfg, t, g, false)
	if next != nil && next.ExpiresAt.Sub(b.cache.refreshes.now()) >= readAhead {
		return nil
	}
	return err
}

// joinRefresh sends the refresh of the held token g, whose point has come, or joins the one in
// flight, and returns its outcome as renew does; while the last failure holds attempts back, the
// current token, whose point is that failure's next attempt if storage took it, and the failure.
// A reader's refresh (reader set) takes its turn under the call budget before the background's.
func (b *backend) joinRefresh(ctx context.Context, cfg *config, t heldToken, g *grant, reader bool) (*grant, error) {
	f, start, held := b.cache.refreshes.join(t.key(), g.RefreshToken, b.cache.refreshes.now())
	if held != nil {
		current, err := t.current(ctx)
		if err != nil {
			return nil, err
		}
		return current, held.err
	}
	if reader {
		b.budget.hurry(f.turn)
	}
	if start {
		// The flight is every waiting reader's, and once sent the refresh must reach storage (the
		// old token is dead then): it goes on if its starter goes away.
		detached := context.WithoutCancel(ctx)
		b.cache.refreshes.fly(t.key(), f, func() (*grant, error) {
			if err := b.awaitTurn(detached, cfg, 1, f.turn); err != nil {
				return g, err // no call went: the token still serves until its point
			}
			return t.renew(detached)
		})
	}
	select {
	case <-f.done:
		return f.g, f.err
	case <-ctx.Done():
		return nil, ctx.Err()
	}
}

// refresh refreshes the user's grant, under the user's lock, if it is still due; its ctx is not the
// caller's (see joinRefresh). It returns the refreshed grant; or after a passing failure the grant
// whose token still serves, its next attempt stored as its refresh point if storage took it, and
// the failure; or no grant and the error that leaves no token to give. It writes to storage once:
// the rotated grant, the next attempt, or the grant's new status when ev.energy no longer accepts it.
func (b *backend) refresh(ctx context.Context, s logical.Storage, cfg *config, client *evenergyClient, user string) (*grant, error) {
	defer b.lockUser(user)()
	// Again under the lock: a new authorization or a delete may have replaced the grant meanwhile.
	g, err := b.usableGrant(ctx, s, cfg, user)
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
		next := g.refreshed(tok, cfg)
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
	// The next attempt becomes the grant's refresh point, in storage so that every node, and a node
	// taking over, ends the leases it hands out by then and sends no attempt before.
	held := *g
	held.RefreshAt = b.cache.refreshes.failed(user, g, err)
	if stored := b.putGrant(ctx, s, user, &held); stored != nil {
		b.Logger().Warn("could not refresh an ev.energy user token nor store when to try again; readers get the failure until then", "user", user, "error", err, "storage_error", stored)
		return g, err
	}
	b.Logger().Warn("could not refresh an ev.energy user token; readers get the current one until the next attempt", "user", user, "error", err, "next_attempt", held.RefreshAt)
	return &held, err
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
