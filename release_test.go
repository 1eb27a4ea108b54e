package evenergy

import (
	"bytes"
	"crypto/sha256"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
)

// TestReleaseBuildIsReproducible builds one release target twice as `make release` does, from this
// checkout and from a copy of it elsewhere, into two directories: both SHA256SUMS must be the same
// and name the binary's own sum, and the binary must carry the version without VCS stamp or cgo.
// For a release, the SHA256SUMS recorded in the repository must hold that sum.
func TestReleaseBuildIsReproducible(t *testing.T) {
	t.Parallel()
	version := "v" + releaseVersion(t)
	name := pluginName + "_" + version + "_linux_amd64"
	var sums [2][]byte
	for i, source := range []string{".", copyOfCheckout(t)} {
		out := t.TempDir()
		cmd := exec.Command(filepath.Join(source, "scripts/release.sh"), out, "linux/amd64")
		cmd.Env = append(os.Environ(), "GOFLAGS=")
		if log, err := cmd.CombinedOutput(); err != nil {
			t.Fatalf("scripts/release.sh: %v\n%s", err, log)
		}
		var err error
		if sums[i], err = os.ReadFile(filepath.Join(out, "SHA256SUMS")); err != nil {
			t.Fatal(err)
		}
		binary, err := os.ReadFile(filepath.Join(out, name))
		if err != nil {
			t.Fatal(err)
		}
		if want := fmt.Sprintf("%x  %s\n", sha256.Sum256(binary), name); string(sums[i]) != want {
			t.Fatalf("SHA256SUMS holds %q, want %q", sums[i], want)
		}
		if !bytes.Contains(binary, []byte(version)) {
			t.Fatalf("%s does not carry its version %s", name, version)
		}
		info, err := exec.Command("go", "version", "-m", filepath.Join(out, name)).Output()
		if err != nil {
			t.Fatal(err)
		}
		for _, want := range []string{"-trimpath=true", "CGO_ENABLED=0"} {
			if !strings.Contains(string(info), want) {
				t.Errorf("the build info lacks %s:\n%s", want, info)
			}
		}
		if strings.Contains(string(info), "vcs.") {
			t.Errorf("the build info carries a VCS stamp:\n%s", info)
		}
	}
	if !bytes.Equal(sums[0], sums[1]) {
		t.Fatalf("two builds of the same commit differ:\n%s%s", sums[0], sums[1])
	}
	if isDevVersion(releaseVersion(t)) {
		return
	}
	recorded, err := os.ReadFile(recordedSums(releaseVersion(t)))
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Contains(recorded, sums[0]) {
		t.Fatalf("%s does not hold the sum this commit builds, %q:\n%s", recordedSums(releaseVersion(t)), sums[0], recorded)
	}
}

// copyOfCheckout copies the checkout's files (tracked, and new ones git does not ignore) to a new
// directory, so a build there has other paths to leak.
func copyOfCheckout(t *testing.T) string {
	t.Helper()
	files, err := exec.Command("git", "ls-files", "--cached", "--others", "--exclude-standard").Output()
	if err != nil {
		t.Fatalf("git ls-files: %v", err)
	}
	dir := t.TempDir()
	for _, file := range strings.Fields(string(files)) {
		info, err := os.Stat(file)
		if os.IsNotExist(err) {
			continue // deleted in the work tree
		} else if err != nil {
			t.Fatal(err)
		}
		data, err := os.ReadFile(file)
		if err != nil {
			t.Fatal(err)
		}
		if err := os.MkdirAll(filepath.Join(dir, filepath.Dir(file)), 0o755); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(filepath.Join(dir, file), data, info.Mode()); err != nil {
			t.Fatal(err)
		}
	}
	return dir
}
