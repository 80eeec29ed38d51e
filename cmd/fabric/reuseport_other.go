//go:build !linux

package main

const soReusePort = 0xf // SO_REUSEPORT on the BSDs and macOS
