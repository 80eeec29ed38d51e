package pgbridge_test

import (
	"bufio"
	"context"
	"fmt"
	"math/rand/v2"
	"net/url"
	"os"
	"strings"
	"testing"
	"time"

	"github.com/fabricrt/fabric/fabric/fabrictest"
	"github.com/jackc/pgx/v5"
)

// The tests run against a real PostgreSQL: FABRIC_TEST_PG_URL, else the
// machine's server on 127.0.0.1:5432 (database test, trust auth), else a
// throwaway server started here from /usr/lib/postgresql/*/bin (initdb in a
// temporary directory, a free port). Under CI=true a missing Postgres
// fails every test; elsewhere they skip. Each test works in its own schema
// (and its own channel names: NOTIFY channels are database-wide).

var (
	pgURL   string // the database the tests use; "" when there is none
	pgError error  // why there is none
)

func TestMain(m *testing.M) {
	if os.Getenv(childEnv) != "" {
		os.Exit(runChild())
	}
	var stop func()
	pgURL, stop, pgError = fabrictest.FindPostgres()
	code := m.Run()
	if stop != nil {
		stop()
	}
	os.Exit(code)
}

// needPG returns the database URL, failing under CI=true and skipping
// elsewhere when there is no Postgres.
func needPG(t testing.TB) string {
	t.Helper()
	return fabrictest.NeedPostgres(t, pgURL, pgError)
}

// pgConn opens a connection to u, closed at cleanup.
func pgConn(t testing.TB, u string) *pgx.Conn {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	c, err := pgx.Connect(ctx, u)
	if err != nil {
		t.Fatalf("connect to Postgres: %v", err)
	}
	t.Cleanup(func() { c.Close(context.Background()) })
	return c
}

// schema makes a schema for this test, dropped at cleanup, and returns a
// URL whose connections work in it (search_path).
func schema(t testing.TB) string {
	t.Helper()
	base := needPG(t)
	name := fmt.Sprintf("pgb_%08x", rand.Uint32())
	admin := pgConn(t, base)
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if _, err := admin.Exec(ctx, "CREATE SCHEMA "+name); err != nil {
		t.Fatalf("create schema: %v", err)
	}
	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		if c, err := pgx.Connect(ctx, base); err == nil {
			_, _ = c.Exec(ctx, "DROP SCHEMA "+name+" CASCADE")
			c.Close(ctx)
		}
	})
	return withParam(base, "search_path", name)
}

func withParam(u, k, v string) string {
	p, err := url.Parse(u)
	if err != nil {
		panic(err)
	}
	q := p.Query()
	q.Set(k, v)
	p.RawQuery = q.Encode()
	return p.String()
}

// channelName returns a NOTIFY channel unique to this call.
func channelName(prefix string) string { return fmt.Sprintf("%s_%08x", prefix, rand.Uint32()) }

// terminate ends every backend whose application_name is name and returns
// how many it ended.
func terminate(t testing.TB, c *pgx.Conn, name string) int {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	var n int
	err := c.QueryRow(ctx, `SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity
		WHERE application_name = $1 AND pid <> pg_backend_pid()`, name).Scan(&n)
	if err != nil {
		t.Fatalf("pg_terminate_backend: %v", err)
	}
	return n
}

// backends returns how many connections have application_name name.
func backends(t testing.TB, c *pgx.Conn, name string) int {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	var n int
	if err := c.QueryRow(ctx, "SELECT count(*) FROM pg_stat_activity WHERE application_name = $1", name).Scan(&n); err != nil {
		t.Fatalf("pg_stat_activity: %v", err)
	}
	return n
}

// notify sends pg_notify(channel, payload) on c.
func notify(t testing.TB, c *pgx.Conn, channel, payload string) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if _, err := c.Exec(ctx, "SELECT pg_notify($1, $2)", channel, payload); err != nil {
		t.Fatalf("pg_notify: %v", err)
	}
}

// run runs sql on c.
func run(t testing.TB, c *pgx.Conn, sql string, args ...any) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	if _, err := c.Exec(ctx, sql, args...); err != nil {
		t.Fatalf("exec %q: %v", clipSQL(sql), err)
	}
}

func clipSQL(s string) string {
	if len(s) > 80 {
		return s[:80] + "…"
	}
	return s
}

// childReady reads the child's first line ("READY <holder>").
func childReady(t testing.TB, r *bufio.Reader) string {
	t.Helper()
	line, err := r.ReadString('\n')
	if err != nil {
		t.Fatalf("child: %v (%q)", err, line)
	}
	f := strings.Fields(line)
	if len(f) != 2 || f[0] != "READY" {
		t.Fatalf("child said %q", line)
	}
	return f[1]
}
