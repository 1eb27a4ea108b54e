package evenergy

import (
	"context"
	"errors"
	"fmt"
	"net/http"
	"time"

	"github.com/hashicorp/vault/sdk/framework"
	"github.com/hashicorp/vault/sdk/logical"
)

func pathCheckGrants(b *backend) *framework.Path {
	return &framework.Path{
		Pattern:      "check-grants",
		DisplayAttrs: &framework.DisplayAttributes{OperationPrefix: operationPrefix, OperationSuffix: "grant-check"},
		Operations: map[logical.Operation]framework.OperationHandler{
			logical.ReadOperation: &framework.PathOperation{
				Callback: b.pathCheckGrantsRead,
				Summary:  "Show how far the check of every grant has come.",
			},
			logical.UpdateOperation: &framework.PathOperation{
				Callback:     b.pathCheckGrantsWrite,
				Summary:      "Check every grant at ev.energy now, by refreshing it.",
				DisplayAttrs: &framework.DisplayAttributes{OperationVerb: "start"},
			},
		},
		HelpSynopsis: "Check every user's grant at ev.energy now, as after a restore.",
		HelpDescription: `Write makes every active grant refreshed before now, and every shared role's token minted before
now, due at once: the periodic pass refreshes them at the pace of call_budget and within each
grant's backoff, and readers refresh theirs. A refresh ends the access token readers hold. Grants
ev.energy refuses turn revoked (see LIST users). Read shows how many grants are still to be checked.`,
	}
}

// pathCheckGrantsWrite stores the check in the config, so that every node's schedule and reads see
// it and it survives a step-down: grants last refreshed before the check are due.
func (b *backend) pathCheckGrantsWrite(ctx context.Context, req *logical.Request, _ *framework.FieldData) (*logical.Response, error) {
	if err := b.ensureWritable(); err != nil {
		return nil, err
	}
	b.configWrites.Lock() // a read, change and write of the config, like a config write
	defer b.configWrites.Unlock()
	cfg, err := getConfig(ctx, req.Storage)
	if err != nil {
		return nil, err
	}
	cfg.CheckGrantsBefore = time.Now().UTC()
	if err := b.putConfig(ctx, req.Storage, cfg); err != nil {
		return nil, err
	}
	left := fmt.Sprintf("each %d grants take about a minute", refreshesPerMinute(cfg))
	data, err := b.checkProgress(ctx, req.Storage, cfg)
	switch {
	case errors.Is(err, errTokensLoading): // right after a reload: the check runs once they are loaded
		data = map[string]any{"started_at": cfg.CheckGrantsBefore.Format(time.RFC3339)}
	case err != nil:
		return nil, err
	default:
		left = fmt.Sprintf("the %d grants to check take about %d minutes", data["pending"], data["minutes_left_about"])
	}
	resp := &logical.Response{Data: data}
	resp.AddWarning(fmt.Sprintf("each check refreshes a grant, which ends the access token its readers hold, and shared roles' tokens are replaced the same way; the background refresh makes about %d refreshes a minute (call_budget), so %s: read %scheck-grants for progress",
		refreshesPerMinute(cfg), left, req.MountPoint))
	return resp, nil
}

// pathCheckGrantsRead shows how far the check has come.
func (b *backend) pathCheckGrantsRead(ctx context.Context, req *logical.Request, _ *framework.FieldData) (*logical.Response, error) {
	if err := b.ensureWritable(); err != nil {
		return nil, err
	}
	cfg, _, err := b.config(ctx, req.Storage)
	if err != nil {
		return nil, err
	}
	if cfg.CheckGrantsBefore.IsZero() {
		return logical.ErrorResponse("no check has been started: write to check-grants to start one"), nil
	}
	data, err := b.checkProgress(ctx, req.Storage, cfg)
	if errors.Is(err, errTokensLoading) {
		return nil, logical.CodedError(http.StatusServiceUnavailable, "users' grants are still being loaded after a start: read check-grants again in a few seconds")
	}
	return &logical.Response{Data: data}, err
}

// checkProgress counts, on the active node that runs the check, the grants still to check.
func (b *backend) checkProgress(ctx context.Context, s logical.Storage, cfg *config) (map[string]any, error) {
	if err := b.tokens.loadAll(ctx, s); err != nil {
		return nil, err
	}
	pending, revoked := 0, 0
	b.tokens.walk(userPrefix, func(_ string, g *grant) {
		switch {
		case g.refreshable(cfg) && g.LastRefreshedAt.Before(cfg.CheckGrantsBefore):
			pending++
		case g.Status == grantRevoked && g.RevokedAt != nil && !g.RevokedAt.Before(cfg.CheckGrantsBefore):
			revoked++
		}
	})
	return map[string]any{
		"started_at":          cfg.CheckGrantsBefore.Format(time.RFC3339),
		"pending":             pending,
		"revoked_since_start": revoked,
		"minutes_left_about":  (pending + refreshesPerMinute(cfg) - 1) / refreshesPerMinute(cfg),
	}, nil
}

// refreshesPerMinute is about how many refreshes the background refresh makes a minute: call_budget's pace.
func refreshesPerMinute(cfg *config) int { return cfg.callsPerSecond() * 60 }
