package evenergy

import (
	"context"
	"time"

	"github.com/hashicorp/vault/sdk/logical"
)

// legacyClientPath keeps, seal-wrapped, the client configured when this version first started:
// leases, write-ahead and queued records from before v0.3 name no client, and only the client that
// minted a token can revoke it (RFC 7009), whichever client is configured by the time they end.
const legacyClientPath = "legacy-client"

// legacyClient is the client of the records that name none, recorded once.
type legacyClient struct {
	ClientID   string    `json:"client_id"` // "" when no config existed then: such records' client is unknown
	RecordedAt time.Time `json:"recorded_at"`
}

// recordLegacyClient records, at the first start of this version, the client configured then, and
// names it in the queued records that name none.
func (b *backend) recordLegacyClient(ctx context.Context, s logical.Storage) error {
	recorded, err := getJSON[legacyClient](ctx, s, legacyClientPath)
	if err != nil || recorded != nil {
		return err
	}
	cfg, err := getJSON[config](ctx, s, configPath)
	if err != nil {
		return err
	}
	legacy := &legacyClient{RecordedAt: time.Now().UTC()}
	if cfg != nil {
		legacy.ClientID = cfg.ClientID
	}
	records, err := b.revocations.all(ctx, s)
	if err != nil {
		return err
	}
	for key, rec := range records {
		if rec.ClientID == "" && legacy.ClientID != "" {
			named := *rec
			named.ClientID = legacy.ClientID
			if err := b.revocations.put(ctx, s, key, &named); err != nil {
				return err
			}
		}
	}
	// Stored last: a start that failed before names the records at the next one.
	if err := putJSON(ctx, s, legacyClientPath, legacy); err != nil {
		return err
	}
	b.Logger().Info("recorded the ev.energy client of records from before v0.3", "client_id", legacy.ClientID)
	return nil
}

// namedClient is clientID, or for a record from before v0.3 that names none the client recorded
// at this version's first start ("" when no config existed then); recorded is false until then.
func (b *backend) namedClient(ctx context.Context, s logical.Storage, clientID string) (named string, recorded bool, err error) {
	if clientID != "" {
		return clientID, true, nil
	}
	legacy := b.legacy.Load()
	if legacy == nil {
		if legacy, err = getJSON[legacyClient](ctx, s, legacyClientPath); err != nil || legacy == nil {
			return "", false, err
		}
		b.legacy.Store(legacy)
	}
	return legacy.ClientID, true, nil
}
