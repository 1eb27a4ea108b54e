package evenergy

import (
	"fmt"
	"net/http/httptest"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/hashicorp/vault/api"

	"github.com/evenergy/vault-plugin-secrets-evenergy/internal/raftconfig"
	"github.com/evenergy/vault-plugin-secrets-evenergy/internal/standin"
)

// clusterDeadline bounds every wait on the cluster: elections and joins are slow on a loaded machine.
const clusterDeadline = 90 * time.Second

// raftNode is one Vault server of a Raft cluster on loopback.
type raftNode struct {
	name   string
	addr   string // API address, host:port
	dir    string // configuration and Raft data
	log    string
	cmd    *exec.Cmd // nil once the node is stopped
	client *api.Client
}

type raftCluster struct {
	nodes []*raftNode
}

// startRaftCluster starts size Vault servers with Raft storage, joined to the first one, initialized
// with one key share, unsealed, all voters, with the race-built plugin in the catalog.
func startRaftCluster(t *testing.T, size int) *raftCluster {
	t.Helper()
	bin := os.Getenv("VAULT_BIN")
	if bin == "" {
		t.Fatal("VAULT_BIN is not set: run `make test`, which builds the Vault server into bin/vault")
	}
	pluginDir, pluginSum, err := racePlugin()
	if err != nil {
		t.Fatal(err)
	}
	c := &raftCluster{}
	t.Cleanup(func() { c.stop(t) })
	for i := range size {
		n, err := c.startNode(t, bin, pluginDir, i)
		if err != nil {
			t.Fatalf("starting node %d: %v", i+1, err)
		}
		c.nodes = append(c.nodes, n)
	}

	first := c.nodes[0]
	var init *api.InitResponse
	eventually(t, clusterDeadline, first.name+" to accept sys/init", func() bool {
		init, err = first.client.Sys().Init(&api.InitRequest{SecretShares: 1, SecretThreshold: 1})
		return err == nil
	})
	for _, n := range c.nodes {
		n.client.SetToken(init.RootToken)
	}
	// The followers join through retry_join, which needs them unsealed to answer the leader's
	// challenge. Each node gets the key once it takes it: a follower unseals in the background after
	// the join, and a second key racing that unseal starts a second standby loop in Vault, after which
	// a step-down can reach the loop that lost the election and do nothing.
	keyTaken := make([]bool, len(c.nodes))
	eventually(t, clusterDeadline, "every node to be unsealed", func() bool {
		unsealed := 0
		for i, n := range c.nodes {
			if status, err := n.client.Sys().SealStatus(); err == nil && !status.Sealed {
				unsealed++
			} else if !keyTaken[i] {
				_, err := n.client.Sys().Unseal(init.KeysB64[0])
				keyTaken[i] = err == nil
			}
		}
		return unsealed == len(c.nodes)
	})
	eventually(t, clusterDeadline, "every node to be a Raft voter", func() bool { return c.voters(first) == len(c.nodes) })
	active := c.active(t)
	if _, err := active.client.Logical().Write("sys/plugins/catalog/secret/"+pluginName,
		map[string]any{"sha256": pluginSum, "command": pluginName}); err != nil {
		t.Fatalf("registering the plugin: %v", err)
	}
	return c
}

func (c *raftCluster) startNode(t *testing.T, bin, pluginDir string, i int) (*raftNode, error) {
	addr, err := freeLoopbackAddr()
	if err != nil {
		return nil, err
	}
	clusterAddr, err := freeLoopbackAddr()
	if err != nil {
		return nil, err
	}
	dir, err := os.MkdirTemp("", "evenergy-raft-")
	if err != nil {
		return nil, err
	}
	n := &raftNode{name: fmt.Sprintf("node%d", i+1), addr: addr, dir: dir}
	node := raftconfig.Node{DataDir: filepath.Join(dir, "raft"), NodeID: n.name, Addr: addr, ClusterAddr: clusterAddr, PluginDir: pluginDir, LogLevel: "debug"}
	if i > 0 {
		node.LeaderAddr = c.nodes[0].addr
	}
	config := node.HCL()
	if err := os.Mkdir(filepath.Join(dir, "raft"), 0o700); err != nil {
		return n, err
	}
	if err := os.WriteFile(filepath.Join(dir, "vault.hcl"), []byte(config), 0o600); err != nil {
		return n, err
	}
	logFile, err := serverLog(strings.ToLower(t.Name()) + "-" + n.name)
	if err != nil {
		return n, err
	}
	defer logFile.Close()
	n.log = logFile.Name()
	cmd := exec.Command(bin, "server", "-config="+filepath.Join(dir, "vault.hcl"))
	cmd.Stdout, cmd.Stderr = logFile, logFile
	cmd.SysProcAttr = serverProcAttr()
	if err := cmd.Start(); err != nil {
		return n, err
	}
	n.cmd = cmd
	cfg := api.DefaultConfig()
	cfg.Address = "http://" + addr
	n.client, err = api.NewClient(cfg)
	return n, err
}

