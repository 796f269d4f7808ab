#!/usr/bin/python3
"""Helpers of benches/datapath.sh: a TCP accept server, a connect() timer, and the table.

    netbench.py serve ADDR PORT            accept, close after the client, forever
    netbench.py connect HOST PORT COUNT    time COUNT connects; prints "p50_us p99_us"
    netbench.py blocked HOST PORT          exit 0 if a connect fails or gets no answer in 1 s
    netbench.py gbps                       iperf3 -J output on stdin; prints Gbit/s received
    netbench.py table RESULTS              datapath.sh's results as a table of ratios
    netbench.py sink ADDR PORT             count what each client sends, answer the count
    netbench.py send HOST PORT SECS MARK   send for SECS with SO_MARK MARK (0: none, no
                                           root needed); prints Gbit/s the sink counted
    netbench.py ratios RESULTS             "NAME GBPS BEFORE AFTER" lines as ratios

The client times connect() alone, SYN to SYN-ACK, the part of a connection's setup that
marking rules can slow down (the first packet is where slurm-egress decides). Every wait is
bounded: a lost SYN fails the run instead of hanging it.
"""
import json
import socket
import statistics
import struct
import sys
import time


def listener(addr, port, backlog):
    srv = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    srv.bind((addr, port))
    srv.listen(backlog)
    return srv


def serve(addr, port):
    srv = listener(addr, port, 4096)
    while True:
        conn, _ = srv.accept()
        # The client resets the connection; waiting for that leaves no TIME_WAIT here.
        conn.settimeout(2)
        try:
            while conn.recv(64):
                pass
        except OSError:
            pass
        conn.close()


def connect(host, port, count):
    # Each connection ends with an RST (SO_LINGER 0): tens of thousands of connections in
    # TIME_WAIT, in the sockets and in the router's conntrack (120 s), would otherwise
    # exhaust the ports toward the one server port, and the router's masquerade drops SYNs
    # it finds no port for.
    linger = struct.pack("ii", 1, 0)
    times = []
    # The first connects also resolve neighbours and warm caches: not counted.
    for i in range(count + 20):
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, linger)
        s.settimeout(2)
        start = time.perf_counter_ns()
        try:
            s.connect((host, port))
        except OSError as e:
            sys.exit(f"connect {i + 1} of {count + 20} to {host}:{port}: {e}")
        took = time.perf_counter_ns() - start
        s.close()
        if i >= 20:
            times.append(took / 1000)
    times.sort()
    print(f"{times[len(times) // 2]:.1f} {times[len(times) * 99 // 100]:.1f}")


def blocked(host, port):
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.settimeout(1)
    try:
        s.connect((host, port))
    except (socket.timeout, OSError):
        return 0
    return 1


def sink(addr, port):
    srv = listener(addr, port, 16)
    buf = bytearray(1 << 20)
    while True:
        conn, _ = srv.accept()
        conn.settimeout(10)
        got = 0
        try:
            while n := conn.recv_into(buf):
                got += n
            conn.sendall(str(got).encode())
        except OSError:
            pass
        conn.close()


def send(host, port, secs, mark):
    """Bulk TCP in 1 MiB writes, like iperf3 but with the socket's mark set before connect(),
    as a cgroup BPF program would set it at socket creation."""
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    if mark:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_MARK, mark)
    s.settimeout(10)
    s.connect((host, port))
    data = b"x" * (1 << 20)
    start = time.perf_counter()
    while time.perf_counter() - start < secs:
        s.sendall(data)
    s.shutdown(socket.SHUT_WR)
    got = int(s.recv(64))
    print(f"{got * 8 / (time.perf_counter() - start) / 1e9:.3f}")


def ratios(path):
    runs = {}
    for line in open(path):
        name, *f = line.split()
        gbps, before, after = map(float, f)
        runs.setdefault(name, []).append(gbps / ((before + after) / 2))
    for name, thr in runs.items():
        print(f"{LABELS.get(name, name):<44} {statistics.median(thr):>7.2f} "
              f"{f'({min(thr):.2f}-{max(thr):.2f})':>11}")


def gbps():
    report = json.load(sys.stdin)
    if "error" in report:
        sys.exit(f"iperf3: {report['error']}")
    print(f"{report['end']['sum_received']['bits_per_second'] / 1e9:.3f}")


LABELS = {
    "rule-only": "(the seed's ip rule alone, no marks)",
    "conntrack-only": "(conntrack alone, no marks)",
    "mark-filter": "(mark every packet, no re-route)",
    "mark-route": "(mark every packet, re-route it)",
    "reroute-closed": "(seed's mechanism, no owner match)",
    "ct-reroute-closed": "(slurm-egress's mechanism, no sets)",
    "sockmark": "socket marked at creation, no netfilter",
    "sockmark-ct": "socket marked at creation, with the ct rules",
    "iptables-nft": "seed owner rules, iptables-nft",
    "iptables-legacy": "seed owner rules, iptables-legacy",
    "slurm-egress-users": "slurm-egress, N selected users",
    "slurm-egress-jobs": "slurm-egress, N running jobs",
}


def table(path):
    """Results are lines "NAME N GBPS P50 P99" of a variant's point followed by the same
    three figures of the baseline points before and after it. Each ratio is against the mean
    of those two; the table shows medians over a variant's points."""
    runs = {}
    for line in open(path):
        f = line.split()
        runs.setdefault((f[0], f[1]), []).append([float(x) for x in f[2:]])
    med = statistics.median
    base = [p[3:6] for points in runs.values() for p in points]
    print(f"{'variant':<36} {'N':>6} {'Gbit/s':>7} {'x base':>7} {'(range)':>11}   "
          f"{'connect p50':>11} {'p99':>6} {'x base':>7}")
    print(f"{'baseline: no marks, all via router':<36} {'-':>6} {med(b[0] for b in base):>7.2f} "
          f"{1:>7.2f} {'':>11}   {med(b[1] for b in base):>9.0f}us "
          f"{med(b[2] for b in base):>4.0f}us {1:>7.2f}")
    for (name, n), points in runs.items():
        thr = [p[0] / ((p[3] + p[6]) / 2) for p in points]
        lat = [p[1] / ((p[4] + p[7]) / 2) for p in points]
        print(f"{LABELS.get(name, name):<36} {n:>6} {med(p[0] for p in points):>7.2f} "
              f"{med(thr):>7.2f} {f'({min(thr):.2f}-{max(thr):.2f})':>11}   "
              f"{med(p[1] for p in points):>9.0f}us {med(p[2] for p in points):>4.0f}us "
              f"{med(lat):>7.2f}")
    print("\nx base: throughput / the baseline's (higher is better; range: of the points);"
          "\nconnect p50 / the baseline's (lower is better).")


def main():
    cmd, args = sys.argv[1], sys.argv[2:]
    if cmd == "serve":
        serve(args[0], int(args[1]))
    elif cmd == "connect":
        connect(args[0], int(args[1]), int(args[2]))
    elif cmd == "blocked":
        sys.exit(blocked(args[0], int(args[1])))
    elif cmd == "gbps":
        gbps()
    elif cmd == "table":
        table(args[0])
    elif cmd == "sink":
        sink(args[0], int(args[1]))
    elif cmd == "send":
        send(args[0], int(args[1]), float(args[2]), int(args[3]))
    elif cmd == "ratios":
        ratios(args[0])
    else:
        sys.exit(f"netbench.py: unknown command {cmd}")


if __name__ == "__main__":
    main()
