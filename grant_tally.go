package evenergy

// grantTally counts the cached grants by the client they were made for and by status, kept as
// grants are cached and dropped, so that metrics and the check for retired clients still in use
// do not walk every grant (10 and 7 ms under the cache's lock at 100,000 grants).
type grantTally map[string]map[string]int

// count adds n (1 or -1) grants like g; nil counts nothing.
func (t grantTally) count(g *grant, n int) {
	if g == nil {
		return
	}
	byStatus := t[g.ClientID]
	if byStatus == nil {
		byStatus = map[string]int{}
		t[g.ClientID] = byStatus
	}
	if byStatus[g.Status] += n; byStatus[g.Status] == 0 {
		delete(byStatus, g.Status)
		if len(byStatus) == 0 {
			delete(t, g.ClientID)
		}
	}
}

// byStatus is the number of grants in each status, those of another client than cfg's apart
// (cfg nil: none is).
func (t grantTally) byStatus(cfg *config) map[string]int {
	counts := map[string]int{grantActive: 0, grantRevoked: 0, grantOtherClient: 0}
	for clientID, byStatus := range t {
		for status, n := range byStatus {
			if cfg != nil && (&grant{ClientID: clientID}).ofOtherClient(cfg) {
				status = grantOtherClient
			}
			counts[status] += n
		}
	}
	return counts
}
