package evenergy

import (
	"container/heap"
	"time"
)

// refreshSchedule holds the cached grants a refresh may go to (active, of the configured client)
// in the order of their refresh points, so that a periodic pass looks at the due grants only,
// not at every grant (100,000 users). A grant is scheduled once, when it becomes the cached one;
// cached grants are never changed in place, so an entry whose grant is no longer the cached one
// is stale, and is dropped when found.
type refreshSchedule struct {
	cfg     *config // the order holds for its client_id and refresh_window; nil until first built
	entries byRefreshAt
}

// scheduled is one grant in the schedule.
type scheduled struct {
	at   int64 // g's refresh point, in Unix seconds rounded down
	user string
	g    *grant
}

// add schedules the user's newly cached grant, if the schedule is built and a refresh may go to it.
func (s *refreshSchedule) add(user string, g *grant) {
	if s.cfg != nil && g.usable(s.cfg, user) == nil {
		heap.Push(&s.entries, scheduled{at: g.refreshAt(s.cfg).Unix(), user: user, g: g})
	}
}

// due lists the users whose cached grant is due at now, under cfg, the earliest first. The
// schedule is built anew when cfg orders the grants otherwise (refresh_window orders the grants
// stored before they recorded their refresh point), or once it holds more than twice as many
// entries as there are cached grants (stale ones).
func (s *refreshSchedule) due(grants map[string]*grant, cfg *config, now time.Time) []string {
	if s.cfg == nil || s.cfg.ClientID != cfg.ClientID || s.cfg.RefreshWindow != cfg.RefreshWindow || !s.cfg.CheckGrantsBefore.Equal(cfg.CheckGrantsBefore) || len(s.entries) > 2*len(grants) {
		s.build(grants, cfg)
	}
	s.cfg = cfg
	var candidates []scheduled // cached, with the refresh point in the second now is in or before
	for len(s.entries) > 0 && s.entries[0].at <= now.Unix() {
		if e := heap.Pop(&s.entries).(scheduled); grants[e.user] == e.g {
			candidates = append(candidates, e)
		}
	}
	var users []string
	for _, e := range candidates {
		heap.Push(&s.entries, e) // still due until it is refreshed, which replaces it
		if e.g.due(cfg, now) {
			users = append(users, e.user)
		}
	}
	return users
}

// build schedules every cached grant anew for cfg.
func (s *refreshSchedule) build(grants map[string]*grant, cfg *config) {
	s.cfg, s.entries = cfg, make(byRefreshAt, 0, len(grants))
	for user, g := range grants {
		if g.usable(cfg, user) == nil {
			s.entries = append(s.entries, scheduled{at: g.refreshAt(cfg).Unix(), user: user, g: g})
		}
	}
	heap.Init(&s.entries)
}

// byRefreshAt is a container/heap of scheduled grants, the earliest refresh point first.
type byRefreshAt []scheduled

func (h byRefreshAt) Len() int           { return len(h) }
func (h byRefreshAt) Less(i, j int) bool { return h[i].at < h[j].at }
func (h byRefreshAt) Swap(i, j int)      { h[i], h[j] = h[j], h[i] }
func (h *byRefreshAt) Push(x any)        { *h = append(*h, x.(scheduled)) }

func (h *byRefreshAt) Pop() any {
	last := (*h)[len(*h)-1]
	(*h)[len(*h)-1] = scheduled{} // the backing array must not keep a dropped grant alive
	*h = (*h)[:len(*h)-1]
	return last
}
