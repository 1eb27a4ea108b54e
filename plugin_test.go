package evenergy

import (
	"strings"
	"testing"
)

// The acceptance tests' plugin is stamped with a version of its own, as `make build` stamps the
// release's: a version shown that differs from the code's default proves the stamp reached Vault.
const (
	testVersion = "v0.0.0-acctest"
	versionVar  = "github.com/evenergy/vault-plugin-secrets-evenergy.Version"
)

// TestAccOpenAPINamesEveryOperation reads the OpenAPI document of the dev Vault: every operation
// of a mount of this engine has an operation ID starting with evenergy- and a one-line summary.
func TestAccOpenAPINamesEveryOperation(t *testing.T) {
	t.Parallel()
	e := newAccEnv(t)
	doc, err := e.vault.Logical().Read("sys/internal/specs/openapi")
	if err != nil {
		t.Fatal(err)
	}
	paths, _ := doc.Data["paths"].(map[string]any)
	operations := 0
	for path, item := range paths {
		if !strings.HasPrefix(path, "/"+e.mount+"/") {
			continue
		}
		for method, op := range item.(map[string]any) {
			op, ok := op.(map[string]any)
			if !ok || method == "parameters" {
				continue
			}
			operations++
			id, _ := op["operationId"].(string)
			summary, _ := op["summary"].(string)
			if !strings.HasPrefix(id, operationPrefix+"-") || summary == "" || strings.Contains(summary, "\n") {
				t.Errorf("%s %s: operation ID %q, summary %q", method, path, id, summary)
			}
		}
	}
	if operations < 14 {
		t.Fatalf("the OpenAPI document has %d operations of the mount; want all of them (14 or more)", operations)
	}
}

// TestAccMountShowsTheRunningVersion checks that Vault shows the version the plugin was built with.
func TestAccMountShowsTheRunningVersion(t *testing.T) {
	t.Parallel()
	e := newAccEnv(t)
	mount, err := e.vault.Logical().Read("sys/mounts/" + e.mount)
	if err != nil {
		t.Fatal(err)
	}
	if got := mount.Data["running_plugin_version"]; got != testVersion {
		t.Fatalf("running_plugin_version = %v, want %s, as stamped into the plugin", got, testVersion)
	}
}
