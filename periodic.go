package evenergy

import (
	"context"
	"errors"
	"fmt"
	"time"

	"github.com/hashicorp/vault/sdk/logical"
)

// refreshDueUsers refreshes, on the active node only, every user token due for a refresh, and
// forgets expired pending authorizations.
func (b *backend) refreshDueUsers(ctx context.Context, req *logical.Request) error {
	if b.ensureWritable() != nil {
		return nil
	}
	var errs []error
	states, err := req.Storage.List(ctx, authRequestPrefix)
	errs = append(errs, err)
	for _, state := range states {
		pending, err := getJSON[authRequest](ctx, req.Storage, authRequestPrefix+state)
		if err == nil && pending != nil && time.Now().After(pending.ExpiresAt) {
			err = req.Storage.Delete(ctx, authRequestPrefix+state)
		}
		errs = append(errs, err)
	}

	cfg, err := getJSON[config](ctx, req.Storage, configPath)
	if err != nil || cfg == nil {
		return errors.Join(append(errs, err)...)
	}
	users, err := req.Storage.List(ctx, userPrefix)
	errs = append(errs, err)
	for _, user := range users {
		var revoked *revokedGrantError
		var otherClient *otherClientError
		if _, err := b.currentGrant(ctx, req.Storage, cfg, user); err != nil && !errors.As(err, &revoked) && !errors.As(err, &otherClient) {
			errs = append(errs, fmt.Errorf("user %s: %w", user, err))
		}
	}
	return errors.Join(errs...)
}
