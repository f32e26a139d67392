package config

import (
	"bytes"
	"errors"
	"fmt"
	"io"
	"math/big"
	"os"
	"reflect"
	"regexp"
	"sort"
	"strconv"
	"strings"
	"unicode"
	"unicode/utf8"

	"go.yaml.in/yaml/v3"
)

// Error is one problem in a configuration file.
type Error struct {
	File  string
	Line  int    // 0 when the problem has no single line
	Key   string // key path such as services[0].listen
	Value string // the bad value, if any
	Msg   string // what is wrong and what would be valid
}

func (e *Error) Error() string {
	var b strings.Builder
	fmt.Fprintf(&b, "config %s: ", e.File)
	if e.Line > 0 {
		fmt.Fprintf(&b, "line %d: ", e.Line)
	}
	if e.Key != "" {
		fmt.Fprintf(&b, "%s: ", e.Key)
	}
	if e.Value != "" {
		fmt.Fprintf(&b, "%q ", e.Value)
	}
	b.WriteString(e.Msg)
	return printable(b.String())
}

// printable escapes, as Go does in a quoted string, what s holds that a
// terminal could take for a control sequence: control characters (C0,
// DEL, C1), other unprintable characters and invalid UTF-8. A key in
// double quotes may hold any ("\e[2J"), and so may a value yaml quotes
// in its own message: such an error, from `spliced -check` or
// `splicectl config check` of a file someone sent, wrote them to the
// terminal, which could clear it or overwrite the message.
func printable(s string) string {
	if !strings.ContainsFunc(s, func(r rune) bool { return r == utf8.RuneError || !unicode.IsPrint(r) }) {
		return s
	}
	var b strings.Builder
	for i := 0; i < len(s); {
		r, n := utf8.DecodeRuneInString(s[i:])
		switch {
		case r == utf8.RuneError && n == 1:
			fmt.Fprintf(&b, `\x%02x`, s[i])
		case unicode.IsPrint(r):
			b.WriteString(s[i : i+n])
		default:
			q := strconv.QuoteRune(r)
			b.WriteString(q[1 : len(q)-1])
		}
		i += n
	}
	return b.String()
}

// Errors is every problem found in one file. Its message lists them one per
// line.
type Errors []*Error

func (es Errors) Error() string {
	lines := make([]string, len(es))
	for i, e := range es {
		lines[i] = e.Error()
	}
	return strings.Join(lines, "\n")
}

// MaxFileSize bounds a configuration file: a configuration is a few
// kilobytes, and a path naming something else (a device, a log) must not
// be read into memory until the process dies.
const MaxFileSize = 4 << 20

// LoadFile reads and validates a configuration file.
func LoadFile(path string) (*Config, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, fmt.Errorf("config %s: %w", path, err)
	}
	defer f.Close()
	data, err := io.ReadAll(io.LimitReader(f, MaxFileSize+1))
	if err != nil {
		return nil, fmt.Errorf("config %s: %w", path, err)
	}
	if len(data) > MaxFileSize {
		return nil, fmt.Errorf("config %s: is larger than %d MiB; a configuration is a few kilobytes: check the path", path, MaxFileSize>>20)
	}
	return Parse(path, data)
}

// LoadDefault returns the embedded default configuration.
func LoadDefault() (*Config, error) { return Parse("<default>", Default) }

// Parse decodes and validates a configuration. file names the source in
// error messages. The returned error is an Errors value when the file is
// readable YAML but has problems.
func Parse(file string, data []byte) (*Config, error) {
	var root yaml.Node
	if err := yaml.Unmarshal(data, &root); err != nil {
		return nil, Errors{syntaxError(file, data, err)}
	}
	if e := secondDocument(file, data); e != nil {
		return nil, Errors{e}
	}
	cfg := &Config{File: file}
	if len(root.Content) == 0 { // empty file: all defaults
		cfg.applyDefaults()
		return cfg, cfg.validate(nil)
	}
	doc := root.Content[0]
	idx := &keyIndex{lines: map[string]int{}, paths: map[[2]int]string{}, nodes: map[string]*yaml.Node{}}
	var errs Errors
	idx.walk(doc, reflect.TypeFor[Config](), "", func(line int, key, msg string) {
		errs = append(errs, &Error{File: file, Line: line, Key: key, Msg: msg})
	})
	if len(errs) > 0 {
		return nil, errs
	}
	if err := doc.Decode(cfg); err != nil {
		return nil, Errors{decodeError(file, idx, err)}
	}
	if err := decodeSections(cfg, doc); err != nil {
		return nil, Errors{decodeError(file, idx, err)}
	}
	cfg.applyDefaults()
	if err := cfg.validate(idx); err != nil {
		for _, e := range err.(Errors) {
			e.File = file
		}
		return nil, err
	}
	return cfg, nil
}

