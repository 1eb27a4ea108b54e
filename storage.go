package evenergy

import (
	"context"

	"github.com/hashicorp/vault/sdk/logical"
)

// getJSON decodes the storage entry at key; nil when there is none.
func getJSON[T any](ctx context.Context, s logical.Storage, key string) (*T, error) {
	entry, err := s.Get(ctx, key)
	if err != nil || entry == nil {
		return nil, err
	}
	v := new(T)
	return v, entry.DecodeJSON(v)
}

func putJSON(ctx context.Context, s logical.Storage, key string, v any) error {
	entry, err := logical.StorageEntryJSON(key, v)
	if err != nil {
		return err
	}
	return s.Put(ctx, entry)
}
