package evenergy

import (
	"context"
	"crypto/rand"
	"crypto/subtle"
	"errors"
	"fmt"
	"net/http"
	"strings"
	"time"
	"unicode"

	"github.com/hashicorp/vault/sdk/logical"
	"golang.org/x/oauth2"
)

// unconfirmedGrantPrefix keeps, seal-wrapped and by state, the tokens of links their makers made for
// themselves that came back to the callback: whoever opened the link may not be its maker, so the
// tokens wait for the maker to write back the confirmation code the callback page showed.
const unconfirmedGrantPrefix = "unconfirmed-grants/"

const (
	confirmationAttempts = 5   // wrong confirmation codes before the held tokens are revoked
	unconfirmedPerPass   = 100 // expired unconfirmed grants a periodic pass hands to the revocation queue
)

// unconfirmedGrant is an authorization exchanged at the callback and held for its link's maker.
type unconfirmedGrant struct {
	User             string    `json:"user"`
	MadeBy           string    `json:"made_by"`
	ConfirmationCode string    `json:"confirmation_code"` // as confirmationCode normalizes it
	Attempts         int       `json:"attempts"`          // wrong confirmation codes written so far
	ExpiresAt        time.Time `json:"expires_at"`        // unclaimed until then, the tokens are revoked
	ClientID         string    `json:"client_id"`
	AccessToken      string    `json:"access_token"`
	TokenType        string    `json:"token_type"`
	RefreshToken     string    `json:"refresh_token"`
	Scope            string    `json:"scope"`
	TokenExpiresAt   time.Time `json:"token_expires_at"`
}

func (u *unconfirmedGrant) token() *oauth2.Token {
	tok := &oauth2.Token{AccessToken: u.AccessToken, TokenType: u.TokenType, RefreshToken: u.RefreshToken, Expiry: u.TokenExpiresAt}
	return tok.WithExtra(map[string]any{"scope": u.Scope})
}

func (u *unconfirmedGrant) revocation() revocation {
	return revocation{ClientID: u.ClientID, AccessToken: u.AccessToken, RefreshToken: u.RefreshToken, ExpiresAt: u.TokenExpiresAt, Reason: reasonUnconfirmed}
}

// newConfirmationCode returns a one-time confirmation code as the callback page shows it: 8
// characters of base32 (40 bits; no 0, 1, 8 or 9 to mistake for letters) in two groups of 4.
func newConfirmationCode() string {
	code := rand.Text()[:8]
	return code[:4] + "-" + code[4:]
}

// confirmationCode is a code as typed, in upper case without spaces or hyphens.
func confirmationCode(typed string) string {
	return strings.Map(func(r rune) rune {
		if r == '-' || unicode.IsSpace(r) {
			return -1
		}
		return unicode.ToUpper(r)
	}, typed)
}

// lockUnconfirmed serializes the claims of one unconfirmed grant, so that each attempt counts.
func (b *backend) lockUnconfirmed(state string) func() {
	return b.pendingLocks.lock(unconfirmedGrantPrefix + state)
}

// holdForConfirmation exchanges the code of a self-made link at once (it is valid for 60 seconds)
// and holds the tokens under state for the link's maker; it returns the confirmation code to show.
func (b *backend) holdForConfirmation(ctx context.Context, s logical.Storage, state string, pending *authRequest, code string) (string, error) {
	ctx = context.WithoutCancel(ctx) // as in completeAuthorization
	cfg, tok, err := b.exchangeAuthorization(ctx, s, pending, code)
	if err != nil {
		return "", err
	}
	shown := newConfirmationCode()
	held := &unconfirmedGrant{
		User: pending.User, MadeBy: pending.MadeBy, ConfirmationCode: confirmationCode(shown),
		ExpiresAt: b.tokens.refreshes.now().Add(authRequestTTL).UTC(), ClientID: cfg.ClientID,
		AccessToken: tok.AccessToken, TokenType: tok.Type(), RefreshToken: tok.RefreshToken, Scope: tokenScope(tok), TokenExpiresAt: tok.Expiry,
	}
	if err := b.unconfirmed.put(ctx, s, state, held); err != nil {
		b.disown(ctx, s, held.revocation()) // Vault could not hold the tokens, so ev.energy must not keep them either
		return "", err
	}
	return shown, nil
}