// syntaxError reports a YAML syntax error at the line where the file stops
// being valid YAML: one after the longest prefix of whole lines that still
// parses. (The parser's own line number points at the start of the
// enclosing block, off by one.) The prefix is found by bisection: trying
// every prefix costs a parse per line, minutes for a file of megabytes.
func syntaxError(file string, data []byte, err error) *Error {
	msg := lineRE.ReplaceAllString(strings.TrimPrefix(err.Error(), "yaml: "), "")
	lines := strings.SplitAfter(string(data), "\n")
	parses := func(n int) bool {
		var probe yaml.Node
		return yaml.Unmarshal([]byte(strings.Join(lines[:n], "")), &probe) == nil
	}
	// lines[:good] parses (the empty prefix does), lines[:bad] does not.
	good, bad := 0, len(lines)
	for bad-good > 1 {
		mid := good + (bad-good)/2
		if parses(mid) {
			good = mid
		} else {
			bad = mid
		}
	}
	return &Error{File: file, Line: good + 1, Msg: "is not valid YAML: " + msg}
}

var lineRE = regexp.MustCompile(`^line (\d+): `)

// secondDocument reports a YAML document after the first (a "---" line
// and keys after it), or nil. yaml.Unmarshal reads the first document
// only: a file split at a "---", or two files concatenated, validated
// and ran without the keys that followed (its services among them), and
// no one was told. A "---" with nothing after it (a comment, "...") is
// an empty document and harmless.
func secondDocument(file string, data []byte) *Error {
	dec := yaml.NewDecoder(bytes.NewReader(data))
	var first yaml.Node
	if dec.Decode(&first) != nil {
		return nil // empty; the first document's errors are Unmarshal's
	}
	const fix = "spliced reads one document: remove the --- line and put its keys in the first document"
	for {
		var doc yaml.Node
		err := dec.Decode(&doc)
		switch {
		case errors.Is(err, io.EOF):
			return nil
		case err != nil:
			msg := strings.TrimPrefix(err.Error(), "yaml: ")
			line := 0
			if m := lineRE.FindStringSubmatch(msg); m != nil {
				line, _ = strconv.Atoi(m[1])
				msg = strings.TrimPrefix(msg, m[0])
			}
			return &Error{File: file, Line: line, Msg: "is in a second YAML document (after a --- line), which is not valid YAML either (" + msg + "); " + fix}
		case len(doc.Content) > 0 && doc.Content[0].Tag != "!!null":
			return &Error{File: file, Line: doc.Line, Msg: "starts a second YAML document (---); " + fix}
		}
	}
}

