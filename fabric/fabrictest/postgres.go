package fabrictest

import (
	"context"
	"errors"
	"fmt"
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
	"time"

	"github.com/jackc/pgx/v5"
)

// Tests that need PostgreSQL call FindPostgres once (in TestMain): it
// returns FABRIC_TEST_PG_URL, else the machine's server on 127.0.0.1:5432
// (database test, trust auth), else a throwaway server started from
// /usr/lib/postgresql/*/bin (initdb in a temporary directory, a free port),
// with a function that stops it. Under CI=true a missing Postgres must fail
// the tests (see NeedPostgres).

// FindPostgres returns a URL of a database that answers, and a function
// stopping the server if it started one.
func FindPostgres() (string, func(), error) {
	var tried []string
	candidates := []string{os.Getenv("FABRIC_TEST_PG_URL"),
		"postgres://127.0.0.1:5432/test?sslmode=disable",
		"postgres://postgres@127.0.0.1:5432/test?sslmode=disable"}
	for _, u := range candidates {
		if u == "" {
			continue
		}
		if err := ping(u, 3*time.Second); err != nil {
			tried = append(tried, fmt.Sprintf("%s: %v", RedactURL(u), err))
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

func RedactURL(u string) string {
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

// NeedPostgres returns u, or fails the test under CI=true and skips it
// elsewhere, saying what to install, when there is no Postgres (err says
// why).
func NeedPostgres(t interface {
	Helper()
	Fatalf(string, ...any)
	Skipf(string, ...any)
}, u string, err error) string {
	t.Helper()
	if u == "" {
		if os.Getenv("CI") == "true" {
			t.Fatalf("CI=true but no PostgreSQL (set FABRIC_TEST_PG_URL or install postgresql): %v", err)
		}
		t.Skipf("no PostgreSQL (set FABRIC_TEST_PG_URL or install postgresql): %v", err)
	}
	return u
}
