package hbone

import (
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"net/netip"
	"net/url"
	"strconv"
	"strings"
)

// ParseAuthority reads a CONNECT :authority in the form HBONE uses:
// "ip:port", IPv6 in brackets, no zone, port 1-65535 in plain decimal.
func ParseAuthority(s string) (netip.AddrPort, error) {
	host, port, ok := cutLastColon(s)
	if !ok {
		return netip.AddrPort{}, fmt.Errorf("authority %q: want ip:port", s)
	}
	var ip netip.Addr
	var err error
	if strings.HasPrefix(host, "[") {
		if !strings.HasSuffix(host, "]") {
			return netip.AddrPort{}, fmt.Errorf("authority %q: unclosed '['", s)
		}
		ip, err = netip.ParseAddr(host[1 : len(host)-1])
		if err == nil && !ip.Is6() {
			return netip.AddrPort{}, fmt.Errorf("authority %q: brackets hold an IPv4 address", s)
		}
	} else {
		ip, err = netip.ParseAddr(host)
		if err == nil && !ip.Is4() {
			return netip.AddrPort{}, fmt.Errorf("authority %q: IPv6 address must be in brackets", s)
		}
	}
	if err != nil {
		return netip.AddrPort{}, fmt.Errorf("authority %q: %w", s, err)
	}
	if ip.Zone() != "" {
		return netip.AddrPort{}, fmt.Errorf("authority %q: zoned address", s)
	}
	p, err := parsePort(port)
	if err != nil {
		return netip.AddrPort{}, fmt.Errorf("authority %q: %w", s, err)
	}
	return netip.AddrPortFrom(ip, p), nil
}

func cutLastColon(s string) (string, string, bool) {
	i := strings.LastIndexByte(s, ':')
	if i < 0 {
		return "", "", false
	}
	return s[:i], s[i+1:], true
}

func parsePort(s string) (uint16, error) {
	if s == "" || len(s) > 5 || (len(s) > 1 && s[0] == '0') {
		return 0, fmt.Errorf("port %q is not a plain decimal number", s)
	}
	for i := 0; i < len(s); i++ {
		if s[i] < '0' || s[i] > '9' {
			return 0, fmt.Errorf("port %q is not a plain decimal number", s)
		}
	}
	n, _ := strconv.Atoi(s)
	if n < 1 || n > 65535 {
		return 0, fmt.Errorf("port %d is out of range 1-65535", n)
	}
	return uint16(n), nil
}

// Forwarded is one element of an RFC 7239 Forwarded header. HBONE sends
// for="<client ip:port>" and, when known, host=<service hostname>.
type Forwarded struct {
	For   string
	By    string
	Host  string
	Proto string
}

// String formats the element, quoting values that need it.
func (f Forwarded) String() string {
	var parts []string
	add := func(k, v string) {
		if v != "" {
			parts = append(parts, k+"="+quoteIfNeeded(v))
		}
	}
	add("for", f.For)
	add("by", f.By)
	add("host", f.Host)
	add("proto", f.Proto)
	return strings.Join(parts, ";")
}

// maxForwarded caps how much of a peer's Forwarded header is parsed.
const maxForwarded = 8 << 10

// ParseForwarded reads a Forwarded header: comma-separated elements of
// semicolon-separated pairs, each value a token or a quoted string.
func ParseForwarded(s string) ([]Forwarded, error) {
	if len(s) > maxForwarded {
		return nil, fmt.Errorf("forwarded: longer than %d bytes", maxForwarded)
	}
	var out []Forwarded
	var cur Forwarded
	seen := map[string]bool{}
	i := 0
	skipOWS := func() {
		for i < len(s) && (s[i] == ' ' || s[i] == '\t') {
			i++
		}
	}
	for {
		skipOWS()
		start := i
		for i < len(s) && isTokenChar(s[i]) {
			i++
		}
		if start == i {
			return nil, fmt.Errorf("forwarded %q: expected a parameter name at byte %d", s, start)
		}
		key := strings.ToLower(s[start:i])
		if i >= len(s) || s[i] != '=' {
			return nil, fmt.Errorf("forwarded %q: parameter %q has no value", s, key)
		}
		i++
		var val string
		if i < len(s) && s[i] == '"' {
			v, n, err := readQuoted(s[i:])
			if err != nil {
				return nil, fmt.Errorf("forwarded %q: %w", s, err)
			}
			val, i = v, i+n
		} else {
			vs := i
			for i < len(s) && isTokenChar(s[i]) {
				i++
			}
			if vs == i {
				return nil, fmt.Errorf("forwarded %q: empty value for %q", s, key)
			}
			val = s[vs:i]
		}
		if seen[key] {
			return nil, fmt.Errorf("forwarded %q: parameter %q repeated in one element", s, key)
		}
		seen[key] = true
		switch key {
		case "for":
			cur.For = val
		case "by":
			cur.By = val
		case "host":
			cur.Host = val
		case "proto":
			cur.Proto = val
		}
		skipOWS()
		if i == len(s) {
			out = append(out, cur)
			return out, nil
		}
		switch s[i] {
		case ';':
			i++
		case ',':
			out = append(out, cur)
			cur = Forwarded{}
			clear(seen)
			i++
		default:
			return nil, fmt.Errorf("forwarded %q: unexpected %q at byte %d", s, s[i], i)
		}
	}
}

