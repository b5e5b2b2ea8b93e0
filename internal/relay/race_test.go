//go:build race

package relay

// raceEnabled: the race detector allocates on its own (~4 times per round
// trip in TestRelayReadsDoNotAllocate), so allocation counts allow for it.
const raceEnabled = true
