package config

import (
	"bytes"
	"errors"
	"fmt"
	"io"
	"math"
	"reflect"
	"slices"
	"strconv"
	"strings"

	"go.yaml.in/yaml/v3"
)

// Error is a problem in a config file, placed at its line and field.
type Error struct {
	File   string
	Line   int
	Column int
	Path   string // e.g. workloads[1].workloadIps[0]
	Msg    string
}

func (e *Error) Error() string {
	where := e.File
	if e.Line > 0 {
		where = fmt.Sprintf("%s:%d:%d", e.File, e.Line, e.Column)
	}
	if e.Path == "" {
		return where + ": " + e.Msg
	}
	return where + ": " + e.Path + ": " + e.Msg
}

// nodeDecoder is implemented by types that read themselves from a node
// (addresses, string matches): they see tags and report what is wrong.
type nodeDecoder interface {
	decodeNode(n *yaml.Node) error
}

// decoder turns a YAML node tree into Go values strictly: unknown or
// repeated keys, wrong kinds and out-of-range numbers are errors that carry
// the line and the path of the field.
type decoder struct {
	file string
}

func (d *decoder) errorf(n *yaml.Node, path, format string, args ...any) *Error {
	return &Error{File: d.file, Line: n.Line, Column: n.Column, Path: path, Msg: fmt.Sprintf(format, args...)}
}

func (d *decoder) decode(n *yaml.Node, v reflect.Value, path string) error {
	if n.Kind == yaml.AliasNode {
		n = n.Alias
	}
	if v.CanAddr() {
		if nd, ok := v.Addr().Interface().(nodeDecoder); ok {
			if err := nd.decodeNode(n); err != nil {
				return d.errorf(n, path, "%v", err)
			}
			return nil
		}
	}
	if isNull(n) {
		v.SetZero()
		return nil
	}
	switch v.Kind() {
	case reflect.Pointer:
		if v.IsNil() {
			v.Set(reflect.New(v.Type().Elem()))
		}
		return d.decode(n, v.Elem(), path)
	case reflect.Struct:
		return d.decodeStruct(n, v, path)
	case reflect.Slice:
		if n.Kind != yaml.SequenceNode {
			return d.errorf(n, path, "want a list, got %s", describe(n))
		}
		s := reflect.MakeSlice(v.Type(), len(n.Content), len(n.Content))
		for i, item := range n.Content {
			if err := d.decode(item, s.Index(i), fmt.Sprintf("%s[%d]", path, i)); err != nil {
				return err
			}
		}
		v.Set(s)
		return nil
	case reflect.Map:
		if n.Kind != yaml.MappingNode {
			return d.errorf(n, path, "want a map, got %s", describe(n))
		}
		m := reflect.MakeMapWithSize(v.Type(), len(n.Content)/2)
		for i := 0; i < len(n.Content); i += 2 {
			kn, vn := n.Content[i], n.Content[i+1]
			k := reflect.New(v.Type().Key()).Elem()
			if err := d.decode(kn, k, path); err != nil {
				return err
			}
			if m.MapIndex(k).IsValid() {
				return d.errorf(kn, path, "key %q repeated", kn.Value)
			}
			e := reflect.New(v.Type().Elem()).Elem()
			if err := d.decode(vn, e, path+"."+kn.Value); err != nil {
				return err
			}
			m.SetMapIndex(k, e)
		}
		v.Set(m)
		return nil
	}
	if n.Kind != yaml.ScalarNode {
		return d.errorf(n, path, "want a single value, got %s", describe(n))
	}
	switch v.Kind() {
	case reflect.String:
		v.SetString(n.Value)
	case reflect.Bool:
		b, err := strconv.ParseBool(n.Value)
		if err != nil || n.Tag != "!!bool" {
			return d.errorf(n, path, "%q is not true or false", n.Value)
		}
		v.SetBool(b)
	case reflect.Uint8, reflect.Uint16, reflect.Uint32, reflect.Uint64, reflect.Uint:
		u, err := strconv.ParseUint(n.Value, 10, 64)
		if err != nil || v.OverflowUint(u) {
			return d.errorf(n, path, "%q is not a whole number from 0 to %d", n.Value, maxUint(v))
		}
		v.SetUint(u)
	case reflect.Int, reflect.Int32, reflect.Int64:
		i, err := strconv.ParseInt(n.Value, 10, 64)
		if err != nil || v.OverflowInt(i) {
			return d.errorf(n, path, "%q is not a whole number", n.Value)
		}
		v.SetInt(i)
	default:
		return d.errorf(n, path, "cannot read into %s", v.Type())
	}
	return nil
}

