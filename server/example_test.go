package server_test

import (
	"context"
	"fmt"
	"net/http"
	"strings"

	"github.com/fabricrt/fabric/fabric"
	"github.com/fabricrt/fabric/server"
	"github.com/fabricrt/fabric/wsedge/wsclient"
)

// Fabric inside an application: a custom authentication hook, one RPC
// handler, and a real WebSocket client calling it. The memory backend
// needs no NATS (one process only); leave Backend empty for embedded NATS
// with JetStream under Embed.DataDir.
func Example() {
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()

	srv, err := server.New(ctx, server.Options{
		Backend: server.BackendMemory,
		HTTP:    server.HTTPOptions{Listen: "127.0.0.1:0"},
		Hooks: fabric.Hooks{
			// Connect authenticates every connection; what it returns is
			// the connection's user data.
			Connect: func(r *http.Request) (any, error) {
				user, ok := strings.CutPrefix(r.Header.Get("Authorization"), "Bearer ")
				if !ok || user == "" {
					return nil, fabric.ErrUnauthorized
				}
				return user, nil
			},
		},
	})
	if err != nil {
		fmt.Println(err)
		return
	}
	srv.Node().HandleRPC("app/greet", func(_ context.Context, call *fabric.Call) (any, error) {
		return "hello, " + call.Client.UserData().(string), nil
	})
	done := make(chan error, 1)
	go func() { done <- srv.Run(ctx) }()

	url := "ws://" + srv.Addr() + "/ws"
	if _, err := wsclient.Dial(ctx, url, wsclient.Options{}); err != nil && strings.Contains(err.Error(), "401") {
		fmt.Println("without a token: 401")
	}
	c, err := wsclient.Dial(ctx, url, wsclient.Options{Header: http.Header{"Authorization": {"Bearer ada"}}})
	if err != nil {
		fmt.Println(err)
		return
	}
	res, err := c.Call(ctx, "app/greet")
	fmt.Println(string(res), err)
	c.Close()

	cancel() // Run drains and returns
	fmt.Println("stopped:", <-done)
	// Output:
	// without a token: 401
	// "hello, ada" <nil>
	// stopped: <nil>
}