// confirmGrant keeps the grant held under state for user when the writer is the link's maker and
// the code is the one its callback page showed. Each wrong code counts; the last allowed one
// revokes the held tokens through the queue.
func (b *backend) confirmGrant(ctx context.Context, req *logical.Request, user, state, typed string) error {
	if err := b.ensureWritable(); err != nil {
		return err
	}
	defer b.lockUnconfirmed(state)()
	var held *unconfirmedGrant
	if statePattern.MatchString(state) { // anything else was never issued, and may not be a storage key
		var err error
		if held, err = getJSON[unconfirmedGrant](ctx, req.Storage, unconfirmedGrantPrefix+state); err != nil {
			return err
		}
	}
	switch {
	case held == nil || b.tokens.refreshes.now().After(held.ExpiresAt) || held.User != user:
		return logical.CodedError(http.StatusBadRequest, "the state has no connection waiting for a confirmation code (unknown, expired, already confirmed or for another user): start again at auth-url")
	case req.EntityID != held.MadeBy:
		return logical.CodedError(http.StatusForbidden, "only the Vault identity that made this link can confirm it, in its own Vault session")
	}
	ctx = context.WithoutCancel(ctx) // what follows keeps or revokes tokens
	// Counted before it is checked: an attempt that storage cannot count is refused unchecked.
	held.Attempts++
	if err := b.unconfirmed.put(ctx, req.Storage, state, held); err != nil {
		return err
	}
	if subtle.ConstantTimeCompare([]byte(confirmationCode(typed)), []byte(held.ConfirmationCode)) != 1 {
		return b.wrongConfirmationCode(ctx, req.Storage, state, held)
	}
	cfg, _, err := b.config(ctx, req.Storage)
	if err != nil {
		return err
	}
	if err := b.unconfirmed.delete(ctx, req.Storage, state); err != nil { // first: the tokens are claimed once
		return err
	}
	if held.ClientID != cfg.ClientID {
		b.disown(ctx, req.Storage, held.revocation())
		return logical.CodedError(http.StatusBadRequest, fmt.Sprintf("the connection was made for ev.energy client %s, not for the configured client %s: start again at auth-url", held.ClientID, cfg.ClientID))
	}
	return b.storeGrant(ctx, req.Storage, cfg, user, held.token())
}

// wrongConfirmationCode answers a wrong code, counted in held already; the last allowed one hands
// its tokens to the revocation queue, which calls ev.energy outside the lock held here.
func (b *backend) wrongConfirmationCode(ctx context.Context, s logical.Storage, state string, held *unconfirmedGrant) error {
	if left := confirmationAttempts - held.Attempts; left > 0 {
		return logical.CodedError(http.StatusBadRequest, fmt.Sprintf("wrong confirmation code: %d attempts left", left))
	}
	b.Logger().Warn("too many wrong confirmation codes for a connection held at the callback: its ev.energy tokens are revoked", "user", held.User)
	if err := b.queueRevocation(ctx, s, held.revocation(), nil); err != nil {
		return err // the tokens stay held, and are revoked when they expire
	}
	if err := b.unconfirmed.delete(ctx, s, state); err != nil {
		return err
	}
	return logical.CodedError(http.StatusBadRequest, "wrong confirmation code, and no attempts left: the connection is cancelled and its tokens revoked; start again at auth-url")
}

// revokeUnclaimedGrants hands the unconfirmed grants that expired unclaimed to the revocation
// queue, at most unconfirmedPerPass of them: the pass's revocations then send them to ev.energy.
func (b *backend) revokeUnclaimedGrants(ctx context.Context, s logical.Storage) error {
	held, err := b.unconfirmed.all(ctx, s)
	if err != nil {
		return err
	}
	now := b.tokens.refreshes.now()
	var errs []error
	handed := 0
	for state, u := range held {
		if handed == unconfirmedPerPass || ctx.Err() != nil {
			break // the rest waits for the next pass
		}
		if now.After(u.ExpiresAt) {
			handed++
			errs = append(errs, b.revokeUnclaimed(ctx, s, state))
		}
	}
	return errors.Join(errs...)
}

// revokeUnclaimed queues the revocation of the unconfirmed grant under state, unless it was claimed meanwhile.
func (b *backend) revokeUnclaimed(ctx context.Context, s logical.Storage, state string) error {
	defer b.lockUnconfirmed(state)()
	u, err := getJSON[unconfirmedGrant](ctx, s, unconfirmedGrantPrefix+state)
	if err != nil || u == nil {
		return err
	}
	if err := b.queueRevocation(ctx, s, u.revocation(), nil); err != nil {
		return err
	}
	return b.unconfirmed.delete(ctx, s, state)
}