// ForwardedFor returns the client address HBONE put in a Forwarded header:
// the for= of the last element, as ip:port.
func ForwardedFor(header string) (netip.AddrPort, error) {
	els, err := ParseForwarded(header)
	if err != nil {
		return netip.AddrPort{}, err
	}
	v := els[len(els)-1].For
	if v == "" {
		return netip.AddrPort{}, errors.New("forwarded: no for= parameter")
	}
	return ParseAuthority(v)
}

func readQuoted(s string) (string, int, error) {
	var b strings.Builder
	for i := 1; i < len(s); i++ {
		switch c := s[i]; {
		case c == '"':
			return b.String(), i + 1, nil
		case c == '\\':
			i++
			if i == len(s) {
				return "", 0, errors.New("quoted string ends in a backslash")
			}
			// quoted-pair (RFC 9110): HTAB, SP, VCHAR or obs-text only.
			if e := s[i]; e < 0x20 && e != '\t' || e == 0x7f {
				return "", 0, fmt.Errorf("control character %#x escaped in quoted string", e)
			}
			b.WriteByte(s[i])
		case c < 0x20 && c != '\t', c == 0x7f:
			return "", 0, fmt.Errorf("control character %#x in quoted string", c)
		default:
			b.WriteByte(c)
		}
	}
	return "", 0, errors.New("unterminated quoted string")
}

func isTokenChar(c byte) bool {
	switch {
	case c >= 'a' && c <= 'z', c >= 'A' && c <= 'Z', c >= '0' && c <= '9':
		return true
	}
	return strings.IndexByte("!#$%&'*+-.^_`|~", c) >= 0
}

func quoteIfNeeded(v string) string {
	for i := 0; i < len(v); i++ {
		if !isTokenChar(v[i]) {
			var b strings.Builder
			b.WriteByte('"')
			for j := 0; j < len(v); j++ {
				if v[j] == '"' || v[j] == '\\' {
					b.WriteByte('\\')
				}
				b.WriteByte(v[j])
			}
			b.WriteByte('"')
			return b.String()
		}
	}
	return v
}

// Baggage is a W3C baggage header as HBONE uses it: the source workload's
// cluster, namespace, workload, service and locality, keyed by the
// OpenTelemetry names (k8s.namespace.name, service.name, ...). Order is kept.
type Baggage []BaggageMember

// BaggageMember is one key=value; properties after ';' are kept verbatim.
type BaggageMember struct {
	Key        string
	Value      string
	Properties string
}

// Limits from the W3C baggage specification.
const (
	maxBaggageBytes   = 8192
	maxBaggageMembers = 180
)

// Get returns the value of key, or "".
func (b Baggage) Get(key string) string {
	for _, m := range b {
		if m.Key == key {
			return m.Value
		}
	}
	return ""
}

// String formats the header, percent-encoding values; empty values are omitted.
func (b Baggage) String() string {
	var parts []string
	for _, m := range b {
		if m.Value == "" {
			continue
		}
		p := m.Key + "=" + escapeBaggageValue(m.Value)
		if m.Properties != "" {
			p += ";" + m.Properties
		}
		parts = append(parts, p)
	}
	return strings.Join(parts, ",")
}

// isBaggageOctet reports whether c may stand unescaped in a baggage value
// (W3C baggage-octet: printable ASCII but space, '"', ',', ';' and '\\').
func isBaggageOctet(c byte) bool {
	return c >= 0x21 && c <= 0x7e && c != '"' && c != ',' && c != ';' && c != '\\'
}

