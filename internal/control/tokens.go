package control

import (
	"bufio"
	"bytes"
	"fmt"
	"os"
	"strings"
)

// Tokens maps bearer tokens to the node each speaks for. The file has one
// "TOKEN NODE" per line; blank lines and # comments are ignored.
type Tokens map[string]string

// LoadTokens reads a tokens file.
func LoadTokens(path string) (Tokens, error) {
	data, err := os.ReadFile(path)
	if err != nil {
		return nil, fmt.Errorf("tokens: %w", err)
	}
	return ParseTokens(path, data)
}

// ParseTokens reads tokens, naming the file and line of any problem.
func ParseTokens(name string, data []byte) (Tokens, error) {
	t := Tokens{}
	sc := bufio.NewScanner(bytes.NewReader(data))
	for line := 1; sc.Scan(); line++ {
		s := strings.TrimSpace(sc.Text())
		if s == "" || strings.HasPrefix(s, "#") {
			continue
		}
		f := strings.Fields(s)
		if len(f) != 2 {
			return nil, fmt.Errorf("%s:%d: want \"TOKEN NODE\", got %d fields", name, line, len(f))
		}
		if len(f[0]) < 16 {
			return nil, fmt.Errorf("%s:%d: token shorter than 16 characters", name, line)
		}
		if _, dup := t[f[0]]; dup {
			return nil, fmt.Errorf("%s:%d: token repeated", name, line)
		}
		t[f[0]] = f[1]
	}
	if err := sc.Err(); err != nil {
		return nil, fmt.Errorf("%s: %w", name, err)
	}
	return t, nil
}
