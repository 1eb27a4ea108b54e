package evenergy

import (
	"fmt"
	"maps"
	"os"
	"regexp"
	"slices"
	"strings"
	"testing"

	"github.com/hashicorp/vault/sdk/framework"
	"github.com/hashicorp/vault/sdk/logical"
)

// apiDocsFile documents each endpoint under a ## heading, with a method table
// ("| `GET` | `/evenergy/config` |") and, when it takes any, a parameter table headed by
// parameterHeader ("| `client_id` | string | `""` | ... |").
const (
	apiDocsFile     = "docs/api.md"
	parameterHeader = "| Parameter | Type | Default | Description |"
)

var (
	methodRow    = regexp.MustCompile("^\\| `(GET|POST|DELETE|LIST)` +\\| `/evenergy/([^`]*)` +\\|")
	parameterRow = regexp.MustCompile("^\\| `([a-z_]+)` \\| ([^|]+?) \\| ([^|]+?) \\|")
	namedGroup   = regexp.MustCompile(`\(\?P<(\w+)>`)
)

// apiDocsTypes are docs/api.md's names of the field types the engine uses.
var apiDocsTypes = map[framework.FieldType]string{
	framework.TypeString:           "string",
	framework.TypeLowerCaseString:  "string",
	framework.TypeCommaStringSlice: "list",
	framework.TypeDurationSecond:   "duration",
	framework.TypeBool:             "bool",
	framework.TypeInt:              "integer",
}

// httpMethods are the HTTP methods of Vault's operations; create and update are both POST.
var httpMethods = map[logical.Operation]string{
	logical.ReadOperation:   "GET",
	logical.CreateOperation: "POST",
	logical.UpdateOperation: "POST",
	logical.DeleteOperation: "DELETE",
	logical.ListOperation:   "LIST",
}

// apiEndpoint is one ## section of docs/api.md.
type apiEndpoint struct {
	heading    string
	methods    []string // "GET config"
	parameters map[string][2]string
}

// TestAPIDocsDocumentEveryPathAndField reads docs/api.md: every operation of every path appears
// in it with its HTTP method, every field in a parameter table of its path with its
// type and default, and every method and parameter there exists in the engine.
func TestAPIDocsDocumentEveryPathAndField(t *testing.T) {
	endpoints := apiDocs(t)
	documented := map[string]bool{} // "GET config"
	for _, e := range endpoints {
		for _, m := range e.methods {
			documented[m] = true
		}
	}
	for _, p := range newBackend().Paths {
		path := displayPath(p.Pattern)
		methods := map[string]bool{}
		for _, op := range append(slices.Collect(maps.Keys(p.Operations)), slices.Collect(maps.Keys(p.Callbacks))...) {
			method, ok := httpMethods[op]
			if !ok {
				t.Errorf("%s: operation %s has no HTTP method in this test", path, op)
			}
			methods[method] = true
		}
		for method := range methods {
			if !documented[method+" "+path] {
				t.Errorf(apiDocsFile+" has no method table row | `%s` | `/evenergy/%s` |", method, path)
			}
			delete(documented, method+" "+path)
		}
		for name, schema := range p.Fields {
			want, err := fieldTypeAndDefault(schema)
			if err != nil {
				t.Errorf("%s field %s: %v", path, name, err)
				continue
			}
			found := false
			for _, e := range endpoints {
				if got, ok := e.parameters[name]; ok && e.documents(path) {
					found = true
					if got != want {
						t.Errorf(apiDocsFile+" %q: %s has type %q and default %q; the engine's are %q and %q", e.heading, name, got[0], got[1], want[0], want[1])
					}
				}
			}
			if !found {
				t.Errorf("no parameter table of /evenergy/%s in "+apiDocsFile+" names %s (%s, default %s)", path, name, want[0], want[1])
			}
		}
	}
	for m := range documented {
		t.Errorf(apiDocsFile+" documents %s, which the engine does not have", m)
	}
	fields := map[string]map[string]bool{} // by path
	for _, p := range newBackend().Paths {
		fields[displayPath(p.Pattern)] = map[string]bool{}
		for name := range p.Fields {
			fields[displayPath(p.Pattern)][name] = true
		}
	}
	for _, e := range endpoints {
		for name := range e.parameters {
			if !slices.ContainsFunc(e.methods, func(m string) bool { return fields[strings.SplitN(m, " ", 2)[1]][name] }) {
				t.Errorf(apiDocsFile+" %q names parameter %s, which none of its paths has", e.heading, name)
			}
		}
	}
}

// documents reports whether the endpoint's method table names path.
func (e apiEndpoint) documents(path string) bool {
	return slices.ContainsFunc(e.methods, func(m string) bool { return strings.SplitN(m, " ", 2)[1] == path })
}

