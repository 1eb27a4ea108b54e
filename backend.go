// Package evenergy is a Vault secrets engine that holds ev.energy OAuth 2 client credentials and
// hands out ev.energy API access tokens.
package evenergy

import (
	"context"
	"net/http"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/hashicorp/vault/sdk/framework"
	"github.com/hashicorp/vault/sdk/helper/consts"
	"github.com/hashicorp/vault/sdk/logical"
)

const backendHelp = `
The ev.energy secrets engine stores an ev.energy OAuth 2 client and issues ev.energy API access
tokens: client-credentials tokens as leases revoked at ev.energy when the lease ends, and tokens
of ev.energy users who authorized the client through the authorization-code flow with PKCE,
whose refresh tokens stay sealed in Vault.

Configure the client at "config", then read "token".
`

// operationPrefix starts every OpenAPI operation ID of the engine, e.g. evenergy-generate-token.
const operationPrefix = "evenergy"

type backend struct {
	*framework.Backend

	storage       logical.Storage // the mount's, for what must reach it as the node steps down (clean)
	pendingLocks  keyedMutex      // on one pending authorization, or on one user's pending ones
	cache         *cache
	tokens        *tokenStore // every token the engine holds and rotates: users' grants, shared roles' tokens
	revocations   *revocations
	unconfirmed   *prefixCache[unconfirmedGrant] // tokens of self-made links, held for their makers
	selfMadeLinks *prefixCache[selfMadeLink]     // marks of pending self-made links, for the mount-wide bound
	retired       *retiredClients
	metrics       *metrics
	legacy        atomic.Pointer[legacyClient] // once read from storage

	// configWrites serializes config writes and deletes, which run on the active node only: each
	// must retire the client it replaces, which a concurrent one could store meanwhile.
	configWrites condMutex
	budget       *callBudget       // spaces the calls to ev.energy of refreshes and revocations
	transport    http.RoundTripper // nil: each client has its own connection pool; the simulation sets its in-memory ev.energy

	// refreshing is held by the background refresh of due grants while it runs (see refreshDueTokens),
	// which ends with background, when the mount stops on this node.
	refreshing     condMutex
	background     context.Context
	stopBackground context.CancelFunc
	cleaned        sync.Once
	grantCalls     grantCalls // imports and authorizations in flight, which a step-down waits for

	// loadingGrants ends the start-up load of every held token; grantsLoaded is closed when it is over.
	loadingGrants context.Context
	stopLoading   context.CancelFunc
	grantsLoaded  chan struct{}

	// replication is this node's replication state: read once, as Vault builds its mounts anew when
	// a node's replication role changes.
	replication      sync.Once
	replicationState consts.ReplicationState
}

// Factory returns a configured ev.energy secrets engine.
func Factory(ctx context.Context, conf *logical.BackendConfig) (logical.Backend, error) {
	b := newBackend()
	b.storage = conf.StorageView
	if err := b.Setup(ctx, conf); err != nil {
		return nil, err
	}
	return b, nil
}

func newBackend() *backend {
	b := &backend{cache: newCache(), tokens: newTokenStore(), revocations: newRevocations(), unconfirmed: newPrefixCache[unconfirmedGrant](unconfirmedGrantPrefix), selfMadeLinks: newPrefixCache[selfMadeLink](selfMadeLinkPrefix),
		retired: newRetiredClients(), budget: newCallBudget(), grantsLoaded: make(chan struct{})}
	b.loadingGrants, b.stopLoading = context.WithCancel(context.Background())
	b.background, b.stopBackground = context.WithCancel(context.Background())
	b.metrics = newMetrics(b.grantsByStatus, b.revocations.count, b.budget.waitingByCall)
	b.Backend = &framework.Backend{
		Help:           strings.TrimSpace(backendHelp),
		BackendType:    logical.TypeLogical,
		RunningVersion: Version,
		PathsSpecial: &logical.Paths{
			SealWrapStorage: []string{configPath, userPrefix, authRequestPrefix, revocationPrefix, unconfirmedGrantPrefix, retiredClientPrefix, legacyClientPath, sharedTokenPrefix, framework.WALPrefix},
			Unauthenticated: []string{"callback"},
		},
		Paths: framework.PathAppend(
			[]*framework.Path{pathConfig(b), pathRevoke(b), pathRevocations(b), pathCheckGrants(b), pathAuthURL(b), pathCallback(b), pathMetrics(b)},
			pathRoles(b),
			pathToken(b),
			pathUsers(b),
		),
		Secrets:        []*framework.Secret{secretAccessToken(b), secretUserToken(), secretSharedToken(b)},
		InitializeFunc: b.initialize,
		Clean:          b.clean,
		Invalidate: func(_ context.Context, key string) {
			b.cache.invalidate(key)
			b.tokens.invalidate(key)
			b.revocations.invalidate(key)
			b.unconfirmed.invalidate(key)
			b.selfMadeLinks.invalidate(key)
			b.retired.invalidate(key)
			if key == legacyClientPath {
				b.legacy.Store(nil)
			}
		},
		PeriodicFunc: b.periodic,
		WALRollback:  b.rollbackMintedToken,
	}
	respondToCodedErrors(b.Paths)
	return b
}

