package evenergy

import (
	"context"
	"encoding/hex"
	"errors"
	"fmt"
	"net/http"
	"strings"
	"sync"
	"time"

	"github.com/hashicorp/vault/sdk/logical"
)

// retiredClientPrefix keeps, seal-wrapped, the clients the config named before; keyed by the hex
// of their client_id, which may hold characters a storage key must not.
const retiredClientPrefix = "retired-clients/"

// tokenLifetime is how long ev.energy's access tokens live (expires_in 36000).
const tokenLifetime = 36000 * time.Second

// retiredClient is a client the config named before. ev.energy lets a client revoke only its own
// tokens (RFC 7009), so its credentials stay while anything it minted may still be alive.
type retiredClient struct {
	Config      config    `json:"config"`
	RetiredAt   time.Time `json:"retired_at"`
	TokensUntil time.Time `json:"tokens_until"` // when the last access token it may have minted expires
}

// retiredClients are the retired clients in memory, with an ev.energy client made for each.
type retiredClients struct {
	stored *prefixCache[retiredClient]

	mu           sync.Mutex
	clients      map[string]*evenergyClient // by client_id, made on first use
	latestExpiry time.Time                  // of the tokens this node minted as the configured client
}

func newRetiredClients() *retiredClients {
	return &retiredClients{stored: newPrefixCache[retiredClient](retiredClientPrefix), clients: map[string]*evenergyClient{}}
}

// invalidate forgets the retired clients when storage changed under them, their ev.energy clients too.
func (r *retiredClients) invalidate(key string) {
	if !strings.HasPrefix(key, retiredClientPrefix) {
		return
	}
	r.stored.invalidate(key)
	r.mu.Lock()
	defer r.mu.Unlock()
	for id, c := range r.clients {
		c.close()
		delete(r.clients, id)
	}
}

func retiredClientKey(clientID string) string { return hex.EncodeToString([]byte(clientID)) }

// minted notes the expiry of a token the configured client minted, so that its credentials are
// kept until then if the config moves to another client.
func (r *retiredClients) minted(expiry time.Time) {
	r.mu.Lock()
	defer r.mu.Unlock()
	if expiry.After(r.latestExpiry) {
		r.latestExpiry = expiry
	}
}

// retire keeps the credentials of a client the config no longer names. Another node may have
// minted too, so the client is kept at least one token lifetime from now.
func (b *backend) retireClient(ctx context.Context, s logical.Storage, cfg *config) error {
	now := time.Now().UTC()
	b.retired.mu.Lock()
	until := now.Add(tokenLifetime)
	if b.retired.latestExpiry.After(until) {
		until = b.retired.latestExpiry
	}
	b.retired.latestExpiry = time.Time{}
	b.retired.mu.Unlock()
	return b.retired.stored.put(ctx, s, retiredClientKey(cfg.ClientID), &retiredClient{Config: *cfg, RetiredAt: now, TokensUntil: until})
}

// unretireClient forgets the retired record of a client the config names again.
func (b *backend) unretireClient(ctx context.Context, s logical.Storage, clientID string) error {
	retired, err := b.retired.stored.all(ctx, s)
	if err != nil || retired[retiredClientKey(clientID)] == nil {
		return err
	}
	b.forgetRetiredClient(clientID)
	return b.retired.stored.delete(ctx, s, retiredClientKey(clientID))
}

func (b *backend) forgetRetiredClient(clientID string) {
	b.retired.mu.Lock()
	defer b.retired.mu.Unlock()
	if c := b.retired.clients[clientID]; c != nil {
		c.close()
		delete(b.retired.clients, clientID)
	}
}

