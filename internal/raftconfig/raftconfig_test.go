package raftconfig

import (
	"strings"
	"testing"
)

func TestOnlyAJoiningNodeNamesTheLeader(t *testing.T) {
	first := Node{DataDir: "/tmp/raft", NodeID: "node1", Addr: "127.0.0.1:8200", ClusterAddr: "127.0.0.1:8201", PluginDir: "/plugins"}.HCL()
	joining := Node{DataDir: "/tmp/raft2", NodeID: "node2", Addr: "127.0.0.1:8210", ClusterAddr: "127.0.0.1:8211", PluginDir: "/plugins", LeaderAddr: "127.0.0.1:8200", LogLevel: "debug"}.HCL()
	for _, want := range []string{`node_id = "node1"`, `api_addr         = "http://127.0.0.1:8200"`, `cluster_addr     = "https://127.0.0.1:8201"`, `plugin_directory = "/plugins"`} {
		if !strings.Contains(first, want) {
			t.Errorf("the first node's config lacks %s:\n%s", want, first)
		}
	}
	if strings.Contains(first, "retry_join") || strings.Contains(first, "log_level") {
		t.Errorf("the first node joins no one and keeps Vault's log level:\n%s", first)
	}
	if !strings.Contains(joining, `leader_api_addr = "http://127.0.0.1:8200"`) || !strings.Contains(joining, `log_level        = "debug"`) {
		t.Errorf("a joining node's config:\n%s", joining)
	}
}
