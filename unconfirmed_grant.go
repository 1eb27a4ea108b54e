package evenergy

import (
	"cmp"
	"context"
	"crypto/rand"
	"crypto/subtle"
	"errors"
	"fmt"
	"maps"
	"net/http"
	"slices"
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
	unconfirmedPerPass   = 100 // expired unconfirmed grants a periodic pass revokes or queues
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

// lockUnconfirmed serializes the claims of a user's unconfirmed grants, named by the user's tag or
// by the state of any of them (which begins with that tag), so that each attempt counts.
func (b *backend) lockUnconfirmed(state string) func() {
	tag, _, _ := strings.Cut(state, "-")
	return b.pendingLocks.lock(unconfirmedGrantPrefix + tag)
}

// heldFor returns user's unexpired unconfirmed grants by state, as memory holds them: never to be changed in place.
func (b *backend) heldFor(ctx context.Context, s logical.Storage, user string) (map[string]*unconfirmedGrant, error) {
	all, err := b.unconfirmed.all(ctx, s)
	if err != nil {
		return nil, err
	}
	now, tag := b.tokens.refreshes.now(), pendingTag(user)+"-"
	held := map[string]*unconfirmedGrant{}
	for state, u := range all {
		if strings.HasPrefix(state, tag) && u.User == user && !now.After(u.ExpiresAt) {
			held[state] = u
		}
	}
	return held, nil
}

// attemptsOf is how many wrong confirmation codes a user's held grants have counted: the most of any.
func attemptsOf(held map[string]*unconfirmedGrant) int {
	n := 0
	for _, u := range held {
		n = max(n, u.Attempts)
	}
	return n
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
	defer b.lockUnconfirmed(state)()
	others, err := b.heldFor(ctx, s, pending.User)
	if err == nil {
		held.Attempts = attemptsOf(others) // wrong codes count per user: a new link starts none afresh
		err = b.unconfirmed.put(ctx, s, state, held)
	}
	if err != nil {
		b.disown(ctx, s, held.revocation()) // Vault could not hold the tokens, so ev.energy must not keep them either
		return "", err
	}
	if err := b.keepHeldBound(ctx, s, pending.User, others); err != nil {
		b.Logger().Warn("a user's oldest held connections beyond the per-user bound could not be revoked: they are revoked when they expire", "error", err)
	}
	return shown, nil
}

// keepHeldBound revokes the oldest of others, the user's grants held before a new one, so that the
// user keeps at most maxPendingPerUser pending and held: links exchanged meanwhile were neither when
// auth-url counted them. Call it with the user's unconfirmed lock held.
func (b *backend) keepHeldBound(ctx context.Context, s logical.Storage, user string, others map[string]*unconfirmedGrant) error {
	names, err := s.List(ctx, authRequestPrefix+pendingTag(user)+"/")
	if err != nil {
		return err
	}
	pending := 0
	for _, name := range names {
		if expiresAt, ok := pendingExpiry(name); ok && time.Now().Before(expiresAt) {
			pending++
		}
	}
	excess := len(others) + 1 + pending - maxPendingPerUser
	if excess <= 0 {
		return nil
	}
	oldest := slices.SortedFunc(maps.Keys(others), func(a, c string) int {
		return cmp.Or(others[a].ExpiresAt.Compare(others[c].ExpiresAt), cmp.Compare(a, c))
	})
	var errs []error
	for _, state := range oldest[:min(excess, len(oldest))] {
		errs = append(errs, b.revokeHeldLocked(ctx, s, state, urgentRevocation()))
	}
	return errors.Join(errs...)
}

// confirmGrant keeps the grant held for user whose code typed is, when the writer is its maker;
// state, when given, names the one grant to try. Each attempt counts against the user's held
// grants, before its code is checked; the last allowed wrong one revokes their tokens.
func (b *backend) confirmGrant(ctx context.Context, req *logical.Request, user, state, typed string) error {
	if err := b.ensureWritable(); err != nil {
		return err
	}
	defer b.lockUnconfirmed(pendingTag(user))()
	held, err := b.heldFor(ctx, req.Storage, user)
	if err != nil {
		return err
	}
	if _, ok := held[state]; state != "" && !ok {
		held = nil
	}
	if len(held) == 0 {
		return logical.CodedError(http.StatusBadRequest, "no connection of this user waits for a confirmation code (none made, expired, already confirmed or for another user): start again at auth-url")
	}
	for _, u := range held {
		if req.EntityID != u.MadeBy {
			return logical.CodedError(http.StatusForbidden, "only the Vault identity that made this link can confirm it, in its own Vault session")
		}
	}
	ctx = context.WithoutCancel(ctx) // what follows keeps or revokes tokens
	attempts := attemptsOf(held) + 1
	if attempts > confirmationAttempts { // the last wrong code's revocations could not all be queued
		return b.wrongConfirmationCode(ctx, req.Storage, held)
	}
	// Counted before it is checked: an attempt that storage cannot count is refused unchecked.
	counted := make(map[string]*unconfirmedGrant, len(held))
	for st, u := range held {
		c := *u
		c.Attempts = attempts
		if err := b.unconfirmed.put(ctx, req.Storage, st, &c); err != nil {
			return err
		}
		counted[st] = &c
	}
	claimed := ""
	for st, u := range counted {
		if subtle.ConstantTimeCompare([]byte(confirmationCode(typed)), []byte(u.ConfirmationCode)) == 1 && (state == "" || st == state) {
			claimed = st
		}
	}
	if claimed == "" {
		return b.wrongConfirmationCode(ctx, req.Storage, counted)
	}
	cfg, _, err := b.config(ctx, req.Storage)
	if err != nil {
		return err
	}
	if err := b.unconfirmed.delete(ctx, req.Storage, claimed); err != nil { // first: the tokens are claimed once
		return err
	}
	for st, u := range held { // the right code counts against no other link; left counted should this write fail
		if st != claimed {
			_ = b.unconfirmed.put(ctx, req.Storage, st, u)
		}
	}
	u := counted[claimed]
	if u.ClientID != cfg.ClientID {
		b.disown(ctx, req.Storage, u.revocation())
		return logical.CodedError(http.StatusBadRequest, fmt.Sprintf("the connection was made for ev.energy client %s, not for the configured client %s: start again at auth-url", u.ClientID, cfg.ClientID))
	}
	return b.storeGrant(ctx, req.Storage, cfg, user, u.token())
}

// wrongConfirmationCode answers a wrong code, counted in held already; the last allowed one
// revokes the tokens of every grant held for the user, now, or through the queue when ev.energy
// does not confirm.
func (b *backend) wrongConfirmationCode(ctx context.Context, s logical.Storage, held map[string]*unconfirmedGrant) error {
	if left := confirmationAttempts - attemptsOf(held); left > 0 {
		return logical.CodedError(http.StatusBadRequest, fmt.Sprintf("wrong confirmation code: %d attempts left", left))
	}
	b.Logger().Warn("too many wrong confirmation codes for connections held at the callback: their ev.energy tokens are revoked", "connections", len(held))
	for state, u := range held {
		if err := b.revokeOrQueue(ctx, s, u.revocation()); err != nil {
			return err // the tokens stay held, and the next attempt or their expiry revokes them
		}
		if err := b.unconfirmed.delete(ctx, s, state); err != nil {
			return err
		}
	}
	return logical.CodedError(http.StatusBadRequest, "wrong confirmation code, and no attempts left: the connection is cancelled and its tokens revoked; start again at auth-url")
}

// revokeUnclaimedGrants revokes the unconfirmed grants that expired unclaimed, at most
// unconfirmedPerPass of them: directly while the pass has time and a turn under the call budget,
// and through the revocation queue after that or when ev.energy does not confirm.
func (b *backend) revokeUnclaimedGrants(ctx context.Context, s logical.Storage, deadline time.Time) error {
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
			var turn *budgetTurn // none once the pass's time is out: queued
			if time.Now().Before(deadline) {
				turn = &budgetTurn{call: callRevocation, by: deadline}
			}
			errs = append(errs, b.revokeHeld(ctx, s, state, turn))
		}
	}
	return errors.Join(errs...)
}

// revokeHeld revokes the tokens of the unconfirmed grant under state in turn, or queues them
// (turn nil: at once), and forgets the grant, unless it was claimed meanwhile.
func (b *backend) revokeHeld(ctx context.Context, s logical.Storage, state string, turn *budgetTurn) error {
	defer b.lockUnconfirmed(state)()
	return b.revokeHeldLocked(ctx, s, state, turn)
}

// revokeHeldLocked is revokeHeld with the user's unconfirmed lock held.
func (b *backend) revokeHeldLocked(ctx context.Context, s logical.Storage, state string, turn *budgetTurn) error {
	u, err := b.unconfirmed.get(ctx, s, state)
	if err != nil || u == nil {
		return err
	}
	if turn == nil {
		err = b.queueRevocation(ctx, s, u.revocation(), nil)
	} else {
		err = b.revokeInTurnOrQueue(context.WithoutCancel(ctx), s, u.revocation(), turn)
	}
	if err != nil {
		return err
	}
	return b.unconfirmed.delete(ctx, s, state)
}
