package evenergy

import (
	"context"
	"strings"
	"testing/synctest"
	"time"

	"github.com/hashicorp/vault/sdk/logical"
)

// The promises the simulation checks against ev.energy's ledger (see simEvenergy):
//
//	(a) every token alive at ev.energy is under a live lease, stored, or queued for revocation as
//	    the client that minted it;
//	(b) no lease is live on a token the engine itself ended, and no new lease is given on a token
//	    that is not alive (b-current: a shared role's reader gets a token minted for the role and
//	    config in force when the read began);
//	(c) no grant is lost while ev.energy still holds a live refresh token for it;
//	(d) the periodic pass keeps its budget, and memory is bounded by the stored tokens;
//	(e) once faults stop, every reader gets a live token, the queue drains, and the background
//	    refresh goes quiet.
//
// A token whose answer was lost after ev.energy did the work cannot be known to the engine: it is
// counted (lost refreshes without a grace period) and not held against (a) and (c).

// ownershipGrace is how long after its answer a token may be owned by nothing yet: the engine
// holds it between the answer and the storage write (and its retries).
const ownershipGrace = time.Minute

func (s *sim) check() {
	s.checkLeases()
	if !s.busy() {
		s.checkOwnership()
	}
}

// checkLeases is (b) for the leases Vault holds: none runs on a token the engine ended.
func (s *sim) checkLeases() {
	s.ev.mu.Lock()
	defer s.ev.mu.Unlock()
	for _, l := range s.leases {
		t := l.tok
		if t == nil || t.alive || l.exempt || !t.endedAt.Before(l.end.Add(-time.Second)) {
			continue
		}
		if s.st.refusedNear(t.endedAt) {
			s.stats["disowned while storage refused the queue"]++
			l.exempt = true // revokeAfterLeases revokes now what it cannot queue, by design
			continue
		}
		s.fail("b:lease-runs:"+l.kind+":"+t.endedBy, "lease #%d (%s %s) runs until %v, but ev.energy ended its token #%d at %v (%s)",
			l.id, l.kind, l.name, l.end.Sub(simEpoch), t.id, t.endedAt.Sub(simEpoch), t.endedBy)
		return
	}
}

// owners is every token value Vault holds, and for queued ones the client that is to revoke it.
func (s *sim) owners() (held map[string]string, queued map[string]string) {
	held, queued = map[string]string{}, map[string]string{}
	for _, l := range s.leases {
		if l.tok != nil {
			for _, key := range []string{"access_token", "refresh_token"} {
				if v, _ := l.secret.InternalData[key].(string); v != "" {
					held[v] = "lease"
				}
			}
			if v, _ := l.secret.InternalData["access_token"].(string); v == "" {
				held[s.valueOf(l.tok)] = "lease"
			}
		}
	}
	for _, key := range s.st.keys("") {
		if strings.HasPrefix(key, revocationPrefix) {
			if rec := rawJSON[revocation](s.st, key); rec != nil {
				for _, v := range []string{rec.AccessToken, rec.RefreshToken} {
					if v != "" {
						queued[v] = rec.ClientID
					}
				}
			}
			continue
		}
		entry, _ := s.st.inner.Get(context.Background(), key)
		if entry == nil {
			continue
		}
		for _, v := range tokenValue.FindAllString(string(entry.Value), -1) {
			held[v] = "storage " + key
			s.everStored[v] = true
		}
	}
	// A rotated token storage refused lives in the active node's memory until the pass stores it.
	s.b.tokens.mu.RLock()
	for key := range s.b.tokens.unsaved {
		if g := s.b.tokens.tokens[key]; g != nil {
			held[g.AccessToken], held[g.RefreshToken] = "memory", "memory"
		}
	}
	s.b.tokens.mu.RUnlock()
	return held, queued
}

func (s *sim) valueOf(t *simToken) string {
	s.ev.mu.Lock()
	defer s.ev.mu.Unlock()
	return s.ev.valueOf(t)
}

// checkOwnership is (a) and (c): every live token the engine was told of is owned.
func (s *sim) checkOwnership() {
	held, queued := s.owners()
	s.ev.mu.Lock()
	defer s.ev.mu.Unlock()
	now := time.Now()
	for value, t := range s.ev.tokens {
		if !t.live(now) || t.external || t.lost || now.Sub(t.issuedAt) < ownershipGrace {
			continue
		}
		if held[value] != "" {
			continue
		}
		if client, ok := queued[value]; ok {
			if client == t.client {
				continue
			}
			s.fail("a:queued-as-other", "token #%d of %s is queued for revocation as %q, which cannot revoke it", t.id, t.client, client)
			return
		}
		if t.refresh {
			s.fail("c:lost-grant", "the grant of refresh token #%d (%s, issued %v ago) is lost: ev.energy holds it live, and Vault neither stores nor queues it", t.id, t.client, now.Sub(t.issuedAt))
		} else {
			// Stored once and then forgotten unqueued, or never stored: two mechanisms the minimizer keeps apart.
			s.fail("a:unowned:"+t.kind+map[bool]string{true: ":forgotten", false: ":never-stored"}[s.everStored[value]], "%s token #%d of %s, alive at ev.energy (issued %v ago), is owned by no lease, stored grant or queued revocation", t.kind, t.id, t.client, now.Sub(t.issuedAt))
		}
		return
	}
}