// stop stops every node still running, shows the end of each log if the test failed, and removes
// the nodes' directories.
func (c *raftCluster) stop(t *testing.T) {
	var wg sync.WaitGroup
	for _, n := range c.nodes {
		if n.cmd != nil {
			wg.Go(func() { stopServer(n.cmd) })
		}
	}
	wg.Wait()
	for _, n := range c.nodes {
		if t.Failed() && n.log != "" {
			t.Logf("last lines of %s's log (%s):\n%s", n.name, n.log, tail(n.log, 40))
		}
		_ = os.RemoveAll(n.dir)
	}
}

// kill ends a node as a crash would: SIGKILL to it and its plugins.
func (c *raftCluster) kill(t *testing.T, n *raftNode) {
	t.Helper()
	if err := syscall.Kill(-n.cmd.Process.Pid, syscall.SIGKILL); err != nil {
		t.Fatal(err)
	}
	_ = n.cmd.Wait()
	n.cmd = nil
}

// voters counts the Raft voters in the configuration as n sees it.
func (c *raftCluster) voters(n *raftNode) int {
	s, err := n.client.Logical().Read("sys/storage/raft/configuration")
	if err != nil || s == nil {
		return 0
	}
	config, _ := s.Data["config"].(map[string]any)
	servers, _ := config["servers"].([]any)
	voters := 0
	for _, server := range servers {
		if v, _ := server.(map[string]any); v["voter"] == true {
			voters++
		}
	}
	return voters
}

// active waits until one running node is active and every other running node names it as leader,
// so that standbys forward to it.
func (c *raftCluster) active(t *testing.T) *raftNode {
	t.Helper()
	var active *raftNode
	eventually(t, clusterDeadline, "one active node that every running node agrees on", func() bool {
		active = nil
		leaders := map[string]bool{}
		for _, n := range c.running() {
			leader, err := n.client.Sys().Leader()
			if err != nil {
				return false
			}
			if leader.IsSelf {
				active = n
			}
			leaders[leader.LeaderAddress] = true
		}
		return active != nil && len(leaders) == 1 && leaders["http://"+active.addr]
	})
	return active
}

func (c *raftCluster) running() []*raftNode {
	var out []*raftNode
	for _, n := range c.nodes {
		if n.cmd != nil {
			out = append(out, n)
		}
	}
	return out
}

// mount mounts the plugin in the cluster against its own stand-in, as newAccEnv does on the dev Vault.
func (c *raftCluster) mount(t *testing.T, through *raftNode) *accEnv {
	t.Helper()
	e := &accEnv{vault: through.client, standin: standin.New(), mount: "evenergy-raft"}
	e.standin.AddClient(standin.Client{ID: testClientID, Secret: testClientSecret, Scopes: testScopes})
	server := httptest.NewServer(e.standin)
	t.Cleanup(server.Close)
	e.url = server.URL
	if err := e.vault.Sys().Mount(e.mount, &api.MountInput{Type: pluginName}); err != nil {
		t.Fatal(err)
	}
	e.write(t, "config", map[string]any{"client_id": testClientID, "client_secret": testClientSecret, "base_url": e.url})
	return e
}

// tail returns the last n lines of a file.
func tail(path string, n int) string {
	data, err := os.ReadFile(path)
	if err != nil {
		return err.Error()
	}
	lines := strings.Split(strings.TrimRight(string(data), "\n"), "\n")
	return strings.Join(lines[max(len(lines)-n, 0):], "\n")
}

