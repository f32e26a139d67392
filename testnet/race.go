//go:build race

package testnet

// raceEnabled: this test binary runs with the race detector, and so do
// the daemons it builds (see Binary).
const raceEnabled = true
