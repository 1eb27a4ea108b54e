package evenergy

import (
	"cmp"
	"context"
	"crypto/rand"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"time"

	"github.com/hashicorp/vault/sdk/logical"
)

// Pending authorizations are stored per user with their expiry in the key, at
// auth-requests/<user tag>/<expiry in Unix nanoseconds>-<random>, and the state names that key:
// <user tag>-<expiry>-<random>. So the callback finds the entry by its state alone, auth-url
// counts a user's links with one listing, and the periodic pass forgets expired ones without
// reading them. Earlier versions stored them at auth-requests/<state>, a random state of 26 characters.
const maxPendingPerUser = 5 // a user's newer links replace the oldest, held grants included, so that nobody grows storage

var (
	statePattern    = regexp.MustCompile(`^([0-9a-f]{32})-([0-9]{1,19}-[A-Z2-7]{26})$`)
	oldStatePattern = regexp.MustCompile(`^[A-Z2-7]{26}$`) // rand.Text, as earlier versions made it
	pendingPattern  = regexp.MustCompile(`^([0-9]{1,19})-[A-Z2-7]{26}$`)
)

// noPendingDue is when the next sweep of pending authorizations is due while none is stored.
var noPendingDue = time.Date(9999, time.December, 31, 0, 0, 0, 0, time.UTC)

// pendingTag names a user in the keys and states of the user's pending authorizations: a digest,
// so that the user's name travels in no URL.
func pendingTag(user string) string {
	sum := sha256.Sum256([]byte(user))
	return hex.EncodeToString(sum[:16])
}

// pendingKey is the storage key of the pending authorization of state; false for a state never issued.
func pendingKey(state string) (string, bool) {
	if m := statePattern.FindStringSubmatch(state); m != nil {
		return authRequestPrefix + m[1] + "/" + m[2], true
	}
	if oldStatePattern.MatchString(state) {
		return authRequestPrefix + state, true
	}
	return "", false
}

// pendingExpiry is the expiry in the name of a pending authorization in a user's folder.
func pendingExpiry(name string) (time.Time, bool) {
	m := pendingPattern.FindStringSubmatch(name)
	if m == nil {
		return time.Time{}, false
	}
	nanos, err := strconv.ParseInt(m[1], 10, 64)
	return time.Unix(0, nanos), err == nil
}

// putPending stores p, a new pending authorization (with its mark when self-made), and returns its state and how many of the
// user's oldest pending authorizations and unconfirmed grants (whose tokens are revoked) it
// replaced to keep maxPendingPerUser of both.
func (b *backend) putPending(ctx context.Context, s logical.Storage, p *authRequest) (state string, replaced int, err error) {
	tag := pendingTag(p.User)
	folder := authRequestPrefix + tag + "/"
	defer b.pendingLocks.lock(folder)()
	names, err := s.List(ctx, folder)
	if err != nil {
		return "", 0, err
	}
	name := strconv.FormatInt(p.ExpiresAt.UnixNano(), 10) + "-" + rand.Text() // to the nanosecond: it orders a user's links
	// Stored before any is replaced: a failure below leaves the user no fewer links than before.
	if err := putJSON(ctx, s, folder+name, p); err != nil {
		return "", 0, err
	}
	if p.selfMade() { // marked under the lock, so that no newer link replaces it before its mark exists
		if err := b.selfMadeLinks.put(ctx, s, tag+"-"+name, &selfMadeLink{ExpiresAt: p.ExpiresAt}); err != nil {
			return "", 0, errors.Join(err, s.Delete(ctx, folder+name))
		}
	}
	b.cache.mu.Lock()
	b.cache.notePending(p.ExpiresAt)
	b.cache.mu.Unlock()

	type stored struct {
		name      string
		expiresAt time.Time
		held      bool // an unconfirmed grant, named by its state
	}
	var live []stored
	held, heldErr := b.heldFor(ctx, s, p.User)
	for state, u := range held {
		live = append(live, stored{state, u.ExpiresAt, true})
	}
	err = heldErr
	for _, old := range names {
		expiresAt, ok := pendingExpiry(old)
		switch {
		case !ok:
		case time.Now().After(expiresAt):
			err = errors.Join(err, s.Delete(ctx, folder+old))
		default:
			live = append(live, stored{old, expiresAt, false})
		}
	}
	slices.SortFunc(live, func(a, b stored) int { return cmp.Or(a.expiresAt.Compare(b.expiresAt), cmp.Compare(a.name, b.name)) })
	for _, old := range live[:max(0, len(live)-maxPendingPerUser+1)] {
		if old.held {
			err = errors.Join(err, b.revokeHeld(ctx, s, old.name, urgentRevocation()))
		} else {
			err = errors.Join(err, s.Delete(ctx, folder+old.name), b.selfMadeLinks.delete(ctx, s, tag+"-"+old.name))
		}
		replaced++
	}
	return tag + "-" + name, replaced, err
}