// clean stops the work of the mount on this node as Vault unmounts it or steps down: the start-up
// load and the background refresh end, waiting calls get no turn, and the calls already sent finish
// (within request_timeout) and store what they rotated while this node may still write. Then the
// grants only memory holds are stored, or revoked (see settleUnsaved).
func (b *backend) clean(ctx context.Context) {
	b.cleaned.Do(func() {
		b.stopLoading()
		b.stopBackground()
		b.budget.close()
		b.refreshing.Lock()                  // held for good: no background refresh starts again
		b.tokens.refreshes.awaitLanding(ctx) // a reader's refresh sent before, whose rotated grant storage may refuse
		b.grantCalls.awaitLanding(ctx)       // an import or authorization sent before stores its grant before the next node loads
		b.settleUnsaved(ctx)
	})
}

// settleUnsaved stores the rotated grants that storage refused, which die with this node's memory,
// or, as storage still refuses (Raft does once a node lost its quorum), revokes their tokens at
// ev.energy as the client that minted them, outside the call budget, which is closed: storage holds
// a dead refresh token, and the user must connect again either way.
func (b *backend) settleUnsaved(ctx context.Context) {
	if b.storage == nil {
		return
	}
	for _, key := range b.tokens.unsavedKeys() {
		b.settleUnsavedToken(ctx, key)
	}
}

// settleUnsavedToken stores or revokes the unsaved token at key (see settleUnsaved), under its
// lock: a refresh or a delete holding it finishes first, within request_timeout.
func (b *backend) settleUnsavedToken(ctx context.Context, key string) {
	defer b.tokens.lock(key)()
	b.tokens.mu.RLock()
	g := b.tokens.tokens[key]
	b.tokens.mu.RUnlock()
	stored := b.tokens.storeUnsavedLocked(ctx, b.storage, key)
	if stored == nil || g == nil {
		return
	}
	if err := b.revokeOutsideBudget(ctx, b.storage, g.revocation(time.Time{}, reasonUnowned)); err != nil {
		b.Logger().Error("a rotated ev.energy grant that storage refused dies with this node's memory, and could not be revoked", "key", key, "storage_error", stored, "error", err)
		return
	}
	b.Logger().Warn("storage refused a rotated ev.energy grant as the node stepped down: its tokens are revoked, and the user must connect again", "key", key, "storage_error", stored)
}

// initialize loads the revocation queue, records on the active node the client of records from
// before v0.3, and loads every grant in the background: Vault holds its state lock while it
// initializes mounts, and with many users the load takes seconds. Meanwhile a read reads its
// user's grant from storage.
func (b *backend) initialize(ctx context.Context, req *logical.InitializationRequest) error {
	if _, err := b.revocations.all(ctx, req.Storage); err != nil {
		return err
	}
	if b.ensureWritable() == nil {
		if err := b.recordLegacyClient(ctx, req.Storage); err != nil {
			return err
		}
	}
	b.tokens.loadingAll.Lock() // before the start returns, so that a periodic pass finds the load under way
	go func() {
		defer close(b.grantsLoaded)
		_ = b.loadEveryHeldToken(req.Storage) // logged; the periodic pass tries again
	}()
	return nil
}

// replicationRole is this node's replication state, asked of Vault once per backend instance.
func (b *backend) replicationRole() consts.ReplicationState {
	b.replication.Do(func() { b.replicationState = b.System().ReplicationState() })
	return b.replicationState
}

// ensureWritable sends a request that will call ev.energy and then write (a lease or a rotated
// token) on to the active node, before anything is minted that a read-only node could not keep.
// It is framework.Backend's WriteSafeReplicationState.
func (b *backend) ensureWritable() error {
	state := b.replicationRole()
	if state.HasState(consts.ReplicationPerformanceStandby|consts.ReplicationDRSecondary) ||
		(state.HasState(consts.ReplicationPerformanceSecondary) && !b.System().LocalMount()) {
		return logical.ErrReadOnly
	}
	return nil
}

// ensureLeasable sends a read that returns a lease on to the active node from a performance standby
// (Vault Enterprise's, or an OpenBao standby serving reads), which cannot register the lease.
func (b *backend) ensureLeasable() error {
	if b.replicationRole().HasState(consts.ReplicationPerformanceStandby) {
		return logical.ErrReadOnly
	}
	return nil
}