func decodeError(file string, idx *keyIndex, err error) *Error {
	var ve *valueError
	if errors.As(err, &ve) {
		return &Error{File: file, Line: ve.line, Key: idx.pathAt(ve.line, ve.column), Value: ve.value, Msg: ve.msg}
	}
	var te *yaml.TypeError
	if errors.As(err, &te) && len(te.Errors) > 0 {
		// "line 5: cannot unmarshal !!str `abc` into uint32"
		msg := te.Errors[0]
		line := 0
		if m := lineRE.FindStringSubmatch(msg); m != nil {
			line, _ = strconv.Atoi(m[1])
			msg = strings.TrimPrefix(msg, m[0])
		}
		value, want := "", ""
		if m := typeRE.FindStringSubmatch(msg); m != nil {
			value, want = m[1], m[2]
		}
		key := idx.pathAt(line, 0)
		switch {
		case strings.HasPrefix(want, "int"), strings.HasPrefix(want, "uint"):
			msg = "is not a whole number; use digits such as 100"
			// A whole number the key's type cannot hold fails the same
			// way: say so, with the range (yaml shortens the value in
			// its message, so the node's is read).
			if n := idx.nodes[key]; n != nil && n.Kind == yaml.ScalarNode {
				if lo, hi, ok := intRange(want); ok && isWholeNumber(n.Value) {
					msg = fmt.Sprintf("is out of range; use a whole number from %s to %s", lo, hi)
				}
			}
		case want == "bool":
			msg = "is not a boolean; use true or false"
		case want == "string":
			msg = "is not text; write a single value"
		case strings.HasPrefix(want, "[]"):
			msg = "is not a list; write it as a YAML list, e.g. [a, b]"
		}
		return &Error{File: file, Line: line, Key: key, Value: value, Msg: msg}
	}
	return &Error{File: file, Msg: err.Error()}
}

// intRange is the range of Go's integer type named want ("uint16",
// "int"), in decimal.
func intRange(want string) (lo, hi string, ok bool) {
	unsigned := strings.HasPrefix(want, "uint")
	bits, err := strconv.Atoi(strings.TrimPrefix(strings.TrimPrefix(want, "u"), "int"))
	if err != nil {
		bits = strconv.IntSize // int, uint
	}
	if bits <= 0 || bits > 64 {
		return "", "", false
	}
	if unsigned {
		return "0", new(big.Int).Sub(new(big.Int).Lsh(big.NewInt(1), uint(bits)), big.NewInt(1)).String(), true
	}
	hi = new(big.Int).Sub(new(big.Int).Lsh(big.NewInt(1), uint(bits-1)), big.NewInt(1)).String()
	return "-" + new(big.Int).Lsh(big.NewInt(1), uint(bits-1)).String(), hi, true
}

// isWholeNumber reports whether s is an integer as YAML writes one
// (decimal, 0x, 0o or 0b, a sign, underscores), of any size.
func isWholeNumber(s string) bool {
	_, ok := new(big.Int).SetString(strings.ReplaceAll(s, "_", ""), 0)
	return ok
}

var typeRE = regexp.MustCompile("cannot unmarshal !!\\w+ `?([^`]*)`? into (\\S+)")

// keyIndex maps key paths (services[0].listen) to the line of their value
// and back, so that errors found after decoding can name a line.
type keyIndex struct {
	lines map[string]int
	paths map[[2]int]string     // [line, column] of a value -> its key path
	nodes map[string]*yaml.Node // key path -> its value
	// visits counts the values walked, aliases expanded: aliases nested
	// along the configuration's types multiply, so a file of kilobytes
	// can name billions of values.
	visits int
}

// maxValues bounds the values a file may name, aliases expanded; a large
// configuration has thousands.
const maxValues = 200000

// pathAt returns the key path of the value at line and column; with column
// 0 (unknown), the deepest key whose value is on that line.
func (k *keyIndex) pathAt(line, column int) string {
	if p, ok := k.paths[[2]int{line, column}]; ok {
		return p
	}
	best, bestCol := "", 1<<30
	for at, p := range k.paths {
		if at[0] != line {
			continue
		}
		if len(p) > len(best) || (len(p) == len(best) && at[1] < bestCol) {
			best, bestCol = p, at[1]
		}
	}
	return best
}

// Line of a key path; 0 if the key is not in the file.
func (k *keyIndex) Line(path string) int {
	if k == nil {
		return 0
	}
	return k.lines[path]
}

func (k *keyIndex) record(path string, n *yaml.Node) {
	k.lines[path] = n.Line
	k.nodes[path] = n
	k.paths[[2]int{n.Line, n.Column}] = path
}

