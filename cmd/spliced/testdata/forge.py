#!/usr/bin/python3
"""Forge hostile packets on one direction of a TCP flow (for lab tests).

Usage: forge.py IFACE SRC SPORT DST DPORT COUNT

Run inside the namespace of one end of the flow (SRC:SPORT is that end).
It watches IFACE for segments this end sends on the flow, to learn where
the flow's sequence and acknowledgment numbers are, and sends COUNT
packets of each of these kinds:

  rst   RST with a random sequence number (a blind reset)
  data  100 bytes of data with a random sequence number
  ack   a pure ACK with the current sequence number (learned again every
        25 packets) and a random acknowledgment number: an ack of data
        never sent, or long past
  syn   SYN with a random sequence number on the flow's tuple

and COUNT/10 of

  rst_in_window  RST with a sequence number 16384-400000 past the
                 current one (learned again every 10 packets): in the
                 window of a busy flow (but not at rcv_nxt), so the
                 receiver must answer with a challenge ACK and keep the
                 connection (RFC 5961 3.2). The spread covers a fast
                 flow, which moves past small offsets before they
                 arrive, and a slow one (a gateway under the race
                 detector), whose receive window is smaller than the
                 large offsets.

It prints one JSON line: the counts sent per kind.
"""
import json
import random
import sys

from scapy.all import IP, TCP, Raw, conf, sniff

conf.verb = 0


def main():
    iface, src, sport, dst, dport, count = sys.argv[1:7]
    sport, dport, count = int(sport), int(dport), int(count)

    def ours(p):
        return (IP in p and TCP in p and p[IP].src == src and p[IP].dst == dst
                and p[TCP].sport == sport and p[TCP].dport == dport)

    def current():
        seen = sniff(iface=iface, lfilter=ours, count=1, timeout=10)
        if not seen:
            sys.exit("no segment of %s:%d -> %s:%d seen on %s" % (src, sport, dst, dport, iface))
        return seen[0][TCP].seq, seen[0][TCP].ack

    rnd = lambda: random.getrandbits(32)  # noqa: E731
    ip = IP(src=src, dst=dst)
    sent = {}
    s = conf.L3socket(iface=iface)
    try:
        sent["rst_in_window"] = count // 10
        for i in range(count // 10):
            if i % 10 == 0:
                seq, ack = current()
            s.send(ip / TCP(sport=sport, dport=dport, flags="R", seq=(seq + random.randint(16384, 400000)) % 2**32))
        sent["ack"] = count
        for i in range(count):
            if i % 25 == 0:
                seq, ack = current()
            s.send(ip / TCP(sport=sport, dport=dport, flags="A", seq=seq, ack=rnd()))
        kinds = {
            "rst": lambda: ip / TCP(sport=sport, dport=dport, flags="R", seq=rnd()),
            "data": lambda: ip / TCP(sport=sport, dport=dport, flags="PA", seq=rnd(), ack=ack) / Raw(b"X" * 100),
            "syn": lambda: ip / TCP(sport=sport, dport=dport, flags="S", seq=rnd()),
        }
        pkts = [make() for _ in range(count) for make in kinds.values()]
        for p in pkts:
            s.send(p)
        for k in kinds:
            sent[k] = count
    finally:
        s.close()
    print(json.dumps(sent))


main()
