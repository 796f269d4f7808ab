//! Netlink transport for nf_tables: one socket, transactions (batches) whose every message is
//! acknowledged and checked, and dumps.
//!
//! The kernel handles a batch synchronously inside `send`: it runs every message, queues one
//! ack (or error) per message that asked for one, then commits the whole batch or, if any
//! message failed, aborts it. So after `send` returns all answers are already queued.

use super::error::{Error, Result};
use nftnl::nftnl_sys as sys;
use std::ffi::c_char;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

const HDR_LEN: usize = std::mem::size_of::<libc::nlmsghdr>();
/// Room for the largest nf_tables message (see `nftnl::nft_nlmsg_maxsize`).
fn max_msg_size() -> usize {
    nftnl::nft_nlmsg_maxsize() as usize
}

fn align(len: usize) -> usize {
    (len + 3) & !3
}

/// A netlink message received from the kernel.
pub(crate) struct Msg<'a> {
    pub ty: u16,
    pub flags: u16,
    pub seq: u32,
    /// The whole message, header included, 4-byte aligned.
    pub bytes: &'a [u8],
}

impl Msg<'_> {
    pub fn header(&self) -> *const libc::nlmsghdr {
        self.bytes.as_ptr().cast()
    }

    /// For `NLMSG_ERROR`: the (positive) errno, 0 for an ack.
    fn errno(&self) -> Option<i32> {
        let data = self.bytes.get(HDR_LEN..HDR_LEN + 4)?;
        Some(-i32::from_ne_bytes(data.try_into().ok()?))
    }

    /// `nfgenmsg.res_id` of an nf_tables reply: the low 16 bits of the ruleset generation.
    pub fn generation(&self) -> Option<u16> {
        let data = self.bytes.get(HDR_LEN + 2..HDR_LEN + 4)?;
        Some(u16::from_be_bytes(data.try_into().ok()?))
    }
}

/// Splits a datagram into messages, rejecting anything truncated.
fn parse(buf: &[u8]) -> io::Result<Vec<Msg<'_>>> {
    let bad = |why: &str| io::Error::new(io::ErrorKind::InvalidData, why.to_owned());
    let mut out = Vec::new();
    let mut rest = buf;
    while !rest.is_empty() {
        if rest.len() < HDR_LEN {
            return Err(bad("truncated netlink header"));
        }
        let len = u32::from_ne_bytes(rest[0..4].try_into().unwrap_or_default()) as usize;
        if len < HDR_LEN || len > rest.len() {
            return Err(bad("netlink message length out of bounds"));
        }
        out.push(Msg {
            ty: u16::from_ne_bytes([rest[4], rest[5]]),
            flags: u16::from_ne_bytes([rest[6], rest[7]]),
            seq: u32::from_ne_bytes(rest[8..12].try_into().unwrap_or_default()),
            bytes: &rest[..len],
        });
        rest = &rest[align(len).min(rest.len())..];
    }
    Ok(out)
}

/// What one message of a batch does, for error messages.
struct Label {
    object: String,
    action: &'static str,
}

/// A transaction under construction: `BATCH_BEGIN`, messages, `BATCH_END`.
///
/// Sequence numbers are stamped when it is sent, so a batch does not depend on the socket.
pub(crate) struct Batch {
    buf: Vec<u8>,
    /// Offsets of the begin message, every message, and (once finished) the end message.
    offsets: Vec<usize>,
    labels: Vec<Label>,
}

impl Batch {
    pub fn new() -> Batch {
        let mut batch = Batch {
            buf: Vec::with_capacity(4096),
            offsets: Vec::new(),
            labels: Vec::new(),
        };
        // SAFETY: `write` gives a buffer of `max_msg_size()` bytes.
        batch.write(|buf| unsafe {
            sys::nftnl_batch_begin(buf, 0);
        });
        batch
    }