// checkMemory is (d)'s memory bound after a pass: what the active node keeps per token is of
// tokens stored or unsaved. seen and writes are how many Invalidate and storage write calls came
// before the pass began, and staleBefore the keys marked stale then, which its load reads: a mark
// made since (a refused write, an Invalidate) waits for the next pass's load, or a read.
func (s *sim) checkMemory(seen, writes int, staleBefore map[string]bool) {
	stored := map[string]bool{}
	for _, prefix := range heldPrefixes {
		for _, key := range s.st.keys(prefix) {
			stored[key] = true
		}
	}
	for _, key := range s.st.keys(rolePrefix) { // a shared role's failure record, before its first token is stored
		stored[sharedTokenPrefix+strings.TrimPrefix(key, rolePrefix)] = true
	}
	markedSince := map[string]bool{}
	s.mu.Lock()
	for key, at := range s.invalidated {
		markedSince[key] = at > seen
	}
	s.mu.Unlock()
	s.st.mu.Lock()
	for key, at := range s.st.lastWrite {
		markedSince[key] = markedSince[key] || at > writes
	}
	s.st.mu.Unlock()
	t := s.b.tokens
	t.mu.RLock()
	for key := range t.unsaved {
		stored[key] = true
	}
	var extra []string
	for key := range t.stale {
		if !stored[key] && staleBefore[key] && !markedSince[key] {
			extra = append(extra, "stale "+key)
		}
	}
	t.mu.RUnlock()
	t.refreshes.mu.Lock()
	for key, r := range t.refreshes.byKey {
		if !stored[key] && r.flight == nil {
			extra = append(extra, "refresh record "+key)
		}
	}
	t.refreshes.mu.Unlock()
	if len(extra) > 0 {
		s.fail("d:memory", "after a pass the node keeps in memory what no stored token needs: %s", strings.Join(extra, ", "))
	}
}

// finish is (e): with every fault off, passes run a minute apart for a quarter of an hour; then
// every reader gets a live token, nothing due is queued, and the background refresh is idle.
func (s *sim) finish() {
	s.quiet()
	for range 15 {
		time.Sleep(time.Minute)
		synctest.Wait()
		s.collect()
		s.periodic(s.b)()
		if s.failure != nil && !s.all {
			return
		}
	}
	synctest.Wait()
	s.collect()
	s.check()
	if s.failure != nil && !s.all {
		return
	}
	now := time.Now()
	for _, key := range s.st.keys(revocationPrefix) {
		if rec := rawJSON[revocation](s.st, key); rec != nil && !now.Before(rec.NotBefore) && !rec.expired(now) {
			s.fail("e:queue", "15 minutes after the faults stopped, a %s revocation of %q queued at %v is still queued", rec.Reason, rec.ClientID, rec.QueuedAt.Sub(simEpoch))
			return
		}
	}
	cfg := s.storedConfig()
	if cfg == nil {
		return
	}
	for _, key := range s.st.keys(sharedTokenPrefix) {
		name := strings.TrimPrefix(key, sharedTokenPrefix)
		if r := s.storedRole(name); r == nil || !r.Shared {
			s.fail("e:shared-left", "role %s does not share a token, but its shared token is still stored: nothing will revoke it", name)
			return
		}
	}
	if !s.b.refreshing.TryLock() {
		s.fail("e:background", "15 minutes after the faults stopped the background refresh is still running rounds")
		return
	}
	s.b.refreshing.Unlock()
	var paths []string
	for _, key := range s.st.keys(rolePrefix) {
		paths = append(paths, "token/"+strings.TrimPrefix(key, rolePrefix))
	}
	for _, key := range s.st.keys(userPrefix) {
		g := rawJSON[grant](s.st, key)
		if g == nil || g.Status != grantActive || g.ofOtherClient(cfg) || !s.refreshLive(g.RefreshToken) {
			continue
		}
		paths = append(paths, key+"/token")
	}
	for _, path := range append(paths, "token") {
		resp, err := s.request(s.b, logical.ReadOperation, path, nil)
		if err != nil || resp == nil || resp.Secret == nil {
			s.fail("e:read", "with every fault off, read %s: %s", path, outcome(err))
			return
		}
		value, _ := resp.Data["access_token"].(string)
		s.ev.mu.Lock()
		t := s.ev.tokens[value]
		live := t != nil && t.live(time.Now())
		s.ev.mu.Unlock()
		if !live {
			s.fail("e:read-dead", "with every fault off, read %s got a token ev.energy does not hold live", path)
			return
		}
	}
	s.logf("quiet end: %d readers got live tokens", len(paths)+1)
}

func (s *sim) refreshLive(value string) bool {
	s.ev.mu.Lock()
	defer s.ev.mu.Unlock()
	t := s.ev.tokens[value]
	return t != nil && t.live(time.Now())
}
