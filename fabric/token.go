package fabric

import (
	"encoding/json"
	"errors"
	"strconv"
	"time"
)

// This file is the session layer's part of token-based authentication: the
// Connect hook verifies a token and returns user data that knows when it
// expires (Expirer); the session closes the connection when it does, asks
// the client to refresh shortly before, and takes refreshed tokens through
// the Refresh hook. Verifying tokens is the hook's business (package auth
// does JWTs).

// Expirer is user data that expires, such as a verified token: the
// connection is closed with CloseTokenExpired at ExpiresAt unless the
// client refreshes its token first. A zero time never expires.
type Expirer interface {
	ExpiresAt() time.Time
}

// Close codes the session layer uses (WebSocket close codes; SSE sends the
// same in its close event).
const (
	// CloseTokenExpired: the connection's token expired without a refresh.
	CloseTokenExpired = 4401
	// CloseForbidden: the client kept asking for what it may not have.
	CloseForbidden = 4403
	// CloseRateLimited: the client sent faster than its limits allow.
	CloseRateLimited = 4429
)

// DefaultRefreshAhead is how long before a token expires the client is
// asked to refresh it ({"type":"refresh-needed","exp":N}); a token with a
// shorter life is asked at half of it.
const DefaultRefreshAhead = 30 * time.Second

// ErrTokenUserChanged is what a Refresh hook returns for a token of another
// user: a connection keeps its identity.
var ErrTokenUserChanged = errors.New("fabric: a refreshed token must name the same user")

// armExpiry schedules the refresh request and the close for c's user data,
// replacing what was scheduled before.
func (n *Node) armExpiry(c *Client) {
	c.expMu.Lock()
	defer c.expMu.Unlock()
	if c.expWarn != nil {
		c.expWarn.Stop()
		c.expWarn = nil
	}
	if c.expClose != nil {
		c.expClose.Stop()
		c.expClose = nil
	}
	e, ok := c.UserData().(Expirer)
	if !ok || c.closed {
		return
	}
	exp := e.ExpiresAt()
	if exp.IsZero() {
		return
	}
	left := time.Until(exp)
	if left <= 0 {
		c.expClose = time.AfterFunc(0, func() { c.Close(CloseTokenExpired, "token expired") })
		return
	}
	ahead := min(DefaultRefreshAhead, left/2)
	c.expWarn = time.AfterFunc(left-ahead, func() { n.sendRefreshNeeded(c, exp) })
	c.expClose = time.AfterFunc(left, func() {
		n.metrics.tokensExpired.Inc()
		c.Close(CloseTokenExpired, "token expired")
	})
}

// stopExpiry cancels c's timers (at disconnect).
func (c *Client) stopExpiry() {
	c.expMu.Lock()
	defer c.expMu.Unlock()
	if c.expWarn != nil {
		c.expWarn.Stop()
	}
	if c.expClose != nil {
		c.expClose.Stop()
	}
}

func (n *Node) sendRefreshNeeded(c *Client, exp time.Time) {
	b := strconv.AppendInt([]byte(`{"type":"refresh-needed","exp":`), exp.Unix(), 10)
	c.transport.Deliver(NewMessage("", 0, append(b, '}')))
}

// refreshFrame answers {"type":"refresh","token":T[,"ref":R]}: the Refresh
// hook verifies the token; the connection's user data and expiry are
// replaced, and {"type":"refreshed","exp":N} (or "refresh-denied" with a
// reason) goes back.
func (n *Node) refreshFrame(c *Client, token string, ref json.RawMessage) {
	h := n.cfg.Hooks.Refresh
	if h == nil {
		n.sendRefreshAnswer(c, "refresh-denied", ref, 0, CodeNotFound)
		return
	}
	ud, err := h(c, token)
	if err != nil {
		n.metrics.Denials.WithLabelValues("refresh", refusalCode(err)).Inc()
		n.sendRefreshAnswer(c, "refresh-denied", ref, 0, refusalCode(err))
		return
	}
	c.setUserData(ud)
	n.armExpiry(c)
	var exp int64
	if e, ok := ud.(Expirer); ok && !e.ExpiresAt().IsZero() {
		exp = e.ExpiresAt().Unix()
	}
	n.sendRefreshAnswer(c, "refreshed", ref, exp, "")
}

func (n *Node) sendRefreshAnswer(c *Client, typ string, ref json.RawMessage, exp int64, reason string) {
	b, err := json.Marshal(struct {
		Type   string          `json:"type"`
		Ref    json.RawMessage `json:"ref,omitempty"`
		Exp    int64           `json:"exp,omitempty"`
		Reason string          `json:"reason,omitempty"`
	}{typ, ref, exp, reason})
	if err != nil {
		return
	}
	c.transport.Deliver(NewMessage("", 0, b))
}