// escapeBaggageValue percent-encodes only what the baggage grammar needs:
// bytes outside baggage-octet, and '%' itself. url.PathEscape also encodes
// '!', '(', '[' and the like, so a header that parsed within the 8192-byte
// limit could format to three times its length and be refused when read
// back (FuzzParseBaggage found it); this never makes a parsed value longer.
func escapeBaggageValue(v string) string {
	const hex = "0123456789ABCDEF"
	var b strings.Builder
	for i := 0; i < len(v); i++ {
		c := v[i]
		if isBaggageOctet(c) && c != '%' {
			b.WriteByte(c)
			continue
		}
		b.WriteByte('%')
		b.WriteByte(hex[c>>4])
		b.WriteByte(hex[c&0xf])
	}
	return b.String()
}

// ParseBaggage reads a baggage header strictly.
func ParseBaggage(s string) (Baggage, error) {
	if len(s) > maxBaggageBytes {
		return nil, fmt.Errorf("baggage: longer than %d bytes", maxBaggageBytes)
	}
	if strings.TrimSpace(s) == "" {
		return nil, nil
	}
	var out Baggage
	for _, raw := range strings.Split(s, ",") {
		if len(out) == maxBaggageMembers {
			return nil, fmt.Errorf("baggage: more than %d members", maxBaggageMembers)
		}
		member, props, _ := strings.Cut(raw, ";")
		k, v, ok := strings.Cut(member, "=")
		k, v = strings.Trim(k, " \t"), strings.Trim(v, " \t")
		if !ok || k == "" {
			return nil, fmt.Errorf("baggage: member %q is not key=value", strings.TrimSpace(raw))
		}
		for i := 0; i < len(k); i++ {
			if !isTokenChar(k[i]) {
				return nil, fmt.Errorf("baggage: key %q has character %q", k, k[i])
			}
		}
		for i := 0; i < len(v); i++ {
			if c := v[i]; !isBaggageOctet(c) {
				return nil, fmt.Errorf("baggage: value of %q has character %q", k, c)
			}
		}
		dv, err := url.PathUnescape(v)
		if err != nil {
			return nil, fmt.Errorf("baggage: value of %q: %w", k, err)
		}
		out = append(out, BaggageMember{Key: k, Value: dv, Properties: strings.TrimSpace(props)})
	}
	return out, nil
}

// NewTraceparent makes a random W3C traceparent, "00-<trace id>-<span id>-00",
// as HBONE sends one per connection.
func NewTraceparent() string {
	var b [24]byte
	_, _ = rand.Read(b[:]) // crypto/rand.Read never fails
	return "00-" + hex.EncodeToString(b[:16]) + "-" + hex.EncodeToString(b[16:]) + "-00"
}

// Traceparent is a parsed W3C traceparent header.
type Traceparent struct {
	Version byte
	TraceID [16]byte
	SpanID  [8]byte
	Flags   byte
}

// ParseTraceparent reads a version-00 traceparent strictly (lower-case hex,
// non-zero ids). Later versions are accepted if they start the same way.
func ParseTraceparent(s string) (Traceparent, error) {
	var t Traceparent
	if len(s) < 55 || (len(s) > 55 && s[55] != '-') {
		return t, fmt.Errorf("traceparent %q: want 00-<32 hex>-<16 hex>-<2 hex>", s)
	}
	if s[2] != '-' || s[35] != '-' || s[52] != '-' {
		return t, fmt.Errorf("traceparent %q: misplaced '-'", s)
	}
	fields := []struct {
		dst []byte
		src string
	}{{[]byte{0}, s[0:2]}, {t.TraceID[:], s[3:35]}, {t.SpanID[:], s[36:52]}, {[]byte{0}, s[53:55]}}
	for i, f := range fields {
		for j := 0; j < len(f.src); j++ {
			if c := f.src[j]; !(c >= '0' && c <= '9' || c >= 'a' && c <= 'f') {
				return t, fmt.Errorf("traceparent %q: %q is not lower-case hex", s, c)
			}
		}
		if _, err := hex.Decode(f.dst, []byte(f.src)); err != nil {
			return t, fmt.Errorf("traceparent %q: %w", s, err)
		}
		switch i {
		case 0:
			t.Version = f.dst[0]
		case 3:
			t.Flags = f.dst[0]
		}
	}
	if t.Version == 0xff {
		return t, fmt.Errorf("traceparent %q: version ff is invalid", s)
	}
	if t.Version == 0 && len(s) != 55 {
		return t, fmt.Errorf("traceparent %q: version 00 must be 55 bytes", s)
	}
	if t.TraceID == [16]byte{} || t.SpanID == [8]byte{} {
		return t, fmt.Errorf("traceparent %q: all-zero id", s)
	}
	return t, nil
}
