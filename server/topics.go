package server

import (
	"fmt"
	"strings"
	"time"

	"github.com/fabricrt/fabric/auth"
	"github.com/fabricrt/fabric/fabric"
)

// Policies returns the topic policies in effect, in the order they are
// matched: Topics, then what the shorthands add. A shorthand pattern equal
// to a policy's pattern turns its attribute on in that policy; any other
// is a new policy at the end (Replay.Topics, then Presence.Topics, then
// ClientPublish), so a broader policy listed before it wins for the topics
// both match. It fails on an empty pattern, replay sizes on a policy that
// is not persistent, and persistent policies whose replay sizes differ
// (one history size for all, until the history supports several).
func (o *Options) Policies() ([]TopicPolicy, error) {
	ps := append([]TopicPolicy(nil), o.Topics...)
	add := func(patterns []string, set func(*TopicPolicy)) {
	next:
		for _, pat := range patterns {
			pat = strings.TrimSpace(pat)
			if pat == "" {
				continue
			}
			for i := range ps {
				if ps[i].Pattern == pat {
					set(&ps[i])
					continue next
				}
			}
			ps = append(ps, TopicPolicy{Pattern: pat})
			set(&ps[len(ps)-1])
		}
	}
	add(o.Replay.Topics, func(p *TopicPolicy) { p.Persistent = true })
	add(o.Presence.Topics, func(p *TopicPolicy) { p.Presence = true })
	add(o.ClientPublish, func(p *TopicPolicy) { p.ClientPublish = true })
	for i, p := range ps {
		if strings.TrimSpace(p.Pattern) == "" {
			return nil, fmt.Errorf("topics[%d]: empty pattern", i)
		}
		if !p.Persistent && (p.ReplayMaxPerTopic != 0 || p.ReplayMaxAge != 0) {
			return nil, fmt.Errorf("topics[%d] (%q): replay_max_per_topic and replay_max_age need persistent: true", i, p.Pattern)
		}
		if p.ReplayMaxPerTopic < 0 || p.ReplayMaxAge < 0 {
			return nil, fmt.Errorf("topics[%d] (%q): replay sizes must not be negative", i, p.Pattern)
		}
		if err := checkRead(p); err != nil {
			return nil, fmt.Errorf("topics[%d] (%q): %w", i, p.Pattern, err)
		}
	}
	if _, _, err := replaySize(ps, o.Replay.MaxPerTopic, o.Replay.MaxAge); err != nil {
		return nil, err
	}
	return ps, nil
}

// replaySize is the one history size the persistent policies agree on:
// each policy's own size, or the global one where it sets none.
func replaySize(ps []TopicPolicy, maxPerTopic int, maxAge time.Duration) (int, time.Duration, error) {
	first := -1
	n, age := maxPerTopic, maxAge
	for i, p := range ps {
		if !p.Persistent {
			continue
		}
		pn, page := maxPerTopic, maxAge
		if p.ReplayMaxPerTopic > 0 {
			pn = p.ReplayMaxPerTopic
		}
		if p.ReplayMaxAge > 0 {
			page = p.ReplayMaxAge
		}
		if first < 0 {
			first, n, age = i, pn, page
			continue
		}
		if pn != n || page != age {
			return 0, 0, fmt.Errorf("topics[%d] (%q) keeps %d messages for %s but topics[%d] (%q) keeps %d for %s: "+
				"every persistent topic shares one history for now, so give them the same replay_max_per_topic and replay_max_age "+
				"(a policy without them takes replay.max_per_topic %d and replay.max_age %s)",
				i, p.Pattern, pn, ageString(page), first, ps[first].Pattern, n, ageString(age), maxPerTopic, ageString(maxAge))
		}
	}
	return n, age, nil
}

func ageString(d time.Duration) string {
	if d <= 0 {
		return "ever"
	}
	return d.String()
}

// policySet answers, per topic, what the first matching policy says.
type policySet struct {
	ps    []TopicPolicy
	match []func(string) bool
}

func newPolicySet(ps []TopicPolicy) *policySet {
	s := &policySet{ps: ps}
	for _, p := range ps {
		// ${sub} (a per-user topic's user id) matches like '*' here.
		s.match = append(s.match, fabric.MatchTopics([]string{strings.ReplaceAll(p.Pattern, auth.SubPlaceholder, "*")}))
	}
	return s
}

// Read rules of a TopicPolicy (see TopicPolicy.Read and docs/auth.md).
const (
	// ReadToken: the token's subscribe patterns must match the topic (the
	// default when authentication is on).
	ReadToken = string(auth.RuleToken)
	// ReadPublic: anyone may read, anonymous connections included.
	ReadPublic = string(auth.RulePublic)
	// ReadUser: a per-user topic; only the user whose id stands where the
	// pattern has ${sub} may read.
	ReadUser = string(auth.RuleUser)
)

// checkRead reports a Read rule that is not one.
func checkRead(p TopicPolicy) error {
	switch strings.TrimSpace(p.Read) {
	case "", ReadToken, ReadPublic:
		return nil
	case ReadUser:
		if !strings.Contains(p.Pattern, auth.SubPlaceholder) {
			return fmt.Errorf("read: user needs a pattern holding %s, such as user:%s", auth.SubPlaceholder, auth.SubPlaceholder)
		}
		return nil
	}
	return fmt.Errorf("read %q: want token, public or user", p.Read)
}

// readPolicy is the read rule of topic for the auth hooks: its policy's,
// else ReadToken.
func (s *policySet) readPolicy(topic string) auth.ReadPolicy {
	p := s.lookup(topic)
	if p == nil || strings.TrimSpace(p.Read) == "" {
		return auth.ReadPolicy{Rule: auth.RuleToken}
	}
	return auth.ReadPolicy{Rule: auth.Rule(strings.TrimSpace(p.Read)), Pattern: p.Pattern}
}

// lookup returns the first policy matching topic, or nil.
func (s *policySet) lookup(topic string) *TopicPolicy {
	for i, m := range s.match {
		if m(topic) {
			return &s.ps[i]
		}
	}
	return nil
}

// any reports whether some policy has the attribute f picks.
func (s *policySet) any(f func(*TopicPolicy) bool) bool {
	for i := range s.ps {
		if f(&s.ps[i]) {
			return true
		}
	}
	return false
}

// predicate returns a topic predicate for the attribute f picks, or nil
// when no policy has it.
func (s *policySet) predicate(f func(*TopicPolicy) bool) func(string) bool {
	if !s.any(f) {
		return nil
	}
	return func(topic string) bool {
		p := s.lookup(topic)
		return p != nil && f(p)
	}
}

// patterns lists the patterns of the policies with the attribute f picks.
func (s *policySet) patterns(f func(*TopicPolicy) bool) []string {
	var out []string
	for i := range s.ps {
		if f(&s.ps[i]) {
			out = append(out, s.ps[i].Pattern)
		}
	}
	return out
}

// publishHook combines the client_publish policies with the
// application's Publish hook: a client publish must pass the policies (when
// some policy sets client_publish) and the hook (when there is one); with
// neither, clients publish nowhere (the node's default).
func (s *policySet) publishHook(app func(c *fabric.Client, topic, event string) error) func(c *fabric.Client, topic, event string) error {
	allowed := s.predicate(func(p *TopicPolicy) bool { return p.ClientPublish })
	if allowed == nil {
		return app
	}
	return func(c *fabric.Client, topic, event string) error {
		if !allowed(topic) {
			return fabric.NewLiveError(fabric.CodeForbidden, "publishing to this topic is not allowed")
		}
		if app != nil {
			return app(c, topic, event)
		}
		return nil
	}
}
