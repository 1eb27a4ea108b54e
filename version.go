package evenergy

// Version is the engine's version, which Vault shows as a mount's running_plugin_version. The
// VERSION file holds it; `make build` and `make release` stamp it here. A plain `go build` leaves
// this marker of an unstamped build.
var Version = "v0.0.0-dev"