// readEventually reads a path until it answers: right after a failover, a node may not serve yet.
func readEventually(t *testing.T, client *api.Client, path string) *api.Secret {
	t.Helper()
	var s *api.Secret
	var err error
	eventually(t, clusterDeadline, "a read of "+path, func() bool {
		s, err = client.Logical().Read(path)
		return err == nil && s != nil
	})
	return s
}

// TestAccRaftFailover reads every kind of leased token through each standby of a 3-node Raft cluster
// with the server's default settings, then kills the active node: the new active node must hand
// out the user's rotated token, refresh it once when due, and revoke the leases the old one issued.
// Not parallel: three Vault servers are as much as a loaded 2-core machine should run beside others.
func TestAccRaftFailover(t *testing.T) {
	start := time.Now()
	c := startRaftCluster(t, 3)
	leader := c.active(t)
	t.Logf("3 voters, %s active, after %v", leader.name, time.Since(start).Round(time.Second))
	e := c.mount(t, leader)
	const user = "driver-raft"

	// 1. Import a grant obtained elsewhere; Vault takes it over with a token already due for refresh.
	e.write(t, "config", map[string]any{"refresh_window": dueWindow})
	e.standin.SetTokenLifetime(5 * time.Minute)
	refresh, err := e.standin.IssueUserGrant(testClientID, user, "")
	if err != nil {
		t.Fatal(err)
	}
	e.write(t, "users/"+user, map[string]any{"refresh_token": refresh})
	e.standin.SetTokenLifetime(time.Hour)
	imported := e.userTokens(user, "access")
	stale := imported[len(imported)-1].Value

	// 2. Reading on the leader refreshes it; the rotated token lives an hour, and its refresh point,
	// fixed as it is issued, comes 150 s later: after the failover, which takes well under that.
	e.write(t, "config", map[string]any{"refresh_window": "3450s"})
	rotated := e.standinToken(t, e.read(t, "users/"+user+"/token"))
	if rotated == stale || e.standin.Active(stale) {
		t.Fatal("the due token was not rotated on the leader")
	}

	// 3. Client-credentials leases issued by the leader, ending after the failover.
	e.write(t, "roles/brief", map[string]any{"ttl": "20s"})
	var leased []string
	for range 3 {
		leased = append(leased, e.standinToken(t, e.read(t, "token/brief")))
	}
	// A shared role's token, minted on the leader and stored.
	e.write(t, "roles/fleet", map[string]any{"shared": true})
	shared := e.standinToken(t, e.read(t, "token/fleet"))
	readThroughStandbys(t, c, e, leader, user, rotated, shared)

	// 4. The leader dies as a crashed machine would; the survivors elect another.
	c.kill(t, leader)
	killed := time.Now()
	for _, tok := range leased {
		if !e.standin.Active(tok) {
			t.Fatal("a lease's token was revoked before its lease ended")
		}
	}
	active := c.active(t)
	e.vault = active.client
	t.Logf("%s active %v after the leader was killed", active.name, time.Since(killed).Round(time.Second))
	survivors := c.running()

	// 5a. Every survivor hands out the rotated token, which is not due, so nothing is refreshed, and
	// the stored shared token, so nothing is minted.
	before, requests := len(e.userTokens(user, "access")), e.standin.TokenRequests()
	for _, n := range survivors {
		if got := e.standinToken(t, readEventually(t, n.client, e.path("users/"+user+"/token"))); got != rotated {
			t.Fatalf("after the failover %s returned another token than the rotated one (stale: %v)", n.name, got == stale)
		}
		if got := e.standinToken(t, readEventually(t, n.client, e.path("token/fleet"))); got != shared {
			t.Fatalf("after the failover %s returned another token than the stored shared one", n.name)
		}
	}
	if n := len(e.userTokens(user, "access")); n != before || e.standin.TokenRequests() != requests {
		t.Fatalf("%d access tokens issued and %d token requests after the failover, want none", n-before, e.standin.TokenRequests()-requests)
	}

	// 5b. Due again at its stored refresh point: concurrent readers through both survivors share
	// exactly one refresh (or get the one the new active node's periodic pass made).
	e.standin.SetTokenLifetime(10 * time.Hour)
	refreshAt, err := time.Parse(time.RFC3339, e.read(t, "users/"+user).Data["refresh_at"].(string))
	if err != nil {
		t.Fatal(err)
	}
	eventually(t, 3*time.Minute, "the rotated token's refresh point", func() bool { return time.Now().After(refreshAt) })
	var tokens []string
	var mu sync.Mutex
	var wg sync.WaitGroup
	for _, n := range survivors {
		for range 3 {
			wg.Go(func() {
				s, err := n.client.Logical().Read(e.path("users/" + user + "/token"))
				if err != nil {
					t.Errorf("concurrent read through %s: %v", n.name, err)
					return
				}
				mu.Lock()
				defer mu.Unlock()
				tokens = append(tokens, s.Data["access_token"].(string))
			})
		}
	}
	wg.Wait()
	if t.Failed() {
		t.FailNow()
	}
	for _, tok := range tokens {
		if tok != tokens[0] || tok == rotated || !e.standin.Active(tok) {
			t.Fatal("concurrent readers after the failover got different, old or dead tokens")
		}
	}
	if n := len(e.userTokens(user, "access")); n != before+1 {
		t.Fatalf("%d refreshes after the failover, want exactly one", n-before)
	}

	// 5c. The new active node ends the old leader's leases and revokes their tokens at ev.energy.
	eventually(t, 2*clusterDeadline, "the leases issued before the failover to be revoked at ev.energy", func() bool {
		for _, tok := range leased {
			if !e.revoked(tok) {
				return false
			}
		}
		return true
	})
	t.Logf("leases issued before the failover revoked %v after it", time.Since(killed).Round(time.Second))

	stepDownDuringPass(t, c, e, active)
}

