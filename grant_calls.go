package evenergy

import (
	"context"
	"net/http"
	"sync"

	"github.com/hashicorp/vault/sdk/logical"
)

// grantCalls counts the calls that mint a user's grant outside the refresh flights (an import's
// refresh, an authorization's exchange): a step-down waits for them to store what they minted, or
// the next active node, which loads grants as it starts, would keep serving the grant they replaced.
type grantCalls struct {
	mu      sync.Mutex
	flying  sync.WaitGroup
	stopped bool
}

// errMountStopping answers a call that would mint a grant once the mount stops on this node.
var errMountStopping = logical.CodedError(http.StatusServiceUnavailable, "the mount is stopping on this node: send the request again")

// begin counts a call about to mint a grant, refused before anything is minted once the node steps
// down; the caller calls landed once the grant is stored, revoked or queued.
func (c *grantCalls) begin() (landed func(), err error) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.stopped {
		return nil, errMountStopping
	}
	c.flying.Add(1)
	return c.flying.Done, nil
}

// awaitLanding refuses new calls and waits until every call counted has landed, or ctx ends.
func (c *grantCalls) awaitLanding(ctx context.Context) {
	c.mu.Lock()
	c.stopped = true
	c.mu.Unlock()
	landed := make(chan struct{})
	go func() {
		c.flying.Wait()
		close(landed)
	}()
	select {
	case <-landed:
	case <-ctx.Done():
	}
}