func (d *decoder) decodeStruct(n *yaml.Node, v reflect.Value, path string) error {
	if n.Kind != yaml.MappingNode {
		return d.errorf(n, path, "want a map of fields, got %s", describe(n))
	}
	t := v.Type()
	fields := map[string]int{}
	var names []string
	for i := 0; i < t.NumField(); i++ {
		name, _, _ := strings.Cut(t.Field(i).Tag.Get("yaml"), ",")
		if name == "" || name == "-" {
			continue
		}
		fields[name] = i
		names = append(names, name)
	}
	seen := map[string]bool{}
	for i := 0; i < len(n.Content); i += 2 {
		kn, vn := n.Content[i], n.Content[i+1]
		fp := kn.Value
		if path != "" {
			fp = path + "." + kn.Value
		}
		idx, ok := fields[kn.Value]
		if !ok {
			slices.Sort(names)
			return d.errorf(kn, fp, "unknown field (known fields: %s)", strings.Join(names, ", "))
		}
		if seen[kn.Value] {
			return d.errorf(kn, fp, "field repeated")
		}
		seen[kn.Value] = true
		if err := d.decode(vn, v.Field(idx), fp); err != nil {
			return err
		}
	}
	return nil
}

func isNull(n *yaml.Node) bool {
	return n.Kind == yaml.ScalarNode && n.Tag == "!!null"
}

func describe(n *yaml.Node) string {
	switch n.Kind {
	case yaml.MappingNode:
		return "a map"
	case yaml.SequenceNode:
		return "a list"
	case yaml.ScalarNode:
		return strconv.Quote(n.Value)
	}
	return "nothing"
}

func maxUint(v reflect.Value) uint64 {
	switch v.Kind() {
	case reflect.Uint8:
		return math.MaxUint8
	case reflect.Uint16:
		return math.MaxUint16
	case reflect.Uint32:
		return math.MaxUint32
	}
	return math.MaxUint64
}

// Decode reads one YAML document into v (a pointer to a struct with yaml
// tags) strictly: unknown or repeated fields and wrong kinds are errors
// that name the file, line and field. Other file formats of Ambit (the lab
// topology) use it so every file is checked the same way.
func Decode(name string, data []byte, v any) error {
	doc, err := parseDocument(name, data)
	if err != nil || doc == nil {
		return err
	}
	d := &decoder{file: name}
	return d.decode(doc, reflect.ValueOf(v).Elem(), "")
}

// parseDocument returns the single document's root node, or nil for an empty file.
func parseDocument(name string, data []byte) (*yaml.Node, error) {
	var root yaml.Node
	dec := yaml.NewDecoder(bytes.NewReader(data))
	if err := dec.Decode(&root); err != nil {
		if errors.Is(err, io.EOF) {
			return nil, nil
		}
		return nil, &Error{File: name, Msg: strings.TrimPrefix(err.Error(), "yaml: ")}
	}
	var extra yaml.Node
	if dec.Decode(&extra) == nil {
		return nil, &Error{File: name, Line: extra.Line, Column: extra.Column, Msg: "more than one YAML document"}
	}
	doc := &root
	if doc.Kind == yaml.DocumentNode && len(doc.Content) == 1 {
		doc = doc.Content[0]
	}
	return doc, nil
}
