// Package pgbridge will republish PostgreSQL LISTEN/NOTIFY notifications (and
// rows of a no-loss outbox table) onto Fabric topics, through pgx/v5.
//
// It is part of the layout from the start and empty until its issue is
// taken: nothing in Fabric depends on it yet.
package pgbridge
