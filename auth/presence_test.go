package auth_test

import (
	"context"
	"encoding/json"
	"net/http"
	"net/url"
	"strings"
	"testing"
	"time"

	"github.com/fabricrt/fabric/auth"
	"github.com/fabricrt/fabric/fabric"
	"github.com/fabricrt/fabric/fabric/fabrictest"
	"github.com/fabricrt/fabric/wsedge/wsclient"
)

// TestPresenceByUser: on embedded NATS, with the Verifier's hooks and its
// presence Key and Select, a topic's presence list has one member per user
// (two tabs of Ada are one member) with the token's info as its data, and
// an anonymous connection is a member under an opaque random key that
// shows neither the instance nor the connection.
func TestPresenceByUser(t *testing.T) {
	v := newVerifier(t, auth.Options{Secrets: []string{secret}, AllowAnonymous: true,
		Anonymous: auth.Permissions{Subscribe: []string{"room:*"}}})
	inst := fabrictest.NewInstance(t, fabrictest.Options{Node: fabric.Config{Hooks: v.Hooks(), BeforeExecute: v.BeforeExecute}})
	pres := fabrictest.StartPresence(t, inst, fabric.PresenceOptions{
		Topics: fabric.MatchTopics([]string{"room:*"}),
		Key:    v.PresenceKey,
		Select: v.PresenceSelect,
	})
	token := func(sub, name string) string {
		return hs(t, claims(sub, time.Hour, map[string]any{"subscribe": []string{"room:*"}, "info": map[string]any{"name": name}}))
	}
	dial := func(tok string) *wsclient.Client {
		u := inst.WSURL
		if tok != "" {
			u += "?token=" + url.QueryEscape(tok)
		}
		return inst.DialURL(u, wsclient.Options{Header: http.Header{}})
	}
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	ada := token("ada", "Ada")
	for _, c := range []*wsclient.Client{dial(ada), dial(ada), dial(token("bob", "Bob")), dial("")} {
		if err := c.Subscribe(ctx, "room:1"); err != nil {
			t.Fatal(err)
		}
	}
	fabrictest.WaitFor(t, 15*time.Second, "three members", func() bool {
		n, _ := pres.Count(ctx, "room:1")
		return n == 3
	})

	// A client's view: the list event of __presence:room:1.
	watcher := dial(ada)
	if err := watcher.Subscribe(ctx, fabric.PresenceTopicPrefix+"room:1"); err != nil {
		t.Fatal(err)
	}
	var list []fabric.PresenceMember
	for list == nil {
		env, err := watcher.Next(ctx)
		if err != nil {
			t.Fatal(err)
		}
		if env.Topic == fabric.PresenceTopicPrefix+"room:1" && env.Event == "list" {
			if err := json.Unmarshal(env.Data, &list); err != nil {
				t.Fatal(err)
			}
		}
	}
	got := map[string]string{}
	anon := ""
	for _, m := range list {
		if strings.HasPrefix(m.Key, "anon:") {
			anon = m.Key
		}
		got[m.Key] = string(m.Data)
	}
	if len(list) != 3 || got["ada"] != `{"name":"Ada"}` || got["bob"] != `{"name":"Bob"}` || anon == "" || got[anon] != "null" {
		t.Fatalf("presence list %s", got)
	}
	if strings.Contains(anon, inst.Node.ID()) || len(anon) < len("anon:")+16 {
		t.Fatalf("anonymous key %q shows the instance or is too short", anon)
	}

	// A user without the topic in its token cannot see its presence.
	denied(t, "presence of room:1 without permission", dial(hs(t, claims("eve", time.Hour, nil))).Subscribe(ctx, fabric.PresenceTopicPrefix+"room:1"))
}