    /// Appends one message. `build` gets a buffer with room for the largest nf_tables message
    /// and must write exactly one netlink message (header first) into it.
    pub fn push(&mut self, object: String, action: &'static str, build: impl FnOnce(*mut c_char)) {
        self.labels.push(Label { object, action });
        self.write(build);
    }

    pub fn len(&self) -> usize {
        self.labels.len()
    }

    fn write(&mut self, build: impl FnOnce(*mut c_char)) {
        let start = self.buf.len();
        self.buf.resize(start + max_msg_size(), 0);
        build(self.buf[start..].as_mut_ptr().cast());
        let len = u32::from_ne_bytes(self.buf[start..start + 4].try_into().unwrap_or_default());
        let len = align(len as usize).clamp(HDR_LEN, max_msg_size());
        self.buf.truncate(start + len);
        self.offsets.push(start);
    }

    fn finish(&mut self) {
        // SAFETY: as in `new`.
        self.write(|buf| unsafe {
            sys::nftnl_batch_end(buf, 0);
        });
    }

    /// Stamps `base, base + 1, ...` on begin, messages and end.
    fn stamp(&mut self, base: u32) {
        for (i, offset) in self.offsets.iter().enumerate() {
            let seq = base.wrapping_add(i as u32).to_ne_bytes();
            self.buf[offset + 8..offset + 12].copy_from_slice(&seq);
        }
    }
}

/// A netlink socket on nf_tables in the current network namespace.
pub(crate) struct Socket {
    fd: OwnedFd,
    seq: u32,
    /// Receive buffer, u64 so that messages in it are aligned for libnftnl's parsers.
    buf: Vec<u64>,
}

fn netlink_err(object: &str, action: &'static str, source: io::Error) -> Error {
    Error::Netlink {
        object: object.to_owned(),
        action,
        source,
    }
}

