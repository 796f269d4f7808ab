#!/usr/bin/python3
"""Traffic probe for the slurm-egress tests: a server on the "internet" host that tells each
client which source address it saw, and a client that runs as a test user.

    probe.py serve ADDR TCP_PORT UDP_PORT [--drop-table NAME]
    probe.py tcp HOST PORT [--mode hello|rst|finretx|linger] [--timeout S] [--bind ADDR]
    probe.py udp HOST PORT [--timeout S]

The client prints one line, `peer=<address the server saw>` or `error=<reason>`, and exits 0
either way: the tests judge the line and the packet counters, not the exit status.

Teardown modes (the server side of each is what makes the client's kernel send packets that no
longer belong to a live socket of the user):
  rst      the client closes; the server keeps sending, so the client's kernel answers RSTs.
  finretx  the server drops the client's ACKs of its FIN for a while (nftables in its own
           namespace), so it retransmits the FIN and the client's TIME_WAIT answers each one.
  linger   the client closes with SO_LINGER 0: an RST from the socket itself.
"""
import argparse
import errno
import os
import socket
import struct
import subprocess
import sys
import threading
import time


def serve_tcp(addr, port, drop_table):
    srv = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    srv.bind((addr, port))
    srv.listen(64)
    while True:
        conn, peer = srv.accept()
        threading.Thread(target=handle, args=(conn, peer, drop_table), daemon=True).start()


def handle(conn, peer, drop_table):
    try:
        conn.settimeout(10)
        mode = conn.recv(64).decode(errors="replace").strip() or "hello"
        conn.sendall(f"peer={peer[0]}\n".encode())
        if mode == "rst":
            # Wait for the client's FIN, then keep talking to a closed socket.
            while conn.recv(4096):
                pass
            for _ in range(5):
                time.sleep(0.1)
                try:
                    conn.sendall(b"are you still there?\n")
                except OSError:
                    break
        elif mode == "finretx":
            while conn.recv(4096):
                pass
            rule = ["nft", "add", "rule", "inet", drop_table, "input",
                    "ip", "saddr", peer[0], "tcp", "sport", str(peer[1]),
                    "tcp", "flags", "ack", "drop"]
            subprocess.run(["nft", "add", "table", "inet", drop_table], check=True)
            subprocess.run(["nft", "add", "chain", "inet", drop_table, "input",
                            "{ type filter hook input priority -10; }"], check=True)
            subprocess.run(rule, check=True)
            conn.close()
            time.sleep(1.5)
            subprocess.run(["nft", "delete", "table", "inet", drop_table], check=True)
            return
        else:
            while conn.recv(4096):
                pass
    except OSError:
        pass
    finally:
        conn.close()


def serve_udp(addr, port):
    srv = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    srv.bind((addr, port))
    while True:
        _, peer = srv.recvfrom(2048)
        srv.sendto(f"peer={peer[0]}\n".encode(), peer)


def failure(e):
    """`error=<reason>`: a timeout, or the errno's name (ECONNREFUSED, EHOSTUNREACH...)."""
    if isinstance(e, socket.timeout):
        return "error=timeout"
    return "error=" + errno.errorcode.get(e.errno, type(e).__name__)


def client_tcp(args):
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.settimeout(args.timeout)
    try:
        s.connect((args.host, args.port))
        s.sendall(args.mode.encode() + b"\n")
        line = s.makefile().readline().strip()
        if args.mode == "linger":
            s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        s.close()
        print(line or "error=empty")
    except OSError as e:
        print(failure(e))


def client_udp(args):
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.settimeout(args.timeout)
    try:
        s.sendto(b"hello\n", (args.host, args.port))
        data, _ = s.recvfrom(2048)
        print(data.decode().strip())
    except OSError as e:
        print(failure(e))


def main():
    p = argparse.ArgumentParser()
    sub = p.add_subparsers(dest="cmd", required=True)
    sv = sub.add_parser("serve")
    sv.add_argument("addr")
    sv.add_argument("tcp_port", type=int)
    sv.add_argument("udp_port", type=int)
    sv.add_argument("--drop-table", default="se_probe_drop")
    t = sub.add_parser("tcp")
    t.add_argument("host")
    t.add_argument("port", type=int)
    t.add_argument("--mode", default="hello", choices=["hello", "rst", "finretx", "linger"])
    t.add_argument("--timeout", type=float, default=2.0)
    u = sub.add_parser("udp")
    u.add_argument("host")
    u.add_argument("port", type=int)
    u.add_argument("--timeout", type=float, default=2.0)
    args = p.parse_args()
    if args.cmd == "serve":
        threading.Thread(target=serve_udp, args=(args.addr, args.udp_port), daemon=True).start()
        serve_tcp(args.addr, args.tcp_port, args.drop_table)
    elif args.cmd == "tcp":
        client_tcp(args)
    else:
        client_udp(args)
    sys.stdout.flush()
    os._exit(0)


if __name__ == "__main__":
    main()
