//! Descriptors of other processes: a pidfd to follow one (`pidfd_open`),
//! and taking back the sockets a VMM process holds for kuasar-vmm
//! ([`super::Vmm::hold_fds`]): after a restart, kuasar-vmm copies them out
//! of the VMM's descriptor table with `pidfd_getfd(2)`, found by the inode
//! it recorded (a socket cannot be opened again by path once accepted).
use std::collections::HashMap;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

/// The inode of a socket descriptor (`st_ino` of its fstat).
pub fn socket_inode(fd: &impl AsRawFd) -> io::Result<u64> {
    let st = nix::sys::stat::fstat(fd.as_raw_fd()).map_err(io::Error::from)?;
    Ok(st.st_ino)
}

/// The socket inode a `/proc/<pid>/fd/<n>` link names (`socket:[1234]`).
fn parse_socket_link(link: &str) -> Option<u64> {
    link.strip_prefix("socket:[")?
        .strip_suffix(']')?
        .parse()
        .ok()
}

/// A pidfd of process `pid` (`pidfd_open(2)`).
pub fn pidfd_open(pid: u32) -> io::Result<OwnedFd> {
    // SAFETY: pidfd_open takes a pid and flags and returns a new descriptor
    // (or -1); no memory is passed.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid as libc::pid_t, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a descriptor pidfd_open just returned, owned here alone.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as RawFd) })
}

/// Waits until process `pid` (not necessarily our child) has exited: a
/// pidfd polls readable then. The pidfd is opened before this returns, so
/// an exit afterwards is never missed.
pub fn exit_of(pid: u32) -> io::Result<impl std::future::Future<Output = ()> + Send> {
    let pidfd = pidfd_open(pid)?;
    // SAFETY: the OwnedFd is open and owned by the AsyncFd for its whole
    // life, so its raw fd stays valid and the same.
    let pidfd = unsafe {
        tokio::io::unix::AsyncFd::register_with_interest(pidfd, tokio::io::Interest::READABLE)
    }
    .map_err(io::Error::from)?;
    Ok(async move {
        let _ = pidfd.readable().await;
    })
}

/// Copies into this process the descriptors of process `pid` that are the
/// sockets `inodes`; an inode the process no longer holds is absent from
/// the answer.
pub fn take_back(pid: u32, inodes: &[u64]) -> io::Result<HashMap<u64, OwnedFd>> {
    let mut out = HashMap::new();
    if inodes.is_empty() {
        return Ok(out);
    }
    let pidfd = pidfd_open(pid)?;
    for entry in std::fs::read_dir(format!("/proc/{pid}/fd"))? {
        let entry = entry?;
        let Some(target) = entry
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<RawFd>().ok())
        else {
            continue;
        };
        let Some(inode) = std::fs::read_link(entry.path())
            .ok()
            .and_then(|l| parse_socket_link(&l.to_string_lossy()))
        else {
            continue;
        };
        if !inodes.contains(&inode) || out.contains_key(&inode) {
            continue;
        }
        // SAFETY: pidfd_getfd takes two descriptors numbers and flags and
        // returns a new descriptor (or -1); no memory is passed.
        let fd = unsafe { libc::syscall(libc::SYS_pidfd_getfd, pidfd.as_raw_fd(), target, 0) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: a descriptor pidfd_getfd just returned, owned here alone.
        let fd = unsafe { OwnedFd::from_raw_fd(fd as RawFd) };
        // The descriptor number may have been reused since the listing.
        if socket_inode(&fd)? == inode {
            out.insert(inode, fd);
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn socket_links() {
        assert_eq!(parse_socket_link("socket:[4026]"), Some(4026));
        assert_eq!(parse_socket_link("pipe:[4026]"), None);
        assert_eq!(parse_socket_link("/dev/null"), None);
    }

    #[test]
    fn takes_back_own_sockets_by_inode() {
        let (a, _b) = std::os::unix::net::UnixStream::pair().unwrap();
        let inode = socket_inode(&a).unwrap();
        let got = take_back(std::process::id(), &[inode, u64::MAX]).unwrap();
        assert_eq!(got.len(), 1, "{got:?}");
        assert_eq!(socket_inode(&got[&inode]).unwrap(), inode);
    }
}