// notePending notes that a pending authorization expiring at expiresAt may be stored (zero: at an
// unknown time); call it with mu held.
func (c *cache) notePending(expiresAt time.Time) {
	c.pendingDue = earliest(c.pendingDue, expiresAt)
	if c.pendingSweep != nil {
		c.pendingSweep.due = earliest(c.pendingSweep.due, expiresAt)
	}
}

// notePendingKey notes a pending authorization that storage changed at key, underneath; call it
// with mu held.
func (c *cache) notePendingKey(key string) {
	expiresAt, _ := pendingExpiry(key[strings.LastIndex(key, "/")+1:]) // zero, and so due, for a key of earlier versions
	c.notePending(expiresAt)
}

func earliest(a, b time.Time) time.Time {
	if b.Before(a) {
		return b
	}
	return a
}

// pendingSweep is a sweep of the pending authorizations that may take several periodic passes.
type pendingSweep struct {
	after string    // the last key of auth-requests/ swept
	due   time.Time // the earliest expiry of those left, and of those stored since the sweep began
}

// sweepPending deletes the expired pending authorizations, until deadline or ctx ends; the next
// call goes on from there. A pending authorization of earlier versions is read for its expiry.
func (b *backend) sweepPending(ctx context.Context, s logical.Storage, deadline time.Time) error {
	b.cache.mu.Lock()
	if time.Now().Before(b.cache.pendingDue) {
		b.cache.mu.Unlock()
		return nil // none has expired: no storage call
	}
	if b.cache.pendingSweep == nil {
		b.cache.pendingSweep = &pendingSweep{due: noPendingDue}
	}
	sweep := b.cache.pendingSweep
	after := sweep.after
	b.cache.mu.Unlock()

	keys, err := s.List(ctx, authRequestPrefix)
	if err != nil {
		return err
	}
	slices.Sort(keys)
	next, _ := slices.BinarySearch(keys, after)
	for _, key := range keys[next:] {
		if key == after {
			continue
		}
		if ctx.Err() != nil || !time.Now().Before(deadline) {
			return nil // the next pass goes on after the last key swept
		}
		due, err := b.sweepPendingKey(ctx, s, authRequestPrefix+key)
		if err != nil {
			due = time.Time{} // swept again by the next sweep; this one goes on after it
		}
		b.cache.mu.Lock()
		sweep.after, sweep.due = key, earliest(sweep.due, due)
		b.cache.mu.Unlock()
		if err != nil {
			return err
		}
	}
	b.cache.mu.Lock()
	defer b.cache.mu.Unlock()
	b.cache.pendingDue, b.cache.pendingSweep = sweep.due, nil
	return nil
}

// sweepPendingKey deletes the expired pending authorizations at key, a user's folder or an entry
// of earlier versions, and returns when the earliest left there expires.
func (b *backend) sweepPendingKey(ctx context.Context, s logical.Storage, key string) (time.Time, error) {
	due := noPendingDue
	if !strings.HasSuffix(key, "/") {
		p, err := getJSON[authRequest](ctx, s, key)
		switch {
		case err != nil || p == nil:
			return due, err
		case time.Now().After(p.ExpiresAt):
			return due, s.Delete(ctx, key)
		}
		return p.ExpiresAt, nil
	}
	names, err := s.List(ctx, key)
	if err != nil {
		return due, err
	}
	for _, name := range names {
		expiresAt, ok := pendingExpiry(name)
		switch {
		case !ok:
		case time.Now().After(expiresAt):
			if err := s.Delete(ctx, key+name); err != nil {
				return due, err
			}
		default:
			due = earliest(due, expiresAt)
		}
	}
	return due, nil
}
