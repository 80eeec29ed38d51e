package pgbridge_test

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"math/rand/v2"
	"net"
	"net/url"
	"os"
	"os/exec"
	"os/user"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

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
	pgURL, stop, pgError = findPostgres()
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
	if pgURL == "" {
		if os.Getenv("CI") == "true" {
			t.Fatalf("CI=true but no PostgreSQL: %v", pgError)
		}
		t.Skipf("no PostgreSQL: %v", pgError)
	}
	return pgURL
}

// findPostgres returns a URL of a database that answers, and a function
// stopping the server if it started one.
func findPostgres() (string, func(), error) {
	var tried []string
	candidates := []string{os.Getenv("FABRIC_TEST_PG_URL"),
		"postgres://127.0.0.1:5432/test?sslmode=disable",
		"postgres://postgres@127.0.0.1:5432/test?sslmode=disable"}
	for _, u := range candidates {
		if u == "" {
			continue
		}
		if err := ping(u, 3*time.Second); err != nil {
			tried = append(tried, fmt.Sprintf("%s: %v", redact(u), err))
			continue
		}
		return u, nil, nil
	}
	u, stop, err := startPostgres()
	if err != nil {
		tried = append(tried, "throwaway server: "+err.Error())
		return "", nil, errors.New(strings.Join(tried, "; "))
	}
	return u, stop, nil
}

func redact(u string) string {
	p, err := url.Parse(u)
	if err != nil {
		return "(unparsable URL)"
	}
	return p.Redacted()
}

func ping(u string, timeout time.Duration) error {
	ctx, cancel := context.WithTimeout(context.Background(), timeout)
	defer cancel()
	c, err := pgx.Connect(ctx, u)
	if err != nil {
		return err
	}
	defer c.Close(context.Background())
	return c.Ping(ctx)
}

// startPostgres runs initdb and postgres from the machine's binaries in a
// temporary directory on a free port (as the postgres user when running as
// root, which initdb refuses), and creates the database test.
func startPostgres() (string, func(), error) {
	bins, _ := filepath.Glob("/usr/lib/postgresql/*/bin/initdb")
	if len(bins) == 0 {
		return "", nil, errors.New("no /usr/lib/postgresql/*/bin/initdb")
	}
	sort.Slice(bins, func(i, j int) bool { return pgVersion(bins[i]) > pgVersion(bins[j]) })
	bin := filepath.Dir(bins[0])
	dir, err := os.MkdirTemp("", "pgbridge-pg-")
	if err != nil {
		return "", nil, err
	}
	var cred *syscall.Credential
	if os.Geteuid() == 0 {
		u, err := user.Lookup("postgres")
		if err != nil {
			os.RemoveAll(dir)
			return "", nil, fmt.Errorf("running as root and no postgres user: %w", err)
		}
		uid, _ := strconv.Atoi(u.Uid)
		gid, _ := strconv.Atoi(u.Gid)
		cred = &syscall.Credential{Uid: uint32(uid), Gid: uint32(gid)}
		if err := os.Chown(dir, uid, gid); err != nil {
			os.RemoveAll(dir)
			return "", nil, err
		}
	}
	cmd := func(name string, args ...string) *exec.Cmd {
		c := exec.Command(filepath.Join(bin, name), args...)
		c.SysProcAttr = &syscall.SysProcAttr{Credential: cred, Setpgid: true}
		return c
	}
	data := filepath.Join(dir, "data")
	if out, err := cmd("initdb", "-D", data, "-U", "postgres", "-A", "trust", "--no-sync").CombinedOutput(); err != nil {
		os.RemoveAll(dir)
		return "", nil, fmt.Errorf("initdb: %v: %s", err, out)
	}
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		os.RemoveAll(dir)
		return "", nil, err
	}
	port := l.Addr().(*net.TCPAddr).Port
	l.Close()
	srv := cmd("postgres", "-D", data, "-p", strconv.Itoa(port), "-k", dir,
		"-c", "listen_addresses=127.0.0.1", "-c", "fsync=off", "-c", "max_connections=200")
	if err := srv.Start(); err != nil {
		os.RemoveAll(dir)
		return "", nil, fmt.Errorf("postgres: %w", err)
	}
	stop := func() {
		_ = srv.Process.Signal(syscall.SIGINT) // fast shutdown
		done := make(chan struct{})
		go func() { _ = srv.Wait(); close(done) }()
		select {
		case <-done:
		case <-time.After(10 * time.Second):
			_ = srv.Process.Kill()
			<-done
		}
		os.RemoveAll(dir)
	}
	base := fmt.Sprintf("postgres://postgres@127.0.0.1:%d/", port)
	deadline := time.Now().Add(30 * time.Second)
	for ping(base+"postgres?sslmode=disable", time.Second) != nil {
		if time.Now().After(deadline) {
			stop()
			return "", nil, errors.New("throwaway postgres did not start")
		}
		time.Sleep(50 * time.Millisecond)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	c, err := pgx.Connect(ctx, base+"postgres?sslmode=disable")
	if err == nil {
		_, err = c.Exec(ctx, "CREATE DATABASE test")
		c.Close(ctx)
	}
	if err != nil {
		stop()
		return "", nil, fmt.Errorf("create database: %w", err)
	}
	return base + "test?sslmode=disable", stop, nil
}

func pgVersion(initdb string) int {
	v, _ := strconv.Atoi(filepath.Base(filepath.Dir(filepath.Dir(initdb))))
	return v
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
