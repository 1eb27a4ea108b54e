// Command vault-plugin-secrets-evenergy serves the ev.energy secrets engine to Vault.
package main

import (
	"os"

	hclog "github.com/hashicorp/go-hclog"
	"github.com/hashicorp/vault/sdk/plugin"

	evenergy "github.com/evenergy/vault-plugin-secrets-evenergy"
)

func main() {
	// Vault connects to the plugin over automatic mTLS, so no TLS provider is needed.
	if err := plugin.ServeMultiplex(&plugin.ServeOpts{BackendFactoryFunc: evenergy.Factory}); err != nil {
		hclog.New(&hclog.LoggerOptions{}).Error("plugin shutting down", "error", err)
		os.Exit(1)
	}
}
