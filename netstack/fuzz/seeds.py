#!/usr/bin/env python3
"""Writes seed inputs for the `pipeline` fuzz target into corpus/pipeline/:
records of (port, time step, length, frame) that reach the deep paths —
the gateway's ARP reply, client flows that the rules accept and reject,
replies from upstream, DNS, pings, fragments. Run from netstack/fuzz/."""
import os, struct

UP, DOWN, DOWN2 = bytes.fromhex("525400000001"), bytes.fromhex("525400000002"), bytes.fromhex("525400000003")
GW_MAC, C_MAC = bytes.fromhex("020000000002"), bytes.fromhex("020000000010")
UPLINK, GW, CLIENT, CLIENT2 = [10, 0, 2, 15], [10, 0, 2, 2], [10, 137, 0, 10], [10, 137, 0, 11]
SERVER, VDNS, DNS = [192, 0, 2, 80], [10, 139, 1, 1], [10, 0, 2, 3]

def csum(b):
    if len(b) % 2: b += b"\0"
    s = sum(struct.unpack("!%dH" % (len(b) // 2), b))
    while s >> 16: s = (s & 0xffff) + (s >> 16)
    return (~s) & 0xffff

def eth(dst, src, et): return dst + src + struct.pack("!H", et)

def ip(src, dst, proto, l4, ttl=64, ident=1, frag=0x4000):
    h = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(l4), ident, frag, ttl, proto, 0, bytes(src), bytes(dst))
    return h[:10] + struct.pack("!H", csum(h)) + h[12:] + l4

def l4sum(src, dst, proto, seg):
    return csum(bytes(src) + bytes(dst) + struct.pack("!BBH", 0, proto, len(seg)) + seg)

def udp(src, dst, sp, dp, data=b"x"):
    seg = struct.pack("!HHHH", sp, dp, 8 + len(data), 0) + data
    c = l4sum(src, dst, 17, seg)
    return ip(src, dst, 17, seg[:6] + struct.pack("!H", c) + seg[8:])

def tcp(src, dst, sp, dp, flags):
    seg = struct.pack("!HHIIBBHHH", sp, dp, 1, 0, 5 << 4, flags, 65535, 0, 0)
    c = l4sum(src, dst, 6, seg)
    return ip(src, dst, 6, seg[:16] + struct.pack("!H", c) + seg[18:])

def icmp(src, dst, typ, ident=7):
    m = struct.pack("!BBHHH", typ, 0, 0, ident, 1) + b"ping"
    return ip(src, dst, 1, m[:2] + struct.pack("!H", csum(m)) + m[4:])

def arp(op, smac, sip, tip, dst):
    return eth(dst, smac, 0x0806) + struct.pack("!HHBBH6s4s6s4s", 1, 0x0800, 6, 4, op, smac, bytes(sip), b"\0" * 6, bytes(tip))

UPLINK6 = bytes.fromhex("20010db8000100000000000000000015")
GW6 = bytes.fromhex("20010db8000100000000000000000001")
CGW6 = bytes.fromhex("fd090000000000000000000000000001")
CLIENT6 = bytes.fromhex("fd09000000000000000000000000000a")
SERVER6 = bytes.fromhex("20010db8008000000000000000000005")

def ip6(src, dst, nh, l4, hop=64, sum_at=None):
    if sum_at is not None:
        ph = src + dst + struct.pack("!IxxxB", len(l4), nh)
        c = csum(ph + l4[:sum_at] + b"\0\0" + l4[sum_at + 2:])
        l4 = l4[:sum_at] + struct.pack("!H", c) + l4[sum_at + 2:]
    return struct.pack("!IHBB", 0x60000000, len(l4), nh, hop) + src + dst + l4

def udp6(src, dst, sp, dp, data=b"x"):
    return ip6(src, dst, 17, struct.pack("!HHHH", sp, dp, 8 + len(data), 0) + data, sum_at=6)

def tcp6(src, dst, sp, dp, flags):
    return ip6(src, dst, 6, struct.pack("!HHIIBBHHH", sp, dp, 1, 0, 5 << 4, flags, 65535, 0, 0), sum_at=16)

def icmp6(src, dst, typ, body, hop=64):
    return ip6(src, dst, 58, struct.pack("!BBH", typ, 0, 0) + body, hop=hop, sum_at=2)

def nd(typ, src, dst, target, mac, flags=0):
    opt = 1 if typ == 135 else 2
    return icmp6(src, dst, typ, struct.pack("!B3x", flags) + target + struct.pack("!BB", opt, 1) + mac, hop=255)

def rec(port, frame, step=1): return struct.pack("<BBH", port, step, len(frame)) + frame

gw_arp = rec(0, arp(2, GW_MAC, GW, UPLINK, UP))
gw_na = rec(0, eth(UP, GW_MAC, 0x86dd) + nd(136, GW6, UPLINK6, GW6, GW_MAC, 0x60))
seeds = {
    "udp_flow": gw_arp + rec(1, eth(DOWN, C_MAC, 0x800) + udp(CLIENT, SERVER, 4000, 53))
        + rec(0, eth(UP, GW_MAC, 0x800) + udp(SERVER, UPLINK, 53, 4000)),
    "tcp_flow": gw_arp + rec(1, eth(DOWN, C_MAC, 0x800) + tcp(CLIENT, SERVER, 4001, 80, 0x02))
        + rec(0, eth(UP, GW_MAC, 0x800) + tcp(SERVER, UPLINK, 80, 4001, 0x12)),
    "reject": gw_arp + rec(1, eth(DOWN, C_MAC, 0x800) + tcp(CLIENT, SERVER, 4002, 2222, 0x02)),
    "dns": gw_arp + rec(1, eth(DOWN, C_MAC, 0x800) + udp(CLIENT, VDNS, 4003, 53))
        + rec(0, arp(2, bytes.fromhex("020000000003"), DNS, UPLINK, UP))
        + rec(1, eth(DOWN, C_MAC, 0x800) + udp(CLIENT, VDNS, 4003, 53)),
    "ping": gw_arp + rec(1, eth(DOWN, C_MAC, 0x800) + icmp(CLIENT, SERVER, 8))
        + rec(0, eth(UP, GW_MAC, 0x800) + icmp(SERVER, UPLINK, 0)) + rec(1, eth(DOWN, C_MAC, 0x800) + icmp(CLIENT, [10, 137, 0, 1], 8)),
    "arp_client": rec(1, arp(1, C_MAC, CLIENT, [10, 137, 0, 1], b"\xff" * 6)),
    "second_client": gw_arp + rec(2, eth(DOWN2, C_MAC, 0x800) + udp(CLIENT2, SERVER, 5000, 9999)),
    "fragment": gw_arp + rec(1, eth(DOWN, C_MAC, 0x800) + ip(CLIENT, SERVER, 17, struct.pack("!HHHH", 4004, 53, 100, 0) + b"a" * 16, ident=9, frag=0x2000))
        + rec(1, eth(DOWN, C_MAC, 0x800) + ip(CLIENT, SERVER, 17, b"b" * 76, ident=9, frag=3)),
    "tcp6_flow": gw_na + rec(1, eth(DOWN, C_MAC, 0x86dd) + tcp6(CLIENT6, SERVER6, 4001, 80, 0x02))
        + rec(0, eth(UP, GW_MAC, 0x86dd) + tcp6(SERVER6, UPLINK6, 80, 4001, 0x12)),
    "udp6_reject": gw_na + rec(1, eth(DOWN, C_MAC, 0x86dd) + udp6(CLIENT6, SERVER6, 4002, 53)),
    "ping6": gw_na + rec(1, eth(DOWN, C_MAC, 0x86dd) + icmp6(CLIENT6, SERVER6, 128, struct.pack("!HH", 7, 1) + b"ping"))
        + rec(0, eth(UP, GW_MAC, 0x86dd) + icmp6(SERVER6, UPLINK6, 129, struct.pack("!HH", 7, 1) + b"ping"))
        + rec(1, eth(DOWN, C_MAC, 0x86dd) + icmp6(CLIENT6, CGW6, 128, struct.pack("!HH", 8, 1))),
    "frag6": gw_na + rec(1, eth(DOWN, C_MAC, 0x86dd) + ip6(CLIENT6, SERVER6, 44, struct.pack("!BxHI", 17, 1, 9) + struct.pack("!HHHH", 4005, 80, 72, 0) + b"a" * 48))
        + rec(1, eth(DOWN, C_MAC, 0x86dd) + ip6(CLIENT6, SERVER6, 44, struct.pack("!BxHI", 17, 56, 9) + b"b" * 16)),
    "ns6_client": rec(1, eth(bytes.fromhex("3333ff000001"), C_MAC, 0x86dd)
        + nd(135, CLIENT6, bytes.fromhex("ff0200000000000000000001ff000001"), CGW6, C_MAC)),
    "ns6_uplink": rec(0, eth(bytes.fromhex("3333ff000015"), GW_MAC, 0x86dd)
        + nd(135, GW6, bytes.fromhex("ff0200000000000000000001ff000015"), UPLINK6, GW_MAC)),
}
os.makedirs("corpus/pipeline", exist_ok=True)
for name, data in seeds.items():
    with open(os.path.join("corpus/pipeline", "seed-" + name), "wb") as f:
        f.write(data)
print("wrote", len(seeds), "seeds")
