package nfq

import "bytes"

// Unqueued returns a packet of data that belongs to no queue, for unit
// tests of handlers in other packages: Detach copies it as a queue's
// would, and its verdicts go nowhere. A handler that holds packets
// (Hold) can be tested with it without a kernel queue.
func Unqueued(data []byte) *Packet { return &Packet{Data: data, q: unqueued{}} }

type unqueued struct{}

func (unqueued) barrier()                        {}
func (unqueued) verdict(*Packet, Decision) error { return nil }
func (unqueued) close() error                    { return nil }
func (unqueued) number() uint16                  { return 0 }
func (unqueued) readied()                        {}
func (unqueued) detach(p *Packet) *Packet {
	c := *p
	c.Data = bytes.Clone(p.Data)
	return &c
}
