// Renders Ollama chat templates as Ollama does: Go's text/template over .Messages (Role, Content)
// and .System. Reads a JSON list of {"template", "messages", "system"} on stdin and writes the
// JSON list of renderings (or "ERROR: ...") on stdout. Used by tests/test_ollama.py.
package main

import (
	"encoding/json"
	"os"
	"strings"
	"text/template"
)

type Message struct {
	Role    string `json:"role"`
	Content string `json:"content"`
}

type Case struct {
	Template string    `json:"template"`
	Messages []Message `json:"messages"`
	System   string    `json:"system"`
}

func main() {
	var cases []Case
	if err := json.NewDecoder(os.Stdin).Decode(&cases); err != nil {
		panic(err)
	}
	out := make([]string, 0, len(cases))
	for _, c := range cases {
		t, err := template.New("").Parse(c.Template)
		if err != nil {
			out = append(out, "ERROR: "+err.Error())
			continue
		}
		var b strings.Builder
		data := map[string]any{"Messages": c.Messages, "System": c.System, "Prompt": "", "Response": ""}
		if err := t.Execute(&b, data); err != nil {
			out = append(out, "ERROR: "+err.Error())
			continue
		}
		out = append(out, b.String())
	}
	json.NewEncoder(os.Stdout).Encode(out)
}