// apiDocs parses the ## sections of docs/api.md, one per endpoint.
func apiDocs(t *testing.T) []apiEndpoint {
	t.Helper()
	raw, err := os.ReadFile(apiDocsFile)
	if err != nil {
		t.Fatal(err)
	}
	var endpoints []apiEndpoint
	inParameters := false
	for line := range strings.Lines(string(raw)) {
		line = strings.TrimRight(line, "\n")
		switch {
		case strings.HasPrefix(line, "## "):
			endpoints = append(endpoints, apiEndpoint{heading: strings.TrimPrefix(line, "## "), parameters: map[string][2]string{}})
			continue
		case len(endpoints) == 0:
			continue
		case line == parameterHeader:
			inParameters = true
			continue
		case !strings.HasPrefix(line, "|"):
			inParameters = false
			continue
		}
		e := &endpoints[len(endpoints)-1]
		if m := methodRow.FindStringSubmatch(line); m != nil {
			e.methods = append(e.methods, m[1]+" "+m[2])
		} else if m := parameterRow.FindStringSubmatch(line); m != nil && inParameters {
			if _, twice := e.parameters[m[1]]; twice {
				t.Errorf("%s %q names parameter %s twice", apiDocsFile, e.heading, m[1])
			}
			e.parameters[m[1]] = [2]string{m[2], m[3]}
		} else if inParameters && !strings.HasPrefix(line, "|---") {
			t.Errorf("%s %q: a parameter row must read | `name` | type | default | description |, not %q", apiDocsFile, e.heading, line)
		}
	}
	if len(endpoints) == 0 {
		t.Fatalf("%s has no ## endpoint sections", apiDocsFile)
	}
	return endpoints
}

// displayPath is a path pattern as Vault's docs write it: roles/(?P<name>...) is roles/:name.
func displayPath(pattern string) string {
	var out strings.Builder
	for i := 0; i < len(pattern); {
		m := namedGroup.FindStringSubmatchIndex(pattern[i:])
		if m == nil {
			out.WriteString(pattern[i:])
			break
		}
		out.WriteString(pattern[i : i+m[0]])
		out.WriteString(":" + pattern[i+m[2]:i+m[3]])
		// Skip to the group's closing parenthesis.
		depth, j := 0, i+m[0]
		for ; j < len(pattern); j++ {
			switch pattern[j] {
			case '\\':
				j++
			case '(':
				depth++
			case ')':
				depth--
			}
			if depth == 0 {
				break
			}
		}
		i = j + 1
	}
	path := strings.TrimSuffix(strings.TrimPrefix(out.String(), "^"), "$")
	return strings.TrimSuffix(strings.TrimSuffix(path, "?"), "/")
}

// fieldTypeAndDefault is a field's type and default as docs/api.md's parameter tables write them.
func fieldTypeAndDefault(schema *framework.FieldSchema) ([2]string, error) {
	typ, ok := apiDocsTypes[schema.Type]
	if !ok {
		return [2]string{}, fmt.Errorf("type %s has no docs/api.md name in this test", schema.Type)
	}
	switch {
	case schema.Required:
		return [2]string{typ, "required"}, nil
	case schema.Default == nil && typ == "list":
		return [2]string{typ, "`[]`"}, nil
	case schema.Default == nil && typ == "duration":
		return [2]string{typ, "`0`"}, nil
	case schema.Default == nil:
		return [2]string{typ, "`\"\"`"}, nil
	case typ == "duration":
		seconds, ok := schema.Default.(int)
		if !ok {
			return [2]string{}, fmt.Errorf("duration default %v is not seconds", schema.Default)
		}
		return [2]string{typ, "`" + readableSeconds(seconds) + "`"}, nil
	default:
		return [2]string{typ, fmt.Sprintf("`%v`", schema.Default)}, nil
	}
}

// readableSeconds writes a duration as docs/api.md does: 30s, 10m, 1h.
func readableSeconds(seconds int) string {
	switch {
	case seconds%3600 == 0:
		return fmt.Sprintf("%dh", seconds/3600)
	case seconds%60 == 0:
		return fmt.Sprintf("%dm", seconds/60)
	default:
		return fmt.Sprintf("%ds", seconds)
	}
}

// TestDisplayPath pins how path patterns read in docs/api.md.
func TestDisplayPath(t *testing.T) {
	for pattern, want := range map[string]string{
		"config":                           "config",
		"^roles/?$":                        "roles",
		rolePrefix + roleField("name"):     "roles/:name",
		"token/" + roleField("role"):       "token/:role",
		userPrefix + userField + "/token$": "users/:user/token",
		"^auth-url/" + userField + "$":     "auth-url/:user",
	} {
		if got := displayPath(pattern); got != want {
			t.Errorf("displayPath(%q) = %q, want %q", pattern, got, want)
		}
	}
}
