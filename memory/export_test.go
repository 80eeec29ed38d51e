package memory

// Retained returns how many messages topic's history holds, without
// dropping expired ones first (what the sweep has left).
func (b *Backend) Retained(topic string) int {
	s := b.shardOf(b.hash(topic))
	s.mu.Lock()
	t := s.topics[topic]
	s.mu.Unlock()
	if t == nil {
		return 0
	}
	t.mu.Lock()
	defer t.mu.Unlock()
	if h := t.hist.Load(); h != nil {
		return h.ring.n
	}
	return 0
}