impl Socket {
    /// Closes the socket so that this process never waits for the kernel's deferred freeing
    /// of removed set elements.
    ///
    /// Closing any nf_tables socket flushes the netns's pending "destroy" work, which frees
    /// what recent transactions removed after an RCU grace period: 5-30 ms, under the
    /// nf_tables mutex. That wait lands on whoever closes the *last* reference. So a child
    /// process takes one: it closes every other descriptor (so nobody waits on pipes it
    /// inherited), waits until this process has dropped its own reference, then exits,
    /// paying for the grace period where nobody is waiting. Only async-signal-safe calls run
    /// in the child, which also makes this safe in a multi-threaded parent. If the fork fails,
    /// the socket is closed here, slowly.
    pub fn close_detached(self) {
        let fd = self.fd.as_raw_fd();
        let mut pipe = [0; 2];
        // SAFETY: pipe2 fills two descriptors we then own.
        if unsafe { libc::pipe2(pipe.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
            return;
        }
        // SAFETY: the child only makes async-signal-safe system calls and `_exit`s.
        match unsafe { libc::fork() } {
            0 => unsafe {
                let (low, high) = (fd.min(pipe[0]) as u32, fd.max(pipe[0]) as u32);
                if low > 0 {
                    libc::syscall(libc::SYS_close_range, 0u32, low - 1, 0u32);
                }
                if high > low + 1 {
                    libc::syscall(libc::SYS_close_range, low + 1, high - 1, 0u32);
                }
                libc::syscall(libc::SYS_close_range, high + 1, u32::MAX, 0u32);
                // EOF once the parent has closed the write end: it no longer holds the socket.
                let mut byte = 0u8;
                while libc::read(pipe[0], (&mut byte as *mut u8).cast(), 1) < 0
                    && *libc::__errno_location() == libc::EINTR
                {}
                // Give the kernel's destroy work time to finish on its own (it needs one RCU
                // grace period and no lock): closing now would flush it under the nf_tables
                // mutex and stall the next transaction in the namespace.
                let pause = libc::timespec {
                    tv_sec: 0,
                    tv_nsec: 200_000_000,
                };
                libc::nanosleep(&pause, std::ptr::null_mut());
                libc::_exit(0)
            },
            _ => {
                drop(self);
                // SAFETY: our own pipe descriptors, closed once.
                unsafe {
                    libc::close(pipe[1]);
                    libc::close(pipe[0]);
                }
            }
        }
    }

    pub fn open() -> io::Result<Socket> {
        // SAFETY: plain system calls; the fd is owned right away.
        let fd = unsafe {
            libc::socket(
                libc::AF_NETLINK,
                libc::SOCK_RAW | libc::SOCK_CLOEXEC,
                libc::NETLINK_NETFILTER,
            )
        };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        let socket = Socket {
            fd,
            seq: 1,
            buf: vec![0; max_msg_size().div_ceil(8)],
        };
        // Error acks then quote only the header of the failed message, not all of it (64 KiB
        // for a big element list). Best effort: the acks are parsed the same either way.
        let _ = socket.set_int(libc::SOL_NETLINK, libc::NETLINK_CAP_ACK, 1);
        // The kernel answers within `send`; this only bounds a wait for an answer that never
        // comes (which would be a kernel bug), instead of hanging a Slurm prolog.
        let timeout = libc::timeval {
            tv_sec: 10,
            tv_usec: 0,
        };
        socket.set_opt(libc::SOL_SOCKET, libc::SO_RCVTIMEO, &timeout)?;
        Ok(socket)
    }

    /// The socket's netlink port id, which the kernel stamps (as `nlmsg_pid`) on the ruleset
    /// notifications that this socket's transactions cause. An unbound socket is bound first
    /// (the kernel would do that at its first send anyway), so the id never changes later.
    pub fn portid(&self) -> io::Result<u32> {
        let fd = self.fd.as_raw_fd();
        let len = std::mem::size_of::<libc::sockaddr_nl>() as libc::socklen_t;
        // SAFETY: an all-zero sockaddr_nl is valid: family, port id and groups unset.
        let mut addr: libc::sockaddr_nl = unsafe { std::mem::zeroed() };
        let mut got = len;
        // SAFETY: `addr` has room for `got` bytes.
        if unsafe { libc::getsockname(fd, (&raw mut addr).cast(), &mut got) } < 0 {
            return Err(io::Error::last_os_error());
        }
        if addr.nl_pid != 0 {
            return Ok(addr.nl_pid);
        }
        addr.nl_family = libc::AF_NETLINK as libc::sa_family_t;
        // SAFETY: binding to port id 0 asks the kernel to pick one; `addr` is `len` bytes.
        if unsafe { libc::bind(fd, (&raw const addr).cast(), len) } < 0 {
            return Err(io::Error::last_os_error());
        }
        got = len;
        // SAFETY: as above.
        if unsafe { libc::getsockname(fd, (&raw mut addr).cast(), &mut got) } < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(addr.nl_pid)
    }

    fn set_opt<T>(&self, level: i32, name: i32, value: &T) -> io::Result<()> {
        // SAFETY: `value` is a valid `T` of the size passed.
        let rc = unsafe {
            libc::setsockopt(
                self.fd.as_raw_fd(),
                level,
                name,
                (value as *const T).cast(),
                std::mem::size_of::<T>() as libc::socklen_t,
            )
        };
        if rc < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    fn set_int(&self, level: i32, name: i32, value: libc::c_int) -> io::Result<()> {
        self.set_opt(level, name, &value)
    }

    /// Grows a socket buffer past the default (212992 bytes), as root even past `wmem_max`.
    fn grow_buffer(&self, force: i32, plain: i32, size: usize) -> io::Result<()> {
        let size = libc::c_int::try_from(size).unwrap_or(libc::c_int::MAX);
        self.set_int(libc::SOL_SOCKET, force, size)
            .or_else(|_| self.set_int(libc::SOL_SOCKET, plain, size))
    }

    fn next_seqs(&mut self, count: usize) -> u32 {
        let base = self.seq;
        self.seq = self.seq.wrapping_add(count as u32);
        if self.seq == 0 {
            self.seq = 1;
        }
        base
    }

    fn send(&self, bytes: &[u8]) -> io::Result<()> {
        // SAFETY: sending a valid buffer; an unconnected netlink socket sends to the kernel.
        let sent =
            unsafe { libc::send(self.fd.as_raw_fd(), bytes.as_ptr().cast(), bytes.len(), 0) };
        if sent < 0 {
            return Err(io::Error::last_os_error());
        }
        if sent as usize != bytes.len() {
            return Err(io::Error::new(
                io::ErrorKind::WriteZero,
                "short netlink send",
            ));
        }
        Ok(())
    }

    /// Receives one datagram into `self.buf`; `Ok(None)` when `nonblocking` and nothing is
    /// queued.
    fn recv(&mut self, nonblocking: bool) -> io::Result<Option<usize>> {
        let flags = libc::MSG_TRUNC | if nonblocking { libc::MSG_DONTWAIT } else { 0 };
        let cap = self.buf.len() * 8;
        loop {
            // SAFETY: receiving into our own buffer of `cap` bytes.
            let n = unsafe {
                libc::recv(
                    self.fd.as_raw_fd(),
                    self.buf.as_mut_ptr().cast(),
                    cap,
                    flags,
                )
            };
            if n >= 0 {
                let n = n as usize;
                if n > cap {
                    return Err(io::Error::new(
                        io::ErrorKind::InvalidData,
                        "netlink message larger than the receive buffer",
                    ));
                }
                return Ok(Some(n));
            }
            let err = io::Error::last_os_error();
            match err.raw_os_error() {
                Some(libc::EINTR) => continue,
                Some(libc::EAGAIN) if nonblocking => return Ok(None),
                Some(libc::EAGAIN) => {
                    return Err(io::Error::new(
                        io::ErrorKind::TimedOut,
                        "no answer from the kernel",
                    ));
                }
                _ => return Err(err),
            }
        }
    }

    fn received(&self, n: usize) -> &[u8] {
        // SAFETY: viewing the u64 buffer as bytes; `n` <= its size in bytes (checked in recv).
        unsafe { std::slice::from_raw_parts(self.buf.as_ptr().cast::<u8>(), n) }
    }

    /// Sends `batch` as one transaction and checks the ack of every message. On failure the
    /// error names the first message the kernel refused (the kernel then committed nothing).
    pub fn transact(&mut self, mut batch: Batch) -> Result<()> {
        let count = batch.len();
        batch.finish();
        let base = self.next_seqs(count + 2);
        batch.stamp(base);
        let first_object = batch
            .labels
            .first()
            .map_or_else(|| "nf_tables".to_owned(), |l| l.object.clone());
        let object = first_object.as_str();

        // The kernel refuses a batch bigger than the send buffer; each queued ack costs about
        // a kilobyte of receive buffer, and a lost ack would leave us not knowing the outcome.
        if batch.buf.len() > 128 * 1024 {
            self.grow_buffer(libc::SO_SNDBUFFORCE, libc::SO_SNDBUF, batch.buf.len() * 2)
                .map_err(|e| netlink_err(object, "size the send buffer", e))?;
        }
        if count > 64 {
            self.grow_buffer(libc::SO_RCVBUFFORCE, libc::SO_RCVBUF, count * 2048)
                .map_err(|e| netlink_err(object, "size the receive buffer", e))?;
        }
        self.send(&batch.buf)
            .map_err(|e| netlink_err(object, "send", e))?;

        let mut acked = vec![false; count];
        let mut remaining = count;
        // (message index, or None for the batch itself; errno)
        let mut failures: Vec<(Option<usize>, i32)> = Vec::new();
        while remaining > 0 {
            // After a refusal the kernel may not ack the rest: take what is queued, no more.
            let Some(n) = self
                .recv(!failures.is_empty())
                .map_err(|e| netlink_err(object, "receive", e))?
            else {
                break;
            };
            let msgs = parse(self.received(n)).map_err(|e| Error::Reply {
                object: object.to_owned(),
                source: e,
            })?;
            for msg in msgs {
                if msg.ty != libc::NLMSG_ERROR as u16 {
                    continue;
                }
                let errno = msg
                    .errno()
                    .ok_or_else(|| Error::reply(object, "truncated netlink error message"))?;
                let offset = msg.seq.wrapping_sub(base) as usize;
                if offset == 0 || offset == count + 1 {
                    if errno != 0 {
                        failures.push((None, errno));
                    }
                } else if offset <= count && !acked[offset - 1] {
                    acked[offset - 1] = true;
                    remaining -= 1;
                    if errno != 0 {
                        failures.push((Some(offset - 1), errno));
                    }
                }
            }
        }
        if let Some(&(index, errno)) = failures.iter().min_by_key(|(i, _)| i.unwrap_or(0)) {
            let (object, action) = match index {
                Some(i) => (batch.labels[i].object.clone(), batch.labels[i].action),
                None => (object.to_owned(), "run the transaction"),
            };
            return Err(Error::Refused {
                object,
                action,
                source: io::Error::from_raw_os_error(errno),
            });
        }
        if remaining > 0 {
            return Err(Error::reply(
                object,
                format!("{remaining} of {count} messages were not acknowledged"),
            ));
        }
        Ok(())
    }

    /// Sends one request (a get or a dump) and hands every reply message to `each` until the
    /// dump is done or the request is acked. A kernel error is returned as `Refused`.
    pub fn request(
        &mut self,
        object: &str,
        action: &'static str,
        build: impl FnOnce(*mut c_char, u32),
        mut each: impl FnMut(&Msg<'_>) -> Result<()>,
    ) -> Result<()> {
        let seq = self.next_seqs(1);
        let mut out = vec![0u8; max_msg_size()];
        build(out.as_mut_ptr().cast(), seq);
        let len = u32::from_ne_bytes(out[0..4].try_into().unwrap_or_default()) as usize;
        self.send(&out[..len.clamp(HDR_LEN, out.len())])
            .map_err(|e| netlink_err(object, "send", e))?;
        loop {
            let n = self
                .recv(false)
                .map_err(|e| netlink_err(object, "receive", e))?
                .unwrap_or(0);
            let buf = self.received(n);
            let msgs = parse(buf).map_err(|e| Error::Reply {
                object: object.to_owned(),
                source: e,
            })?;
            for msg in &msgs {
                if msg.seq != seq {
                    continue; // a late answer to an earlier request
                }
                if msg.ty == libc::NLMSG_ERROR as u16 || msg.ty == libc::NLMSG_DONE as u16 {
                    // NLMSG_DONE carries the dump's final status the same way.
                    let errno = msg.errno().unwrap_or(0);
                    if errno > 0 {
                        return Err(Error::Refused {
                            object: object.to_owned(),
                            action,
                            source: io::Error::from_raw_os_error(errno),
                        });
                    }
                    return Ok(());
                }
                each(msg)?;
            }
        }
    }
}

/// Builds a request header: `flags` are `NLM_F_*` on top of `NLM_F_REQUEST`.
///
/// # Safety
/// `buf` must have room for a netlink message.
pub(crate) unsafe fn header(
    buf: *mut c_char,
    ty: i32,
    family: u16,
    flags: i32,
    seq: u32,
) -> *mut libc::nlmsghdr {
    // SAFETY: forwarded from the caller.
    unsafe { sys::nftnl_nlmsg_build_hdr(buf, ty as u16, family, flags as u16, seq).cast() }
}