// clientFor returns the ev.energy client that revokes the tokens of clientID: the configured one,
// or a retired one; "" is the client recorded for records from before v0.3.
func (b *backend) clientFor(ctx context.Context, s logical.Storage, clientID string) (*evenergyClient, error) {
	clientID, recorded, err := b.namedClient(ctx, s, clientID)
	if err != nil {
		return nil, err
	}
	if clientID == "" && recorded {
		return nil, &unknownClientError{}
	}
	// Before this version's first start, "" is the configured client, which that start records.
	cfg, client, err := b.config(ctx, s)
	if err == nil && (clientID == "" || clientID == cfg.ClientID) {
		return client, nil
	}
	if clientID == "" || (err != nil && !errors.As(err, new(logical.HTTPCodedError))) {
		return nil, err // a config storage could not read may name clientID: not an unknown client
	}
	b.retired.mu.Lock()
	client = b.retired.clients[clientID]
	b.retired.mu.Unlock()
	if client != nil {
		return client, nil
	}
	retired, err := b.retired.stored.all(ctx, s)
	if err != nil {
		return nil, err
	}
	rc := retired[retiredClientKey(clientID)]
	if rc == nil {
		return nil, &unknownClientError{clientID: clientID}
	}
	client = newClient(&rc.Config, b.metrics, b.transport)
	b.retired.mu.Lock()
	defer b.retired.mu.Unlock()
	if existing := b.retired.clients[clientID]; existing != nil {
		client.close()
		return existing, nil
	}
	b.retired.clients[clientID] = client
	return client, nil
}

// unknownClientError says that the engine keeps no credentials of a client, so it cannot revoke its tokens.
type unknownClientError struct{ clientID string }

func (e *unknownClientError) Error() string {
	if e.clientID == "" {
		return "this record is from before v0.3, which did not record its ev.energy client, and no config existed when this version first started: its client is unknown, so its tokens cannot be revoked"
	}
	return fmt.Sprintf("no credentials of ev.energy client %s are kept: configure it again to revoke its tokens", e.clientID)
}

func (e *unknownClientError) Code() int { return http.StatusBadRequest }

// retiredClientIDs lists the client_id of every retired client.
func (b *backend) retiredClientIDs(ctx context.Context, s logical.Storage) ([]string, error) {
	retired, err := b.retired.stored.all(ctx, s)
	if err != nil {
		return nil, err
	}
	ids := make([]string, 0, len(retired))
	for _, rc := range retired {
		ids = append(ids, rc.Config.ClientID)
	}
	return ids, nil
}

// forgetSpentClients deletes the credentials of retired clients of which nothing may be alive
// any more: their tokens expired, and no grant, held grant, shared token or pending revocation is theirs.
func (b *backend) forgetSpentClients(ctx context.Context, s logical.Storage, now time.Time) error {
	retired, err := b.retired.stored.all(ctx, s)
	if err != nil || len(retired) == 0 {
		return err
	}
	records, err := b.revocations.all(ctx, s)
	var held map[string]*unconfirmedGrant
	if err == nil {
		held, err = b.unconfirmed.all(ctx, s)
	}
	if err == nil {
		err = b.tokens.loadAll(ctx, s)
	}
	if errors.Is(err, errTokensLoading) {
		return nil // which tokens are held is known once the start-up load is over
	} else if err != nil {
		return err
	}
	inUse := b.tokens.clients()
	for _, rec := range records {
		inUse[rec.ClientID] = true
	}
	for _, u := range held {
		inUse[u.ClientID] = true
	}
	if inUse[""] { // grants and records from before their client was recorded
		legacy, _, err := b.namedClient(ctx, s, "")
		if err != nil {
			return err
		}
		inUse[legacy] = true
	}
	for key, rc := range retired {
		if now.Before(rc.TokensUntil) || inUse[rc.Config.ClientID] {
			continue
		}
		b.forgetRetiredClient(rc.Config.ClientID)
		if err := b.retired.stored.delete(ctx, s, key); err != nil {
			return err
		}
		b.Logger().Info("forgot a retired ev.energy client: nothing it issued can be alive", "client_id", rc.Config.ClientID)
	}
	return nil
}
