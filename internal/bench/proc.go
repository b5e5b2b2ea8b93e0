package bench

import (
	"fmt"
	"os"
	"strconv"
	"strings"
	"time"
)

// clockTick is USER_HZ, the unit of /proc/<pid>/stat's CPU times: 100 on
// every Linux architecture Go supports.
const clockTick = 100

// procSample is what /proc tells about one process at one moment.
type procSample struct {
	at      time.Time
	cpu     time.Duration // user + system since the start
	rssKB   int64         // VmRSS
	anonKB  int64         // RssAnon: the process's own memory (heap, stacks)
	fileKB  int64         // RssFile: mapped file pages, mostly the binary's, shared
	peakKB  int64         // VmHWM: the highest RSS since start or since resetPeak
	threads int
}

func sampleProc(pid int) (procSample, error) {
	s := procSample{at: time.Now()}
	stat, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return s, err
	}
	// The command name (field 2) may hold spaces; fields count from after it.
	i := strings.LastIndexByte(string(stat), ')')
	if i < 0 {
		return s, fmt.Errorf("/proc/%d/stat: no command field", pid)
	}
	f := strings.Fields(string(stat[i+1:]))
	if len(f) < 13 {
		return s, fmt.Errorf("/proc/%d/stat: %d fields", pid, len(f))
	}
	utime, err1 := strconv.ParseInt(f[11], 10, 64) // field 14
	stime, err2 := strconv.ParseInt(f[12], 10, 64) // field 15
	if err1 != nil || err2 != nil {
		return s, fmt.Errorf("/proc/%d/stat: bad cpu times", pid)
	}
	s.cpu = time.Duration(utime+stime) * time.Second / clockTick
	status, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		return s, err
	}
	for line := range strings.SplitSeq(string(status), "\n") {
		k, v, ok := strings.Cut(line, ":")
		if !ok {
			continue
		}
		v = strings.TrimSpace(strings.TrimSuffix(strings.TrimSpace(v), "kB"))
		switch k {
		case "VmRSS":
			s.rssKB, _ = strconv.ParseInt(v, 10, 64)
		case "RssAnon":
			s.anonKB, _ = strconv.ParseInt(v, 10, 64)
		case "RssFile":
			s.fileKB, _ = strconv.ParseInt(v, 10, 64)
		case "VmHWM":
			s.peakKB, _ = strconv.ParseInt(v, 10, 64)
		case "Threads":
			s.threads, _ = strconv.Atoi(v)
		}
	}
	return s, nil
}

// resetPeak restarts VmHWM from the current RSS (Linux 4.0+).
func resetPeak(pid int) error {
	return os.WriteFile(fmt.Sprintf("/proc/%d/clear_refs", pid), []byte("5"), 0)
}

// cpuRate is the vCPU-seconds per second a process used between two samples.
func cpuRate(a, b procSample) float64 {
	wall := b.at.Sub(a.at)
	if wall <= 0 {
		return 0
	}
	return (b.cpu - a.cpu).Seconds() / wall.Seconds()
}
