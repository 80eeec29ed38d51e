// Package web is Fabric's browser side, embedded in the binary: the client
// fabric.js (a dependency-free ES module; its TypeScript types in
// fabric.d.ts) and the demo page (chat, presence and a live counter built
// on fabric.js). The server mounts Client at /fabric.js and /fabric.d.ts,
// and Demo at / and /demo/ with `fabric serve --demo` (server/web.go).
//
// The same directory is the npm package of the client (package.json) and
// holds its tests: node unit tests (test/, run by TestClientUnit) and the
// browser tests in Debian's Chromium (browser/, run by TestBrowser).
package web

import (
	"bytes"
	"crypto/sha256"
	"embed"
	"encoding/hex"
	"io/fs"
	"mime"
	"net/http"
	"path"
	"strings"
	"time"
)

//go:embed fabric.js fabric.d.ts demo
var files embed.FS

// asset is one embedded file, ready to serve.
type asset struct {
	name  string
	body  []byte
	etag  string
	ctype string
}

func load(name string) asset {
	b, err := files.ReadFile(name)
	if err != nil {
		panic("web: embedded file missing: " + name) // a build without the files is a broken build
	}
	sum := sha256.Sum256(b)
	ctype := mime.TypeByExtension(path.Ext(name))
	switch path.Ext(name) {
	case ".js", ".mjs":
		ctype = "text/javascript; charset=utf-8"
	case ".ts":
		ctype = "application/typescript; charset=utf-8"
	case ".html":
		ctype = "text/html; charset=utf-8"
	case ".css":
		ctype = "text/css; charset=utf-8"
	case ".svg":
		ctype = "image/svg+xml"
	}
	if ctype == "" {
		ctype = "application/octet-stream"
	}
	return asset{name: name, body: b, etag: `"` + hex.EncodeToString(sum[:8]) + `"`, ctype: ctype}
}

// serve writes a with an ETag; browsers revalidate (no-cache), so a new
// binary's client is picked up at once and an unchanged one costs a 304.
func (a asset) serve(w http.ResponseWriter, r *http.Request) {
	h := w.Header()
	h.Set("Content-Type", a.ctype)
	h.Set("ETag", a.etag)
	h.Set("Cache-Control", "no-cache")
	h.Set("X-Content-Type-Options", "nosniff")
	http.ServeContent(w, r, a.name, time.Time{}, bytes.NewReader(a.body))
}

// ClientJS returns the embedded fabric.js.
func ClientJS() []byte { return bytes.Clone(load("fabric.js").body) }

// Client serves the client: GET /fabric.js and GET /fabric.d.ts (by the
// request path's last element; anything else is 404).
func Client() http.Handler {
	js, dts := load("fabric.js"), load("fabric.d.ts")
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		switch path.Base(r.URL.Path) {
		case "fabric.js":
			js.serve(w, r)
		case "fabric.d.ts":
			dts.serve(w, r)
		default:
			http.NotFound(w, r)
		}
	})
}

// Demo serves the demo: its page at / (any path ending in "/" that is not
// under /demo/) and its assets at /demo/NAME.
func Demo() http.Handler {
	assets := map[string]asset{}
	err := fs.WalkDir(files, "demo", func(p string, d fs.DirEntry, err error) error {
		if err != nil || d.IsDir() {
			return err
		}
		assets[strings.TrimPrefix(p, "demo/")] = load(p)
		return nil
	})
	if err != nil {
		panic("web: reading the embedded demo: " + err.Error())
	}
	index := assets["index.html"]
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if name, ok := strings.CutPrefix(r.URL.Path, "/demo/"); ok {
			if a, ok := assets[name]; ok {
				a.serve(w, r)
				return
			}
			http.NotFound(w, r)
			return
		}
		if !strings.HasSuffix(r.URL.Path, "/") {
			http.NotFound(w, r)
			return
		}
		index.serve(w, r)
	})
}

// DemoTopic names the demo's topics: the chat (DemoTopic+"chat", whose
// presence is who is online) and the counter (DemoTopic+"counter").
const DemoTopic = "demo:"
