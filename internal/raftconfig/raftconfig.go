// Package raftconfig writes the configuration of a Vault server on integrated storage (Raft) on
// loopback, as the acceptance tests' cluster and the benchmarks start it.
package raftconfig

import "fmt"

// Node is one Vault server of a Raft cluster.
type Node struct {
	DataDir     string // the Raft data directory
	NodeID      string
	Addr        string // host:port of the API listener
	ClusterAddr string // host:port of the cluster listener
	PluginDir   string
	LeaderAddr  string // host:port of the first node's API, for the others to join; empty for the first
	LogLevel    string // empty keeps Vault's default
}

// HCL is the node's server configuration.
func (n Node) HCL() string {
	join := ""
	if n.LeaderAddr != "" {
		join = fmt.Sprintf("  retry_join {\n    leader_api_addr = %q\n  }\n", "http://"+n.LeaderAddr)
	}
	logLevel := ""
	if n.LogLevel != "" {
		logLevel = fmt.Sprintf("log_level        = %q\n", n.LogLevel)
	}
	return fmt.Sprintf(`storage "raft" {
  path    = %q
  node_id = %q
%s}
listener "tcp" {
  address         = %q
  cluster_address = %q
  tls_disable     = true
}
api_addr         = %q
cluster_addr     = %q
disable_mlock    = true
plugin_directory = %q
%s`, n.DataDir, n.NodeID, join, n.Addr, n.ClusterAddr, "http://"+n.Addr, "https://"+n.ClusterAddr, n.PluginDir, logLevel)
}
