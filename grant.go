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

// grant is what Vault keeps of one ev.energy user's authorization, and of a shared role's token
// (which has no refresh token): a held token (see tokenStore). Its tokens never leave except the
// access token, through users/<user>/token and token/<role>.
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
	// MintedWith fingerprints what a shared role's token was minted with (see mintedWith); "" for a user's.
	MintedWith string `json:"minted_with,omitempty"`
	// RevokedAt is when ev.energy was found to refuse the refresh token; a pointer costs a cached
	// grant 16 bytes, a time.Time 32.
	RevokedAt *time.Time `json:"revoked_at,omitempty"`
}

// getGrant reads the held token stored at key (nil when there is none), its repeated strings shared.
func getGrant(ctx context.Context, s logical.Storage, key string) (*grant, error) {
	g, err := getJSON[grant](ctx, s, key)
	if g != nil {
		g.ClientID, g.TokenType, g.Scope, g.Status, g.MintedWith = intern(g.ClientID), intern(g.TokenType), intern(g.Scope), intern(g.Status), intern(g.MintedWith)
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

// leasesEnd is when every lease handed out for the grant's access token has ended: its stored refresh
// point, which check-grants does not move (it only makes the grant due earlier).
func (g *grant) leasesEnd(cfg *config) time.Time {
	if g.RefreshAt.IsZero() {
		return g.windowOpens(cfg)
	}
	return g.RefreshAt
}

// refreshable reports whether a refresh may go to the grant: it is not revoked, and of cfg's client.
func (g *grant) refreshable(cfg *config) bool {
	return g.Status != grantRevoked && !g.ofOtherClient(cfg)
}

// revocation is what revoking the grant's tokens takes, not before notBefore: its refresh point, by
// which the leases handed out for its access token have ended, or zero for at once.
func (g *grant) revocation(notBefore time.Time, reason string) revocation {
	return revocation{ClientID: g.ClientID, AccessToken: g.AccessToken, RefreshToken: g.RefreshToken,
		ExpiresAt: g.ExpiresAt, NotBefore: notBefore, Reason: reason}
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
	return b.tokens.lock(userPrefix + user)
}

// grant returns the user's grant (nil if none), from memory or else from storage.
func (b *backend) grant(ctx context.Context, s logical.Storage, user string) (*grant, error) {
	return b.tokens.get(ctx, s, userPrefix+user)
}

// putGrant stores the user's grant and then keeps it in memory; nil deletes it.
func (b *backend) putGrant(ctx context.Context, s logical.Storage, user string, g *grant) error {
	return b.tokens.put(ctx, s, userPrefix+user, g)
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
		b.revokeAfterLeases(ctx, s, old.revocation(old.leasesEnd(cfg), reasonReplacedGrant))
	}
	return nil
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

// userToken is a user's grant as a heldToken.
type userToken struct {
	b      *backend
	s      logical.Storage
	cfg    *config
	client *evenergyClient
	user   string
}

func (t userToken) key() string      { return userPrefix + t.user }
func (t userToken) describe() string { return "user " + t.user }
func (t userToken) current(ctx context.Context) (*grant, error) {
	return t.b.usableGrant(ctx, t.s, t.cfg, t.user)
}
func (t userToken) renew(ctx context.Context) (*grant, error) {
	return t.b.refresh(ctx, t.s, t.cfg, t.client, t.user)
}

// currentGrant returns the user's grant and how long a reader may keep its token (see currentToken).
func (b *backend) currentGrant(ctx context.Context, s logical.Storage, cfg *config, client *evenergyClient, user string) (*grant, time.Duration, error) {
	return b.currentToken(ctx, cfg, userToken{b, s, cfg, client, user})
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
	if !g.due(cfg, b.tokens.refreshes.now()) {
		return g, nil
	}
	tok, err := client.refresh(ctx, g.RefreshToken)
	lost := answerLost(err)
	if lost {
		// ev.energy may have rotated the grant and ended its access token: tried again at once, the
		// refresh either goes through (it did not) or is refused (it did: no grace period).
		b.Logger().Warn("the answer to a user's refresh was lost: trying again at once", "user", user, "error", err)
		tok, err = client.refresh(ctx, g.RefreshToken)
	}
	outcome := refreshOutcome(err)
	if lost && outcome == refreshRevoked {
		outcome = refreshLost
		err = fmt.Errorf("the answer to a refresh was lost after ev.energy rotated the grant, which has no grace period for the previous refresh token: %w", err)
	}
	b.metrics.refreshes.WithLabelValues(outcome).Inc()
	switch outcome {
	case refreshOK:
		next := g.refreshed(tok, cfg)
		next.ClientID = cmp.Or(next.ClientID, cfg.ClientID) // a grant stored before grants recorded their client adopts it
		if err := b.tokens.putRotated(ctx, s, userPrefix+user, next); err != nil {
			b.Logger().Error("storage refused a user's rotated ev.energy grant, which only this node's memory now holds: the periodic pass stores it once storage accepts writes", "user", user, "error", err)
		}
		return next, nil
	case refreshRevoked, refreshLost:
		b.Logger().Warn("ev.energy no longer accepts a user's grant", "user", user, "error", err)
		revoked := *g
		found := b.tokens.refreshes.now().UTC()
		revoked.Status, revoked.LastError, revoked.RevokedAt = grantRevoked, err.Error(), &found
		if err := b.putGrant(ctx, s, user, &revoked); err != nil {
			return nil, err
		}
		return nil, &revokedGrantError{user: user, lastError: revoked.LastError}
	}
	retryAt := b.tokens.refreshes.failed(userPrefix+user, g, err)
	if lost {
		// Whether the access token still lives is unknown: no lease on it, and no point moved for it.
		return g, err
	}
	// The next attempt becomes the grant's refresh point, in storage so that every node, and a node
	// taking over, ends the leases it hands out by then and sends no attempt before.
	held := *g
	held.RefreshAt = retryAt
	if stored := b.putGrant(ctx, s, user, &held); stored != nil {
		b.Logger().Warn("could not refresh an ev.energy user token nor store when to try again; readers get the failure until then", "user", user, "error", err, "storage_error", stored)
		return g, err
	}
	b.Logger().Warn("could not refresh an ev.energy user token; readers get the current one until the next attempt", "user", user, "error", err, "next_attempt", held.RefreshAt)
	return &held, err
}

// answerLost reports whether a refresh's outcome is unknown: the request may have reached ev.energy,
// which may have rotated the grant, but its answer was lost (a hang-up, a timeout).
func answerLost(err error) bool {
	var upstream *upstreamError
	return errors.As(err, &upstream) && (upstream.Fault == faultTimeout || upstream.Fault == faultBroken)
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

// grantsByStatus counts the users' grants in memory by status, for metrics.
func (b *backend) grantsByStatus() map[string]int {
	b.cache.mu.RLock()
	var cfg *config
	if b.cache.configured != nil {
		cfg = b.cache.configured.cfg
	}
	b.cache.mu.RUnlock()
	return b.tokens.usersByStatus(cfg)
}