// walk checks every mapping key against the struct it decodes into,
// reporting unknown and duplicate keys, and records where each key is.
func (k *keyIndex) walk(n *yaml.Node, t reflect.Type, path string, report func(line int, key, msg string)) {
	for t.Kind() == reflect.Pointer {
		t = t.Elem()
	}
	if n.Kind == yaml.AliasNode {
		n = n.Alias
	}
	if k.visits++; k.visits > maxValues {
		if k.visits == maxValues+1 {
			report(n.Line, path, fmt.Sprintf("makes the file name more than %d values through aliases (*name); write the repeated parts out, or use fewer nested aliases", maxValues))
		}
		return
	}
	switch {
	case t.Kind() == reflect.Struct && n.Kind == yaml.MappingNode && !hasUnmarshaler(t):
		fields := yamlFields(t)
		seen := map[string]bool{}
		for i := 0; i+1 < len(n.Content); i += 2 {
			key, val := n.Content[i], n.Content[i+1]
			p := join(path, key.Value)
			ft, ok := fields[key.Value]
			if !ok {
				report(key.Line, p, unknownKeyMsg(key.Value, fields))
				continue
			}
			if seen[key.Value] {
				report(key.Line, p, "is set twice; keep one")
				continue
			}
			seen[key.Value] = true
			k.record(p, val)
			k.walk(val, ft, p, report)
		}
	case t.Kind() == reflect.Slice && n.Kind == yaml.SequenceNode:
		for i, item := range n.Content {
			p := fmt.Sprintf("%s[%d]", path, i)
			k.record(p, item)
			if item.Kind == yaml.ScalarNode && item.ShortTag() == "!!null" {
				// The decoder drops a null item (~, null, a bare "- "):
				// `sources: [~]` became an empty list, which matches
				// every address.
				report(item.Line, p, "is empty; write a value, or remove the item (an empty list means any)")
				continue
			}
			k.walk(item, t.Elem(), p, report)
		}
	}
}

func hasUnmarshaler(t reflect.Type) bool {
	return reflect.PointerTo(t).Implements(reflect.TypeFor[yaml.Unmarshaler]())
}

// yamlFields are the keys of a struct, with the registered proxy
// sections for a Service.
func yamlFields(t reflect.Type) map[string]reflect.Type {
	m := structFields(t)
	if t == reflect.TypeFor[Service]() {
		for key, st := range sectionTypes() {
			m[key] = st
		}
	}
	return m
}

func structFields(t reflect.Type) map[string]reflect.Type {
	m := map[string]reflect.Type{}
	for i := 0; i < t.NumField(); i++ {
		f := t.Field(i)
		name, _, _ := strings.Cut(f.Tag.Get("yaml"), ",")
		if name == "-" || !f.IsExported() {
			continue
		}
		if name == "" {
			name = strings.ToLower(f.Name)
		}
		m[name] = f.Type
	}
	return m
}

func unknownKeyMsg(key string, fields map[string]reflect.Type) string {
	names := make([]string, 0, len(fields))
	for n := range fields {
		names = append(names, n)
	}
	sort.Strings(names)
	msg := "is not a known key"
	if best := closest(key, names); best != "" {
		msg += fmt.Sprintf(" (did you mean %q?)", best)
	}
	return msg + "; valid keys here: " + strings.Join(names, ", ")
}

// closest returns the candidate within edit distance 2 of s, if any.
func closest(s string, candidates []string) string {
	best, bestD := "", 3
	for _, c := range candidates {
		if d := editDistance(s, c); d < bestD {
			best, bestD = c, d
		}
	}
	return best
}

func editDistance(a, b string) int {
	prev := make([]int, len(b)+1)
	cur := make([]int, len(b)+1)
	for j := range prev {
		prev[j] = j
	}
	for i := 1; i <= len(a); i++ {
		cur[0] = i
		for j := 1; j <= len(b); j++ {
			cost := 1
			if a[i-1] == b[j-1] {
				cost = 0
			}
			cur[j] = min(prev[j]+1, cur[j-1]+1, prev[j-1]+cost)
		}
		prev, cur = cur, prev
	}
	return prev[len(b)]
}

func join(path, key string) string {
	if path == "" {
		return key
	}
	return path + "." + key
}
