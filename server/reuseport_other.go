//go:build !linux

package server

const soReusePort = 0xf // SO_REUSEPORT on the BSDs and macOS
