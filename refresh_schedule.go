package evenergy

import (
	"container/heap"
	"time"
)

// refreshSchedule holds the held tokens in memory a refresh may go to (active, of the configured
// client) in the order of their refresh points, so that the background refresh looks at the due
// tokens only, not at every token (100,000 users). A token is scheduled once, when it becomes the
// cached one; cached tokens are never changed in place, so an entry whose token is no longer the
// cached one is stale, and is dropped when found.
type refreshSchedule struct {
	cfg     *config // the order holds for its client_id and refresh_window; nil until first built
	entries byRefreshAt
}

// scheduled is one held token in the schedule.
type scheduled struct {
	at  int64 // g's refresh point, in Unix seconds rounded down
	key string
	g   *grant
}

// add schedules the newly cached token at key, if the schedule is built and a refresh may go to it.
func (s *refreshSchedule) add(key string, g *grant) {
	if s.cfg != nil && g.refreshable(s.cfg) {
		heap.Push(&s.entries, scheduled{at: g.refreshAt(s.cfg).Unix(), key: key, g: g})
	}
}

// due lists the keys of the cached tokens due at now, under cfg, the earliest first. The
// schedule is built anew when cfg orders the tokens otherwise (refresh_window orders the grants
// stored before they recorded their refresh point), or once it holds more than twice as many
// entries as there are cached tokens (stale ones).
func (s *refreshSchedule) due(tokens map[string]*grant, cfg *config, now time.Time) []string {
	if s.cfg == nil || s.cfg.ClientID != cfg.ClientID || s.cfg.RefreshWindow != cfg.RefreshWindow || !s.cfg.CheckGrantsBefore.Equal(cfg.CheckGrantsBefore) || len(s.entries) > 2*len(tokens) {
		s.build(tokens, cfg)
	}
	s.cfg = cfg
	var candidates []scheduled // cached, with the refresh point in the second now is in or before
	for len(s.entries) > 0 && s.entries[0].at <= now.Unix() {
		if e := heap.Pop(&s.entries).(scheduled); tokens[e.key] == e.g {
			candidates = append(candidates, e)
		}
	}
	var keys []string
	for _, e := range candidates {
		heap.Push(&s.entries, e) // still due until it is refreshed, which replaces it
		if e.g.due(cfg, now) {
			keys = append(keys, e.key)
		}
	}
	return keys
}

// build schedules every cached token anew for cfg.
func (s *refreshSchedule) build(tokens map[string]*grant, cfg *config) {
	s.cfg, s.entries = cfg, make(byRefreshAt, 0, len(tokens))
	for key, g := range tokens {
		if g.refreshable(cfg) {
			s.entries = append(s.entries, scheduled{at: g.refreshAt(cfg).Unix(), key: key, g: g})
		}
	}
	heap.Init(&s.entries)
}

// byRefreshAt is a container/heap of scheduled tokens, the earliest refresh point first.
type byRefreshAt []scheduled

func (h byRefreshAt) Len() int           { return len(h) }
func (h byRefreshAt) Less(i, j int) bool { return h[i].at < h[j].at }
func (h byRefreshAt) Swap(i, j int)      { h[i], h[j] = h[j], h[i] }
func (h *byRefreshAt) Push(x any)        { *h = append(*h, x.(scheduled)) }

func (h *byRefreshAt) Pop() any {
	last := (*h)[len(*h)-1]
	(*h)[len(*h)-1] = scheduled{} // the backing array must not keep a dropped token alive
	*h = (*h)[:len(*h)-1]
	return last
}
