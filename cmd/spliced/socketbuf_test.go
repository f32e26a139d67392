package main

import (
	"bytes"
	"crypto/rand"
	"crypto/sha256"
	"fmt"
	"io"
	"net"
	"net/netip"
	"regexp"
	"strconv"
	"sync"
	"testing"
	"time"

	"spliced/testnet"
)

// TestLabSpliceSocketBuffer: splice.socket_buffer fixes both sockets of a
// relayed flow at its size before the first byte (ss shows the kernel's
// doubled value, rb and tb, on the client's socket and on the upstream
// one), while a service without it keeps the kernel's autotuned sizes;
// the flow is then relayed, spliced at splice.bytes, and every byte
// arrives intact both ways.
func TestLabSpliceSocketBuffer(t *testing.T) {
	t.Parallel()
	lab := testnet.NewT(t, testnet.Options{})
	d := testnet.StartDaemon(t, lab, `
log:
  level: info
services:
  - name: fixed
    listen: 15001
    ports: ["5101"]
    splice:
      mode: bytes
      bytes: 4MiB
      socket_buffer: 256KiB
  - name: auto
    listen: 15002
    ports: ["5102"]
    splice:
      mode: bytes
      bytes: 4MiB
`)
	const size = 256 << 10
	for _, c := range []struct {
		port  uint16
		fixed bool
	}{{5101, true}, {5102, false}} {
		t.Run(fmt.Sprint(c.port), func(t *testing.T) {
			cl, sv := connectThrough(t, lab, netip.AddrPortFrom(lab.Server().IPv4, c.port))

			// Both gateway sockets of the flow, before any data (the
			// proxy sets the sizes right after its upstream connect,
			// which the server's accept may beat: poll).
			var out string
			err := testnet.Poll(5*time.Second, func() error {
				var err error
				if out, err = lab.Gateway.Run("ss", "-tnm", "state", "established", fmt.Sprintf("( sport = :%d or dport = :%d )", c.port, c.port)); err != nil {
					return err
				}
				mem := regexp.MustCompile(`rb(\d+),t\d+,tb(\d+)`).FindAllStringSubmatch(out, -1)
				if len(mem) != 2 {
					return fmt.Errorf("want the flow's two gateway sockets")
				}
				for _, m := range mem {
					rb, _ := strconv.Atoi(m[1])
					tb, _ := strconv.Atoi(m[2])
					if locked := rb == 2*size && tb == 2*size; locked != c.fixed {
						return fmt.Errorf("socket buffers rb %d, tb %d; want them fixed at %d: %v", rb, tb, 2*size, c.fixed)
					}
				}
				return nil
			})
			if err != nil {
				t.Fatalf("%v; ss shows:\n%s", err, out)
			}

			// 8 MiB each way: relayed, spliced at 4 MiB, intact. The
			// ends close only once the flow is spliced: the buffers
			// along the path can hold all of it, and a FIN that reached
			// the gateway first would leave the flow half-closed, which
			// is not spliced.
			spliced := make(chan error, 1)
			go func() {
				spliced <- d.WaitLog(20*time.Second, func(l map[string]any) bool {
					return l["msg"] == "flow spliced" && l["client"] == cl.LocalAddr().String()
				})
			}()
			var splicedErr error
			splicedOnce := sync.OnceFunc(func() { splicedErr = <-spliced })
			var wg sync.WaitGroup
			errs := make(chan error, 4)
			for _, pair := range [][2]*net.TCPConn{{cl, sv}, {sv, cl}} {
				data := make([]byte, 8<<20)
				rand.Read(data)
				want := sha256.Sum256(data)
				wg.Add(2)
				go func() {
					defer wg.Done()
					if _, err := pair[0].Write(data); err != nil {
						errs <- err
					}
					splicedOnce()
					pair[0].CloseWrite()
				}()
				go func() {
					defer wg.Done()
					pair[1].SetReadDeadline(time.Now().Add(time.Minute))
					got, err := io.ReadAll(pair[1])
					if err != nil {
						errs <- err
						return
					}
					if sum := sha256.Sum256(got); !bytes.Equal(sum[:], want[:]) {
						errs <- fmt.Errorf("%d bytes arrived, not the %d sent", len(got), len(data))
					}
				}()
			}
			wg.Wait()
			close(errs)
			for err := range errs {
				t.Error(err)
			}
			splicedOnce()
			if splicedErr != nil {
				t.Errorf("the flow was not spliced: %v\n%s", splicedErr, tail(d.Log(), 10))
			}
		})
	}
}
