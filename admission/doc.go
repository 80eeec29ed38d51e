// Package admission will hold Fabric's admission control: a handshake tier
// (a cap on concurrent connections, paced upgrades, 503 past the cap) and a
// message tier (per-class rules on pressure signals and cluster-wide top
// publishers).
//
// It is part of the layout from the start and empty until its issue is
// taken: nothing in Fabric depends on it yet.
package admission
