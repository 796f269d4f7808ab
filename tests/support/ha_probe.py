#!/usr/bin/python3
"""Traffic probe for the router failover tests. Times are CLOCK_MONOTONIC seconds
(time.monotonic()), the clock the tests take their own timestamps from.

    ha_probe.py serve ADDR PORT
    ha_probe.py loop HOST PORT --interval S --timeout S --duration S
    ha_probe.py stream HOST PORT --interval S --duration S [--timeout S]

serve   answers each TCP client: to "hello" with "peer=<source address it saw>" (then closes);
        to "stream S" with "peer=<address>" and then "<seq>" every S seconds until the client
        goes away. The server drives the stream: after a failover, the first packet of the
        connection that reaches the new master comes from outside, which is the case that needs
        the connection's state (and NAT mapping) to be there already.
loop    starts a new connection every --interval (each in its own thread, so a lost SYN does
        not hold up the next attempt) and prints one line per attempt, in start order:
        "<start> <end> ok <peer>" or "<start> <end> fail <reason>".
stream  holds one connection for --duration and prints one line: the peer, how many numbers
        arrived, whether they were consecutive, every pause longer than 4 intervals
        ("stalls=<start>+<length>,..."; a pause still going on at the end counts), and the
        error that ended it early, if any.

Every mode ends by itself (bounded by --duration plus --timeout); the tests also stop it by PID.
"""
import argparse
import errno
import os
import select
import socket
import sys
import threading
import time


def serve(args):
    srv = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    srv.bind((args.addr, args.port))
    srv.listen(256)
    while True:
        conn, peer = srv.accept()
        threading.Thread(target=handle, args=(conn, peer), daemon=True).start()


def handle(conn, peer):
    try:
        conn.settimeout(30)
        words = conn.recv(64).decode(errors="replace").split()
        conn.sendall(f"peer={peer[0]}\n".encode())
        if words and words[0] == "stream":
            interval = float(words[1])
            seq = 0
            # Until the client closes (or resets) the connection, or a send fails.
            while True:
                seq += 1
                conn.sendall(f"{seq}\n".encode())
                readable, _, _ = select.select([conn], [], [], interval)
                if readable and conn.recv(64) == b"":
                    break
        else:
            conn.shutdown(socket.SHUT_WR)
            conn.settimeout(2)
            while conn.recv(64):
                pass
    except OSError:
        pass
    finally:
        conn.close()


def attempt(host, port, timeout, results, i):
    start = time.monotonic()
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.settimeout(timeout)
    try:
        s.connect((host, port))
        s.sendall(b"hello\n")
        line = s.makefile().readline().strip()
        outcome = ("ok", line[len("peer="):]) if line.startswith("peer=") else ("fail", "empty")
    except OSError as e:
        outcome = ("fail", errno.errorcode.get(e.errno, type(e).__name__))
    finally:
        s.close()
    results[i] = (start, time.monotonic()) + outcome


def loop(args):
    results = {}
    threads = []
    begin = time.monotonic()
    i = 0
    while time.monotonic() - begin < args.duration:
        t = threading.Thread(target=attempt, args=(args.host, args.port, args.timeout, results, i))
        t.start()
        threads.append(t)
        i += 1
        time.sleep(max(0.0, begin + i * args.interval - time.monotonic()))
    for t in threads:
        t.join()
    for k in range(i):
        start, end, status, detail = results[k]
        print(f"{start:.4f} {end:.4f} {status} {detail}")


def stream(args):
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.settimeout(args.timeout)
    peer, received, consecutive, error = "-", 0, True, "none"
    stalls = []
    pause = 4 * args.interval
    begin = time.monotonic()
    last = begin
    try:
        s.connect((args.host, args.port))
        s.sendall(f"stream {args.interval}\n".encode())
        reader = s.makefile()
        line = reader.readline().strip()
        if not line.startswith("peer="):
            raise ConnectionError(f"no greeting: {line!r}")
        peer = line[len("peer="):]
        last = time.monotonic()
        expected = 1
        while True:
            left = begin + args.duration - time.monotonic()
            if left <= 0:
                break
            s.settimeout(min(left, args.timeout))
            try:
                line = reader.readline()
            except socket.timeout:
                if begin + args.duration - time.monotonic() > 0.01:
                    raise
                break
            if not line:
                raise ConnectionError("closed by the server")
            now = time.monotonic()
            if now - last > pause:
                stalls.append((last, now - last))
            last = now
            received += 1
            if int(line) != expected:
                consecutive = False
            expected = int(line) + 1
    except (OSError, ValueError) as e:
        error = type(e).__name__ + (f":{e}" if isinstance(e, ConnectionError) else "")
    end = time.monotonic()
    if end - last > pause:
        stalls.append((last, end - last))
    s.close()
    stall_text = ",".join(f"{a:.4f}+{d:.4f}" for a, d in stalls) or "-"
    print(
        f"peer={peer} received={received} consecutive={int(consecutive)} "
        f"begin={begin:.4f} end={end:.4f} last={last:.4f} stalls={stall_text} error={error}"
    )


def main():
    p = argparse.ArgumentParser()
    sub = p.add_subparsers(dest="cmd", required=True)
    sv = sub.add_parser("serve")
    sv.add_argument("addr")
    sv.add_argument("port", type=int)
    lp = sub.add_parser("loop")
    lp.add_argument("host")
    lp.add_argument("port", type=int)
    lp.add_argument("--interval", type=float, default=0.02)
    lp.add_argument("--timeout", type=float, default=0.5)
    lp.add_argument("--duration", type=float, required=True)
    st = sub.add_parser("stream")
    st.add_argument("host")
    st.add_argument("port", type=int)
    st.add_argument("--interval", type=float, default=0.05)
    st.add_argument("--timeout", type=float, default=20.0)
    st.add_argument("--duration", type=float, required=True)
    args = p.parse_args()
    {"serve": serve, "loop": loop, "stream": stream}[args.cmd](args)
    sys.stdout.flush()
    os._exit(0)


if __name__ == "__main__":
    main()
