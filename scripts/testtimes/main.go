// Command testtimes reads `go test -json` output and prints the slowest tests, slowest first.
package main

import (
	"bufio"
	"cmp"
	"encoding/json"
	"flag"
	"fmt"
	"os"
	"slices"
	"strings"
)

// event is the part of a test2json event that tells how long a test took.
type event struct {
	Action  string
	Package string
	Test    string
	Elapsed float64
}

func main() {
	top := flag.Int("top", 15, "how many of the slowest tests to print")
	flag.Parse()
	if flag.NArg() != 1 {
		fmt.Fprintln(os.Stderr, "usage: testtimes [-top N] FILE (the output of go test -json)")
		os.Exit(2)
	}
	f, err := os.Open(flag.Arg(0))
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	defer f.Close()
	var ended []event
	lines := bufio.NewScanner(f)
	lines.Buffer(make([]byte, 1<<20), 16<<20)
	for lines.Scan() {
		var e event
		// Lines that are not events (a build error, say) are not timings: skip them.
		if json.Unmarshal(lines.Bytes(), &e) != nil || e.Test == "" || strings.Contains(e.Test, "/") {
			continue
		}
		if e.Action == "pass" || e.Action == "fail" {
			ended = append(ended, e)
		}
	}
	if err := lines.Err(); err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	slices.SortFunc(ended, func(a, b event) int { return cmp.Compare(b.Elapsed, a.Elapsed) })
	for _, e := range ended[:min(*top, len(ended))] {
		fmt.Printf("%8.1fs  %-4s  %s  %s\n", e.Elapsed, e.Action, e.Test, e.Package)
	}
}
