// Package sdnotify tells systemd about the daemon's state (sd_notify(3)):
// READY=1 once it intercepts, RELOADING=1 and READY=1 around a reload,
// STOPPING=1 at shutdown. Without $NOTIFY_SOCKET it does nothing.
package sdnotify

import (
	"net"
	"os"
)

// Notify sends state (e.g. "READY=1") to systemd, if it listens.
func Notify(state string) error {
	path := os.Getenv("NOTIFY_SOCKET")
	if path == "" {
		return nil
	}
	if path[0] == '@' { // abstract socket
		path = "\x00" + path[1:]
	}
	c, err := net.DialUnix("unixgram", nil, &net.UnixAddr{Name: path, Net: "unixgram"})
	if err != nil {
		return err
	}
	defer c.Close()
	_, err = c.Write([]byte(state))
	return err
}
