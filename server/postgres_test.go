package server

import (
	"context"
	"os"
	"strings"
	"testing"
	"time"

	"github.com/fabricrt/fabric/fabric/fabrictest"
	"github.com/fabricrt/fabric/wsedge/wsclient"
	"github.com/jackc/pgx/v5"
)

var (
	pgURL  string
	pgErr  error
	pgStop func()
)

func TestMain(m *testing.M) {
	code := m.Run()
	if pgStop != nil {
		pgStop()
	}
	os.Exit(code)
}

// needPG finds (or starts) Postgres once for the package.
func needPG(t *testing.T) string {
	t.Helper()
	if pgURL == "" && pgErr == nil {
		pgURL, pgStop, pgErr = fabrictest.FindPostgres()
	}
	return fabrictest.NeedPostgres(t, pgURL, pgErr)
}

// TestPostgresBridge: Options.Postgres wires the bridge (flags --pg-url,
// --pg-notify): a NOTIFY on the channel reaches a WebSocket client, and
// /readyz reports the bridge.
func TestPostgresBridge(t *testing.T) {
	u := needPG(t)
	channel := "srv_" + strings.ToLower(fabrictest.TestPrefix(t))
	for _, backend := range []string{BackendMemory, BackendNATS} {
		t.Run(backend, func(t *testing.T) {
			o := testOptions(t)
			o.Backend = backend
			o.HTTP.AllowedOrigins = []string{"*"}
			o.Postgres = PostgresOptions{URL: u, Notify: []string{channel + backend}}
			s := startServer(t, o)
			ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
			defer cancel()
			c := dial(t, ctx, s, wsclient.Options{})
			if err := c.Subscribe(ctx, "todos"); err != nil {
				t.Fatal(err)
			}
			conn, err := pgx.Connect(ctx, u)
			if err != nil {
				t.Fatal(err)
			}
			defer conn.Close(context.Background())
			payload := `{"table":"todos","op":"INSERT","row":{"id":1,"title":"milk"}}`
			got := make(chan wsclient.Envelope, 1)
			go func() {
				e, err := c.Next(ctx)
				if err == nil {
					got <- e
				}
			}()
			// The bridge takes its lease and LISTENs in the background:
			// notify until the client hears.
			tick := time.NewTicker(100 * time.Millisecond)
			defer tick.Stop()
			for {
				if _, err := conn.Exec(ctx, "SELECT pg_notify($1, $2)", channel+backend, payload); err != nil {
					t.Fatal(err)
				}
				select {
				case e := <-got:
					if e.Topic != "todos" || e.Event != "created" || string(e.Data) != `{"id":1,"title":"milk"}` {
						t.Fatalf("got %+v", e)
					}
					fabrictest.WaitFor(t, 20*time.Second, "/readyz to report the bridge ok", func() bool {
						status, body := get(t, "http://"+s.Addr()+"/readyz")
						return status == 200 && strings.Contains(body, `"postgres":"ok"`)
					})
					return
				case <-tick.C:
				case <-ctx.Done():
					t.Fatal("the notification never reached the client")
				}
			}
		})
	}
}