// readThroughStandbys reads every kind of leased token through each standby of a cluster with the
// server's default settings: Vault's standbys forward every request, OpenBao's serve reads and
// report themselves performance standbys, from which the engine forwards every leased read to the
// leader. Each read gets a lease and a live token; the user's and the shared role's are the
// leader's, and only the per-read and role reads mint.
func readThroughStandbys(t *testing.T, c *raftCluster, e *accEnv, leader *raftNode, user, userToken, shared string) {
	t.Helper()
	for _, n := range c.running() {
		if n == leader {
			continue
		}
		// Whether the standby serves reads itself shows in its metrics, which return no lease: its own
		// (no token minted there) on OpenBao, the leader's on Vault, whose standbys forward everything.
		const mintedSeries = `evenergy_tokens_minted_total{grant_type="client_credentials"}`
		if servesReads := (&accEnv{vault: n.client, mount: e.mount}).metricsJSON(t)[mintedSeries] == 0; servesReads != openBao(t) {
			t.Fatalf("the standby %s serves reads itself: %v; want it to on OpenBao (its default) and not on Vault", n.name, servesReads)
		}
		requests := e.standin.TokenRequests()
		want := map[string]string{"token": "", "token/brief": "", "token/fleet": shared, "users/" + user + "/token": userToken}
		for _, path := range []string{"token", "token/brief", "token/fleet", "users/" + user + "/token"} {
			s, err := n.client.Logical().Read(e.path(path))
			if err != nil || s == nil || s.LeaseID == "" {
				t.Fatalf("%s through the standby %s: %v; want a leased token", path, n.name, err)
			}
			if got := e.standinToken(t, s); want[path] != "" && got != want[path] {
				t.Fatalf("%s through the standby %s: another token than the one the leader holds", path, n.name)
			}
		}
		if minted := e.standin.TokenRequests() - requests; minted != 2 {
			t.Fatalf("reads through the standby %s sent %d token requests, want 2 (token and token/brief)", n.name, minted)
		}
	}
}

// stepDownBound is how long a step-down in the middle of a periodic pass may keep the cluster
// without an active node, or the old leader from answering sys/health.
const stepDownBound = 15 * time.Second

