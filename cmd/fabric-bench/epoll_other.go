//go:build !linux

package main

// startEpollReaders is Linux-only; elsewhere each connection gets a goroutine.
func startEpollReaders(*worker, []*benchConn) (bool, error) { return false, nil }
