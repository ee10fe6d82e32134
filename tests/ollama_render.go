// Renders Ollama Modelfile templates the way Ollama's template.Execute does for chats (text/template
// with missingkey=zero; messages collated, system messages joined into .System), without Ollama.
// stdin: [{"template": "...", "chats": [[{"Role": "user", "Content": "..."}]]}]; stdout: [["rendered"]].
package main

import (
	"encoding/json"
	"os"
	"strings"
	"text/template"
)

type message struct {
	Role    string
	Content string
}

type job struct {
	Template string
	Chats    [][]message
}

// collate merges consecutive messages of one role and gathers the system messages, as Ollama does.
func collate(msgs []message) (string, []*message) {
	var system []string
	var out []*message
	for i := range msgs {
		if msgs[i].Role == "system" {
			system = append(system, msgs[i].Content)
		}
		if len(out) > 0 && out[len(out)-1].Role == msgs[i].Role && msgs[i].Role != "tool" {
			out[len(out)-1].Content += "\n\n" + msgs[i].Content
		} else {
			m := msgs[i]
			out = append(out, &m)
		}
	}
	return strings.Join(system, "\n\n"), out
}

func main() {
	var jobs []job
	if err := json.NewDecoder(os.Stdin).Decode(&jobs); err != nil {
		panic(err)
	}
	var results [][]string
	for _, j := range jobs {
		tmpl := template.Must(template.New("").Option("missingkey=zero").Parse(j.Template))
		var rendered []string
		for _, chat := range j.Chats {
			system, msgs := collate(chat)
			var b strings.Builder
			data := map[string]any{"System": system, "Messages": msgs, "Tools": nil, "Response": "",
				"Think": false, "ThinkLevel": "", "IsThinkSet": false}
			if err := tmpl.Execute(&b, data); err != nil {
				panic(err)
			}
			rendered = append(rendered, b.String())
		}
		results = append(results, rendered)
	}
	if err := json.NewEncoder(os.Stdout).Encode(results); err != nil {
		panic(err)
	}
}
