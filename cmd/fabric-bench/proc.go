package main

import (
	"bytes"
	"fmt"
	"os"
	"strconv"
	"strings"
	"time"
)

// procSample is one reading of a process's resident memory and CPU time.
type procSample struct {
	at    time.Time
	rss   int64         // bytes
	cpu   time.Duration // user + system
	alive bool
}

// clkTck is USER_HZ, the unit of /proc/<pid>/stat CPU times (100 on Linux).
const clkTck = 100

func readProc(pid int) procSample {
	s := procSample{at: time.Now()}
	if pid <= 0 {
		return s
	}
	status, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		return s
	}
	for _, line := range bytes.Split(status, []byte("\n")) {
		if rest, ok := bytes.CutPrefix(line, []byte("VmRSS:")); ok {
			f := strings.Fields(string(rest))
			if len(f) > 0 {
				kb, _ := strconv.ParseInt(f[0], 10, 64)
				s.rss = kb * 1024
			}
		}
	}
	stat, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return s
	}
	// Fields after the command name (which may contain spaces) start at ')'.
	i := bytes.LastIndexByte(stat, ')')
	if i < 0 {
		return s
	}
	f := strings.Fields(string(stat[i+1:]))
	if len(f) > 13 {
		utime, _ := strconv.ParseInt(f[11], 10, 64)
		stime, _ := strconv.ParseInt(f[12], 10, 64)
		s.cpu = time.Duration(utime+stime) * time.Second / clkTck
	}
	s.alive = true
	return s
}

// cpuPercent is the CPU used between two samples, in percent of one core.
func cpuPercent(a, b procSample) float64 {
	wall := b.at.Sub(a.at)
	if wall <= 0 {
		return 0
	}
	return 100 * float64(b.cpu-a.cpu) / float64(wall)
}

// readTree is readProc summed over pid and all its descendants (a server
// in worker mode: the primary and its workers), with how many processes
// that was.
func readTree(pid int) (procSample, int) {
	s := readProc(pid)
	if !s.alive {
		return s, 0
	}
	n := 1
	for _, c := range children(pid) {
		cs, cn := readTree(c)
		s.rss += cs.rss
		s.cpu += cs.cpu
		n += cn
	}
	return s, n
}

// children lists pid's child processes (from every thread's children file).
func children(pid int) []int {
	tasks, _ := os.ReadDir(fmt.Sprintf("/proc/%d/task", pid))
	var out []int
	for _, t := range tasks {
		b, err := os.ReadFile(fmt.Sprintf("/proc/%d/task/%s/children", pid, t.Name()))
		if err != nil {
			continue
		}
		for _, f := range strings.Fields(string(b)) {
			if c, err := strconv.Atoi(f); err == nil {
				out = append(out, c)
			}
		}
	}
	return out
}

// kernelTCPMem is the memory the kernel holds for all TCP sockets of the
// machine (/proc/net/sockstat "TCP: ... mem N", in pages), in bytes, and
// how many TCP sockets are in use.
func kernelTCPMem() (bytes int64, inuse int) {
	b, err := os.ReadFile("/proc/net/sockstat")
	if err != nil {
		return 0, 0
	}
	for _, line := range strings.Split(string(b), "\n") {
		f := strings.Fields(line)
		if len(f) == 0 || f[0] != "TCP:" {
			continue
		}
		for i := 1; i+1 < len(f); i += 2 {
			v, _ := strconv.ParseInt(f[i+1], 10, 64)
			switch f[i] {
			case "mem":
				bytes = v * int64(os.Getpagesize())
			case "inuse":
				inuse = int(v)
			}
		}
	}
	return bytes, inuse
}

// kernelSlab is the kernel's slab memory (/proc/meminfo "Slab:"), in bytes:
// where an idle socket's kernel state lives (its sock, file, inode and
// dentry objects), which sockstat's "mem" (buffer pages) does not count.
func kernelSlab() int64 {
	b, err := os.ReadFile("/proc/meminfo")
	if err != nil {
		return 0
	}
	for _, line := range strings.Split(string(b), "\n") {
		if rest, ok := strings.CutPrefix(line, "Slab:"); ok {
			f := strings.Fields(rest)
			if len(f) > 0 {
				kb, _ := strconv.ParseInt(f[0], 10, 64)
				return kb * 1024
			}
		}
	}
	return 0
}
