//! Raw Ethernet frames out of one interface of a test namespace: the sender
//! behind the flood tests. Frames go out exactly as built (AF_PACKET,
//! SOCK_RAW), so truncated, fragmented, spoofed and bad-checksum packets
//! reach the load balancer without the sender's stack fixing or refusing
//! them. The socket is bound with protocol 0, so it never receives.
//!
//! Safety of the traffic is the caller's part: open senders only on
//! interfaces of namespaces a [`crate::netns::Topology`] created, and build
//! frames with addresses from 198.18.0.0/15.

use std::{
    ffi::CString,
    io,
    os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, ensure};

use crate::netns;

/// Frames handed to one `sendmmsg(2)` call.
pub const BATCH: usize = 64;

/// An AF_PACKET socket bound to one interface by ifindex.
#[derive(Debug)]
pub struct RawSender {
    fd: OwnedFd,
    ifindex: i32,
}

/// What a bounded send achieved.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct SendStats {
    /// Frames the kernel accepted.
    pub sent: u64,
    /// Frames refused by the kernel (e.g. ENOBUFS while the device queue is full).
    pub refused: u64,
    pub elapsed: Duration,
}

impl SendStats {
    pub fn rate_pps(&self) -> f64 {
        let s = self.elapsed.as_secs_f64();
        if s > 0.0 { self.sent as f64 / s } else { 0.0 }
    }
}

impl RawSender {
    /// Opens a sender on `ifname` inside namespace `ns`. The socket belongs
    /// to `ns` and may be used from any thread afterwards.
    pub fn open(ns: &str, ifname: &str) -> Result<RawSender> {
        let name = ifname.to_owned();
        netns::in_netns(ns, move || Self::open_here(&name))?
            .with_context(|| format!("raw sender on {ifname} in {ns}"))
    }

