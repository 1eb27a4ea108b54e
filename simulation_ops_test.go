package evenergy

import (
	"fmt"
	"math/rand/v2"
	"time"
)

// simOp is one step of a simulation, with every choice it makes drawn when the seed's steps are
// generated, so that the minimizer can drop steps and replay the rest.
type simOp struct {
	kind  string
	n     int           // which user, role, lease or variant
	v     int           // a second choice
	d     time.Duration // how long, for advances and fault spans
	async bool          // started in its own goroutine: the next steps run while it is in flight
}

func (o simOp) String() string {
	s := fmt.Sprintf("%s n=%d v=%d", o.kind, o.n, o.v)
	if o.d > 0 {
		s += " d=" + o.d.String()
	}
	if o.async {
		s += " (async)"
	}
	return s
}

// simOpWeights are the operations and how often each is drawn.
var simOpWeights = []struct {
	kind   string
	weight int
}{
	{"read-token", 6}, {"read-role", 14}, {"read-user", 14},
	{"renew-lease", 4}, {"revoke-lease", 3},
	{"advance", 22}, {"periodic", 9},
	{"config-write", 4}, {"config-recreate", 1},
	{"role-write", 4}, {"role-delete", 1}, {"rotate-role", 2}, {"check-grants", 1},
	{"authorize", 3}, {"import", 2}, {"delete-user", 2}, {"revocations-drive", 2},
	{"restart", 1}, {"failover", 1}, {"remote-write", 2},
	{"ev-faults", 3}, {"ev-down", 1}, {"storage-faults", 3}, {"storage-refuse", 2}, {"storage-block", 1},
	{"faults-off", 3},
}

// simAsyncKinds may run in their own goroutine, in flight while the next steps run.
var simAsyncKinds = map[string]bool{"read-role": true, "read-user": true, "read-token": true, "config-write": true, "role-write": true,
	"rotate-role": true, "delete-user": true, "import": true, "periodic": true, "revocations-drive": true, "check-grants": true}

// genOps draws the steps of a seed.
func genOps(seed uint64, steps int) []simOp {
	rng := rand.New(rand.NewPCG(seed, 0x0b5))
	total := 0
	for _, w := range simOpWeights {
		total += w.weight
	}
	ops := make([]simOp, steps)
	for i := range ops {
		pick := rng.IntN(total)
		var kind string
		for _, w := range simOpWeights {
			if pick -= w.weight; pick < 0 {
				kind = w.kind
				break
			}
		}
		op := simOp{kind: kind, n: rng.IntN(1 << 16), v: rng.IntN(1 << 16)}
		switch kind {
		case "advance":
			switch r := rng.IntN(10); {
			case r < 6:
				op.d = time.Duration(rng.Int64N(int64(10 * time.Second)))
			case r < 9:
				op.d = time.Duration(rng.Int64N(int64(10 * time.Minute)))
			default:
				op.d = time.Duration(rng.Int64N(int64(3 * time.Hour)))
			}
		case "ev-down", "storage-refuse", "storage-block":
			op.d = time.Duration(1+rng.IntN(30)) * time.Second
		}
		op.async = simAsyncKinds[kind] && rng.IntN(5) == 0
		ops[i] = op
	}
	return ops
}