// stepDownDuringPass steps the active node down while a periodic pass refreshes many due grants at
// a slow ev.energy: the pass stops starting refreshes, so another node is active and the old leader
// answers sys/health within stepDownBound; no refresh token reaches ev.energy twice, and every
// grant stays active and hands out a token afterwards.
func stepDownDuringPass(t *testing.T, c *raftCluster, e *accEnv, leader *raftNode) {
	const users, latency = 200, 3 * time.Second
	// Imported with 10-minute tokens whose refresh point comes a minute after each import: no pass
	// refreshes them while they are imported.
	e.write(t, "config", map[string]any{"refresh_window": "540s"})
	e.standin.SetTokenLifetime(10 * time.Minute)
	names := make(chan string)
	var wg sync.WaitGroup
	for range 8 {
		wg.Go(func() {
			for user := range names {
				refresh, err := e.standin.IssueUserGrant(testClientID, user, "")
				if err == nil {
					_, err = e.vault.Logical().Write(e.path("users/"+user), map[string]any{"refresh_token": refresh})
				}
				if err != nil {
					t.Errorf("importing %s: %v", user, err)
				}
			}
		})
	}
	for i := range users {
		names <- fmt.Sprintf("fleet-%03d", i)
	}
	close(names)
	wg.Wait()
	if t.Failed() {
		t.FailNow()
	}

	// Soon every imported token is due, and ev.energy takes 3 s per refresh: wait for a pass to begin.
	// (A pass that refreshed all 200, 16 at a time, would hold Vault's state lock for over 35 s.)
	e.standin.SetTokenLifetime(time.Hour)
	e.standin.SetLatency(latency)
	before := e.standin.TokenRequests()
	eventually(t, 2*clusterDeadline, "a periodic pass to send refreshes", func() bool { return e.standin.TokenRequests() > before })

	health := make(chan time.Duration, 1)
	stop := make(chan struct{})
	go func() {
		var slowest time.Duration
		for {
			select {
			case <-stop:
				health <- slowest
				return
			case <-time.After(100 * time.Millisecond):
			}
			start := time.Now()
			_, _ = leader.client.Sys().Health()
			slowest = max(slowest, time.Since(start))
		}
	}()
	stepDown := time.Now()
	if err := leader.client.Sys().StepDown(); err != nil {
		t.Fatal(err)
	}
	var next *raftNode
	eventually(t, stepDownBound, "another node to be active after the step-down", func() bool {
		for _, n := range c.running() {
			if status, err := n.client.Sys().Leader(); err == nil && status.IsSelf && n != leader {
				next = n
			}
		}
		return next != nil
	})
	t.Logf("%s active %v after the step-down, %d refreshes sent by then", next.name, time.Since(stepDown).Round(time.Millisecond), e.standin.TokenRequests()-before)

	// Every grant stays active and hands out a live token through the new active node.
	e.standin.SetLatency(0)
	e.vault = c.active(t).client
	readEventually(t, e.vault, e.path("users/fleet-000")) // the mount serves on the new active node
	indexes := make(chan int)
	for range 8 {
		wg.Go(func() {
			for i := range indexes {
				user := fmt.Sprintf("fleet-%03d", i)
				s, err := e.vault.Logical().Read(e.path("users/" + user + "/token"))
				if err != nil {
					t.Errorf("%s's token after the step-down: %v", user, err)
					continue
				}
				if tok, _ := s.Data["access_token"].(string); !e.standin.Active(tok) {
					t.Errorf("%s's token after the step-down is dead at ev.energy", user)
				}
				if g, err := e.vault.Logical().Read(e.path("users/" + user)); err != nil || g.Data["status"] != "active" {
					t.Errorf("%s's grant after the step-down: %v", user, err)
				}
			}
		})
	}
	for i := range users {
		indexes <- i
	}
	close(indexes)
	wg.Wait()
	close(stop)
	if slowest := <-health; slowest > stepDownBound {
		t.Errorf("the old leader took %v to answer sys/health", slowest)
	} else {
		t.Logf("the old leader answered sys/health within %v throughout", slowest.Round(time.Millisecond))
	}
	if n := e.standin.RepeatedRefreshTokens(); n != 0 {
		t.Errorf("ev.energy received %d refresh tokens a second time", n)
	}
}