    fn open_here(ifname: &str) -> Result<RawSender> {
        let cname = CString::new(ifname).context("interface name contains NUL")?;
        // SAFETY: if_nametoindex reads a NUL-terminated string that outlives the call.
        let ifindex = unsafe { libc::if_nametoindex(cname.as_ptr()) };
        ensure!(
            ifindex != 0,
            "no interface {ifname}: {}",
            io::Error::last_os_error()
        );
        let ifindex = i32::try_from(ifindex).context("ifindex out of range")?;
        // Protocol 0: the socket sends but is never handed received frames.
        // SAFETY: plain socket(2); the fd is owned right below.
        let raw = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW | libc::SOCK_CLOEXEC, 0) };
        if raw < 0 {
            return Err(io::Error::last_os_error()).context("socket(AF_PACKET, SOCK_RAW)");
        }
        // SAFETY: `raw` is a fresh descriptor nobody else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        // Straight to the driver: a veth has no queue worth protecting, and
        // the qdisc layer would only add cost per frame.
        let one: libc::c_int = 1;
        // SAFETY: setsockopt reads one c_int through a valid pointer.
        let rc = unsafe {
            libc::setsockopt(
                fd.as_raw_fd(),
                libc::SOL_PACKET,
                libc::PACKET_QDISC_BYPASS,
                (&raw const one).cast(),
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            )
        };
        if rc != 0 {
            return Err(io::Error::last_os_error()).context("PACKET_QDISC_BYPASS");
        }
        // SAFETY: sockaddr_ll is plain old data; all-zero is a valid value.
        let mut sll: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
        sll.sll_family = libc::AF_PACKET as u16;
        sll.sll_ifindex = ifindex;
        // SAFETY: bind reads a sockaddr_ll of the given size.
        let rc = unsafe {
            libc::bind(
                fd.as_raw_fd(),
                (&raw const sll).cast(),
                std::mem::size_of::<libc::sockaddr_ll>() as libc::socklen_t,
            )
        };
        if rc != 0 {
            return Err(io::Error::last_os_error()).with_context(|| format!("binding to {ifname}"));
        }
        Ok(RawSender { fd, ifindex })
    }

    /// The interface index the socket is bound to.
    pub fn ifindex(&self) -> i32 {
        self.ifindex
    }

    /// Sends one frame (Ethernet header included) as it is.
    pub fn send(&self, frame: &[u8]) -> io::Result<()> {
        // SAFETY: send(2) reads `frame.len()` bytes from a live slice.
        let n = unsafe { libc::send(self.fd.as_raw_fd(), frame.as_ptr().cast(), frame.len(), 0) };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        if n as usize != frame.len() {
            return Err(io::Error::other(format!(
                "short send: {n} of {} bytes",
                frame.len()
            )));
        }
        Ok(())
    }

    /// Sends up to [`BATCH`] frames with one `sendmmsg(2)`; returns how many
    /// the kernel took (frames after a refused one are not sent).
    pub fn send_batch(&self, frames: &[&[u8]]) -> io::Result<usize> {
        let frames = &frames[..frames.len().min(BATCH)];
        let mut iovs: Vec<libc::iovec> = frames
            .iter()
            .map(|f| libc::iovec {
                iov_base: f.as_ptr().cast_mut().cast(),
                iov_len: f.len(),
            })
            .collect();
        let mut msgs: Vec<libc::mmsghdr> = iovs
            .iter_mut()
            .map(|iov| {
                // SAFETY: mmsghdr is plain old data; all-zero is a valid value.
                let mut m: libc::mmsghdr = unsafe { std::mem::zeroed() };
                m.msg_hdr.msg_iov = iov;
                m.msg_hdr.msg_iovlen = 1;
                m
            })
            .collect();
        // SAFETY: every mmsghdr points at one iovec describing a live frame;
        // the kernel only reads them. The bound socket needs no address.
        let n = unsafe {
            libc::sendmmsg(
                self.fd.as_raw_fd(),
                msgs.as_mut_ptr(),
                msgs.len() as libc::c_uint,
                0,
            )
        };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(n as usize)
    }

    /// Sends every frame, paced to at most `rate_pps` frames a second, and
    /// fails if that takes longer than `limit`. Pacing keeps the receiving
    /// side's backlog from overflowing, so that every frame arrives: tests
    /// that account for each packet need that.
    pub fn send_paced(&self, frames: &[Vec<u8>], rate_pps: u32, limit: Duration) -> Result<()> {
        ensure!(rate_pps > 0, "pacing rate must be positive");
        let start = Instant::now();
        let per_frame = Duration::from_secs(1) / rate_pps;
        for (i, chunk) in frames.chunks(16).enumerate() {
            let due = per_frame * u32::try_from(i * 16).context("too many frames")?;
            if let Some(wait) = due.checked_sub(start.elapsed()) {
                std::thread::sleep(wait);
            }
            ensure!(
                start.elapsed() <= limit,
                "sending {} frames took longer than {limit:?}",
                frames.len()
            );
            for frame in chunk {
                self.send(frame)
                    .with_context(|| format!("sending a {}-byte frame", frame.len()))?;
            }
        }
        Ok(())
    }

    /// Sends frames made by `frame(i)` for i = 0, 1, … as fast as the kernel
    /// takes them, or at most `rate_pps` a second, until `max_packets` were
    /// offered or `max_duration` passed, whichever comes first. Both bounds
    /// are required: a flood never runs open-ended. `frame` writes frame `i`
    /// into the buffer it is given and returns its length.
    pub fn flood(
        &self,
        max_packets: u64,
        max_duration: Duration,
        rate_pps: Option<f64>,
        mut frame: impl FnMut(u64, &mut [u8]) -> usize,
    ) -> SendStats {
        const FRAME_MAX: usize = 128;
        let mut bufs = vec![[0u8; FRAME_MAX]; BATCH];
        let mut lens = [0usize; BATCH];
        let start = Instant::now();
        let mut stats = SendStats::default();
        let mut next = 0u64;
        while next < max_packets && start.elapsed() < max_duration {
            if let Some(rate) = rate_pps.filter(|r| *r > 0.0) {
                let due = Duration::from_secs_f64(next as f64 / rate);
                if let Some(wait) = due.checked_sub(start.elapsed()) {
                    std::thread::sleep(wait.min(max_duration));
                }
            }
            let n = usize::try_from((max_packets - next).min(BATCH as u64)).unwrap_or(BATCH);
            for (k, (buf, len)) in bufs.iter_mut().zip(lens.iter_mut()).take(n).enumerate() {
                *len = frame(next + k as u64, buf).min(FRAME_MAX);
            }
            let slices: Vec<&[u8]> = bufs
                .iter()
                .zip(lens.iter())
                .take(n)
                .map(|(b, l)| &b[..*l])
                .collect();
            match self.send_batch(&slices) {
                Ok(k) => {
                    stats.sent += k as u64;
                    stats.refused += (n - k) as u64;
                }
                Err(_) => stats.refused += n as u64,
            }
            next += n as u64;
        }
        stats.elapsed = start.elapsed();
        stats
    }
}
