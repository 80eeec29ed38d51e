package fabric

import (
	"crypto/subtle"
	"encoding/json"
	"errors"
	"net"
	"net/http"
	"strings"
)

// DefaultMaxAPIBody is the largest publish request body accepted (1 MiB,
// NATS's default message limit).
const DefaultMaxAPIBody = 1 << 20

// APIOptions configures PublishHandler.
type APIOptions struct {
	// Key, when set, is required as "Authorization: Bearer <Key>". When it
	// is empty, only loopback clients may publish.
	Key string
	// MaxBody bounds the request body (default DefaultMaxAPIBody).
	MaxBody int64
}

// PublishRequest is the body of POST /api/publish.
type PublishRequest struct {
	Topic string          `json:"topic"`
	Event string          `json:"event"`
	Data  json.RawMessage `json:"data"`
	// Persist keeps the message in the topic's history (see Persist).
	Persist bool `json:"persist,omitempty"`
}

// PublishHandler serves POST /api/publish: the JSON body {"topic","event",
// "data"[,"persist":true]} is published cluster-wide; on a persistent topic
// the answer waits for the history's ack and carries the seq. Errors are JSON {"error": "..."} with
// 400 (bad JSON, topic or event), 401/403 (key), 405, 413 (body too large)
// or 503 (publish failed); success is {"ok":true,"seq":N}.
func (n *Node) PublishHandler(opts APIOptions) http.Handler {
	if opts.MaxBody <= 0 {
		opts.MaxBody = DefaultMaxAPIBody
	}
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.Method != http.MethodPost {
			w.Header().Set("Allow", http.MethodPost)
			apiError(w, http.StatusMethodNotAllowed, "use POST")
			return
		}
		if status, msg := authorize(r, opts.Key); status != 0 {
			apiError(w, status, msg)
			return
		}
		var req PublishRequest
		dec := json.NewDecoder(http.MaxBytesReader(w, r.Body, opts.MaxBody))
		if err := dec.Decode(&req); err != nil {
			var tooBig *http.MaxBytesError
			if errors.As(err, &tooBig) {
				apiError(w, http.StatusRequestEntityTooLarge, "body larger than the limit")
				return
			}
			apiError(w, http.StatusBadRequest, "body must be JSON {\"topic\",\"event\",\"data\"}: "+err.Error())
			return
		}
		if err := ValidateTopic(req.Topic); err != nil {
			apiError(w, http.StatusBadRequest, err.Error())
			return
		}
		if IsReserved(req.Topic) {
			apiError(w, http.StatusBadRequest, "topic "+req.Topic+" is reserved (prefix __)")
			return
		}
		if err := ValidateEvent(req.Event); err != nil {
			apiError(w, http.StatusBadRequest, err.Error())
			return
		}
		data := []byte(req.Data)
		if len(data) == 0 {
			data = []byte("null")
		}
		var opts []PublishOption
		if req.Persist {
			if n.cfg.History == nil {
				apiError(w, http.StatusBadRequest, ErrNoHistory.Error())
				return
			}
			opts = append(opts, Persist())
		}
		seq, err := n.PublishEnvelope(r.Context(), req.Topic, Envelope(req.Topic, req.Event, data), opts...)
		if err != nil {
			n.log.Warn("api publish failed", "topic", req.Topic, "err", err)
			apiError(w, http.StatusServiceUnavailable, "publish failed: "+err.Error())
			return
		}
		w.Header().Set("Content-Type", "application/json")
		_ = json.NewEncoder(w).Encode(struct {
			OK  bool   `json:"ok"`
			Seq uint64 `json:"seq,omitempty"`
		}{true, seq})
	})
}

func authorize(r *http.Request, key string) (int, string) {
	if key != "" {
		got, ok := strings.CutPrefix(r.Header.Get("Authorization"), "Bearer ")
		if !ok || subtle.ConstantTimeCompare([]byte(got), []byte(key)) != 1 {
			return http.StatusUnauthorized, "missing or wrong API key (Authorization: Bearer <key>)"
		}
		return 0, ""
	}
	host, _, err := net.SplitHostPort(r.RemoteAddr)
	if err != nil {
		host = r.RemoteAddr
	}
	if ip := net.ParseIP(host); ip == nil || !ip.IsLoopback() {
		return http.StatusForbidden, "publishing from other hosts needs an API key (--api-key)"
	}
	return 0, ""
}

func apiError(w http.ResponseWriter, status int, msg string) {
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(status)
	_ = json.NewEncoder(w).Encode(map[string]string{"error": msg})
}
