//! The qrexec agent's side of Qubes's remote-execution protocol
//! (qubes-core-qrexec `libqrexec/qrexec.h`, `agent/qrexec-agent.c`,
//! `agent/qrexec-agent-data.c`), as pure logic.
//!
//! dom0's qrexec daemon connects to the VM's agent over a vchan on port
//! 512 for which the VM is the server (the control connection). Every
//! message is a header of two little-endian `u32`s (type, length) and
//! `length` bytes. Both ends open with HELLO carrying their protocol
//! version; the lower one is used, and below 2 is refused. To run a
//! service dom0 sends EXEC_CMDLINE (or JUST_EXEC, which wants no
//! input or output) with `{connect_domain, connect_port}` and a
//! NUL-terminated `user:command`; the agent connects, as a vchan client, to
//! the server dom0 set up on that port (the data connection), exchanges
//! HELLO there, runs the service with its stdin arriving as DATA_STDIN
//! (empty = end), sends its output as DATA_STDOUT/DATA_STDERR (empty = end)
//! and the exit status as DATA_EXIT_CODE, closes the data connection, and
//! reports CONNECTION_TERMINATED with the same `{domain, port}` on the
//! control connection.
//!
//! A firewall VM runs no programs: it answers the services Qubes calls on
//! a network VM while it starts — `qubes.WaitForSession` (there is no
//! session to wait for: done at once) and `qubes.SetDateTime` (the date is
//! read and reported; the kernel's clock needs no wall time) — and around
//! a host suspend (`qubes.SuspendPreAll`, `qubes.SuspendPostAll`: nothing
//! to quiesce, done at once), and refuses
//! every other service and command cleanly: a message on stderr and exit
//! status 127, what qrexec gives for a service that does not exist.
//! Everything dom0 sends is checked: sizes, types, the command line.

use alloc::format;
use alloc::string::String;
use alloc::vec::Vec;

/// The control connection's vchan port (`VCHAN_BASE_PORT`).
pub const VCHAN_PORT: u32 = 512;

pub const MSG_DATA_STDIN: u32 = 0x190;
pub const MSG_DATA_STDOUT: u32 = 0x191;
pub const MSG_DATA_STDERR: u32 = 0x192;
pub const MSG_DATA_EXIT_CODE: u32 = 0x193;
pub const MSG_EXEC_CMDLINE: u32 = 0x200;
pub const MSG_JUST_EXEC: u32 = 0x201;
pub const MSG_SERVICE_CONNECT: u32 = 0x202;
pub const MSG_SERVICE_REFUSED: u32 = 0x203;
pub const MSG_CONNECTION_TERMINATED: u32 = 0x211;
pub const MSG_HELLO: u32 = 0x300;

/// The protocol version we speak (3: data chunks up to 64 KiB).
pub const PROTOCOL_VERSION: u32 = 3;
/// The oldest version accepted (qrexec's `QREXEC_PROTOCOL_V2`).
pub const MIN_VERSION: u32 = 2;
/// Header bytes.
pub const HEADER: usize = 8;
/// The longest message body accepted: a version-3 data chunk (65536) or
/// the longest command line qrexec sends (`MAX_QREXEC_CMD_LEN`, 65535)
/// after its 8-byte parameters.
pub const MAX_BODY: usize = 65536 + 8;
/// Exit status of a service that is not offered
/// (`QREXEC_EXIT_SERVICE_NOT_FOUND`).
pub const EXIT_NOT_FOUND: u32 = 127;
/// The most stdin bytes kept for a service (a date is 30).
const MAX_STDIN: usize = 4096;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum QrexecError {
    /// A header announced a body longer than `MAX_BODY`.
    TooLong(u32),
    /// The first message was not a well-formed HELLO.
    BadHello { ty: u32, len: usize },
    /// The other end speaks a version below 2.
    OldVersion(u32),
    /// An exec request too short for its parameters, or its command line
    /// not NUL-terminated or not `user:command`.
    BadExec,
    /// A message that makes no sense at this point (its type).
    Unexpected(u32),
    /// The decoder failed earlier; the connection is unusable.
    Failed,
}

/// One message: its type and body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Message {
    pub ty: u32,
    pub body: Vec<u8>,
}

/// A message's bytes on the wire.
pub fn encode(ty: u32, body: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(HEADER + body.len());
    out.extend_from_slice(&ty.to_le_bytes());
    out.extend_from_slice(&(body.len() as u32).to_le_bytes());
    out.extend_from_slice(body);
    out
}

/// Our HELLO.
pub fn hello() -> Vec<u8> {
    encode(MSG_HELLO, &PROTOCOL_VERSION.to_le_bytes())
}

/// Splits received bytes into messages.
#[derive(Debug, Default)]
pub struct Decoder(crate::Framer);

impl Decoder {
    pub fn new() -> Self {
        Self::default()
    }

    /// Bytes received.
    pub fn push(&mut self, bytes: &[u8]) {
        self.0.push(bytes);
    }

    /// The next whole message, if one has arrived; after an error, only
    /// errors.
    pub fn next_message(&mut self) -> Option<Result<Message, QrexecError>> {
        let header = |h: &[u8; HEADER]| {
            let ty = u32::from_le_bytes([h[0], h[1], h[2], h[3]]);
            let len = u32::from_le_bytes([h[4], h[5], h[6], h[7]]);
            if len as usize > MAX_BODY {
                return Err(QrexecError::TooLong(len));
            }
            Ok((ty, len as usize))
        };
        let m = self.0.next(header, QrexecError::Failed)?;
        Some(m.map(|(ty, body)| Message { ty, body }))
    }
}

/// The version both ends use, from the other end's HELLO.
pub fn negotiate(m: &Message) -> Result<u32, QrexecError> {
    let v: [u8; 4] = match (m.ty, m.body.as_slice().try_into()) {
        (MSG_HELLO, Ok(v)) => v,
        _ => {
            return Err(QrexecError::BadHello {
                ty: m.ty,
                len: m.body.len(),
            })
        }
    };
    let theirs = u32::from_le_bytes(v);
    if theirs < MIN_VERSION {
        return Err(QrexecError::OldVersion(theirs));
    }
    Ok(theirs.min(PROTOCOL_VERSION))
}

/// A service request from dom0 (EXEC_CMDLINE or JUST_EXEC).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Exec {
    /// JUST_EXEC: no input or output, only an exit status.
    pub just: bool,
    /// Where the data connection's server is: domain and vchan port.
    pub domain: u32,
    pub port: u32,
    pub user: String,
    pub command: String,
}

impl Exec {
    /// Decodes an exec request's body.
    pub fn parse(ty: u32, body: &[u8]) -> Result<Self, QrexecError> {
        let just = match ty {
            MSG_EXEC_CMDLINE => false,
            MSG_JUST_EXEC => true,
            other => return Err(QrexecError::Unexpected(other)),
        };
        let (params, cmdline) = (body.get(..8), body.get(8..));
        let (Some(p), Some(cmdline)) = (params, cmdline) else {
            return Err(QrexecError::BadExec);
        };
        let domain = u32::from_le_bytes([p[0], p[1], p[2], p[3]]);
        let port = u32::from_le_bytes([p[4], p[5], p[6], p[7]]);
        // NUL-terminated, no NUL before the end.
        let Some((&0, text)) = cmdline.split_last() else {
            return Err(QrexecError::BadExec);
        };
        if text.contains(&0) {
            return Err(QrexecError::BadExec);
        }
        let text = core::str::from_utf8(text).map_err(|_| QrexecError::BadExec)?;
        let (user, command) = text.split_once(':').ok_or(QrexecError::BadExec)?;
        Ok(Self {
            just,
            domain,
            port,
            user: user.into(),
            command: command.into(),
        })
    }

    /// The `{connect_domain, connect_port}` parameters, as the agent
    /// returns them in CONNECTION_TERMINATED.
    pub fn terminated(&self) -> Vec<u8> {
        let mut p = Vec::with_capacity(8);
        p.extend_from_slice(&self.domain.to_le_bytes());
        p.extend_from_slice(&self.port.to_le_bytes());
        encode(MSG_CONNECTION_TERMINATED, &p)
    }

    /// The qrexec service this command calls (`QUBESRPC <service>[+arg]
    /// <source>`, maybe behind `nogui:`), without its argument; `None` for
    /// a plain command.
    pub fn service(&self) -> Option<&str> {
        let c = self.command.strip_prefix("nogui:").unwrap_or(&self.command);
        let rest = c.strip_prefix("QUBESRPC ")?;
        let descriptor = rest.split(' ').next().unwrap_or("");
        Some(descriptor.split('+').next().unwrap_or(""))
    }
}

/// What the agent does for a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Service {
    /// `qubes.WaitForSession`: there is no session to wait for, done at
    /// once.
    WaitForSession,
    /// `qubes.SuspendPreAll`, `qubes.SuspendPostAll` (dom0 calls them on
    /// every qrexec qube around a host suspend): a firewall VM owns no
    /// device to quiesce, done at once.
    Suspend,
    /// `qubes.SetDateTime`: read the date from stdin, then done.
    SetDateTime,
    /// Anything else: refused (stderr, exit status 127).
    Refused,
}

impl Service {
    pub fn of(exec: &Exec) -> Self {
        match exec.service() {
            Some("qubes.WaitForSession") => Self::WaitForSession,
            Some("qubes.SuspendPreAll" | "qubes.SuspendPostAll") => Self::Suspend,
            Some("qubes.SetDateTime") => Self::SetDateTime,
            _ => Self::Refused,
        }
    }

    /// Whether the service reads its stdin to the end before it finishes.
    fn reads_stdin(self) -> bool {
        self == Self::SetDateTime
    }
}

/// One service call's data connection, the agent's side: HELLO, stdin,
/// then output and exit status. Feed it what arrives (`receive`); send
/// what it returns; `finished` once the exit status went out.
#[derive(Debug)]
pub struct Session {
    pub exec: Exec,
    pub service: Service,
    decoder: Decoder,
    version: Option<u32>,
    stdin: Vec<u8>,
    stdin_closed: bool,
    finished: bool,
}

impl Session {
    /// A session for `exec`, and our HELLO to send once connected.
    pub fn new(exec: Exec) -> (Self, Vec<u8>) {
        let service = Service::of(&exec);
        let s = Self {
            exec,
            service,
            decoder: Decoder::new(),
            version: None,
            stdin: Vec::new(),
            stdin_closed: false,
            finished: false,
        };
        (s, hello())
    }

    pub fn finished(&self) -> bool {
        self.finished
    }

    /// The negotiated protocol version, once dom0's HELLO arrived.
    pub fn version(&self) -> Option<u32> {
        self.version
    }

    /// What the service read on stdin (up to 4 KiB).
    pub fn stdin(&self) -> &[u8] {
        &self.stdin
    }

    /// Handles bytes from dom0; what to send back. An error ends the
    /// session (close the connection without an exit status).
    pub fn receive(&mut self, bytes: &[u8]) -> Result<Vec<u8>, QrexecError> {
        self.decoder.push(bytes);
        let mut out = Vec::new();
        while let Some(m) = self.decoder.next_message() {
            let m = m?;
            if self.finished {
                continue; // late input after the exit status: ignored
            }
            match self.version {
                None => self.version = Some(negotiate(&m)?),
                Some(_) if m.ty == MSG_DATA_STDIN => {
                    if m.body.is_empty() {
                        self.stdin_closed = true;
                    } else if !self.stdin_closed {
                        let room = MAX_STDIN.saturating_sub(self.stdin.len());
                        self.stdin
                            .extend_from_slice(&m.body[..m.body.len().min(room)]);
                    }
                }
                Some(_) => return Err(QrexecError::Unexpected(m.ty)),
            }
        }
        if self.version.is_some() && (!self.service.reads_stdin() || self.stdin_closed) {
            out.extend(self.finish());
        }
        Ok(out)
    }

    /// Ends the service now with what it has (for a peer that never closes
    /// stdin): its output and exit status, once.
    pub fn finish(&mut self) -> Vec<u8> {
        if self.finished || self.version.is_none() {
            return Vec::new();
        }
        self.finished = true;
        let (stderr, status) = match self.service {
            Service::WaitForSession | Service::Suspend | Service::SetDateTime => (String::new(), 0),
            Service::Refused => {
                let what = match self.exec.service() {
                    Some(s) => format!("service {s}"),
                    None => String::from("running commands"),
                };
                (
                    format!("Portcullis (firewall VM): {what} is not offered here\n"),
                    EXIT_NOT_FOUND,
                )
            }
        };
        let mut out = Vec::new();
        if !self.exec.just {
            if !stderr.is_empty() {
                out.extend(encode(MSG_DATA_STDERR, stderr.as_bytes()));
            }
            out.extend(encode(MSG_DATA_STDOUT, &[]));
            out.extend(encode(MSG_DATA_STDERR, &[]));
        }
        out.extend(encode(MSG_DATA_EXIT_CODE, &status.to_le_bytes()));
        out
    }
}

/// The control connection, the agent's side: HELLO, then requests.
#[derive(Debug, Default)]
pub struct Control {
    decoder: Decoder,
    version: Option<u32>,
}

/// What dom0 asked on the control connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Request {
    /// The handshake completed with this version.
    Connected(u32),
    /// Run a service (connect to its data connection).
    Exec(Exec),
    /// A message the agent has no use for (a reply to a call the VM would
    /// have made: it makes none); ignored.
    Ignored(u32),
}

impl Control {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn version(&self) -> Option<u32> {
        self.version
    }

    /// Handles bytes from dom0: the requests in them. An error means the
    /// connection is unusable (dom0 is not speaking qrexec).
    pub fn receive(&mut self, bytes: &[u8]) -> Result<Vec<Request>, QrexecError> {
        self.decoder.push(bytes);
        let mut out = Vec::new();
        while let Some(m) = self.decoder.next_message() {
            let m = m?;
            if self.version.is_none() {
                let v = negotiate(&m)?;
                self.version = Some(v);
                out.push(Request::Connected(v));
                continue;
            }
            out.push(match m.ty {
                MSG_EXEC_CMDLINE | MSG_JUST_EXEC => Request::Exec(Exec::parse(m.ty, &m.body)?),
                MSG_HELLO => return Err(QrexecError::Unexpected(m.ty)),
                other => Request::Ignored(other),
            });
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn exec_body(domain: u32, port: u32, cmd: &[u8]) -> Vec<u8> {
        let mut b = Vec::new();
        b.extend_from_slice(&domain.to_le_bytes());
        b.extend_from_slice(&port.to_le_bytes());
        b.extend_from_slice(cmd);
        b
    }

    fn messages(bytes: &[u8]) -> Vec<(u32, Vec<u8>)> {
        let mut d = Decoder::new();
        d.push(bytes);
        let mut out = Vec::new();
        while let Some(m) = d.next_message() {
            let m = m.unwrap();
            out.push((m.ty, m.body));
        }
        out
    }

    #[test]
    fn control_handshake_then_exec_requests_byte_by_byte() {
        let mut c = Control::new();
        let mut wire = encode(MSG_HELLO, &2u32.to_le_bytes());
        wire.extend(encode(
            MSG_EXEC_CMDLINE,
            &exec_body(0, 513, b"DEFAULT:QUBESRPC qubes.SetDateTime+ dom0\0"),
        ));
        wire.extend(encode(MSG_SERVICE_REFUSED, b"SOCKET7"));
        wire.extend(encode(
            MSG_JUST_EXEC,
            &exec_body(0, 514, b"root:nogui:QUBESRPC qubes.WaitForSession dom0\0"),
        ));
        let mut got = Vec::new();
        for b in &wire {
            got.extend(c.receive(core::slice::from_ref(b)).unwrap());
        }
        assert_eq!(c.version(), Some(2));
        assert_eq!(got.len(), 4);
        assert_eq!(got[0], Request::Connected(2));
        let Request::Exec(e) = &got[1] else {
            panic!("{got:?}")
        };
        assert_eq!(
            (e.just, e.domain, e.port, e.user.as_str()),
            (false, 0, 513, "DEFAULT")
        );
        assert_eq!(e.service(), Some("qubes.SetDateTime"));
        assert_eq!(Service::of(e), Service::SetDateTime);
        assert_eq!(got[2], Request::Ignored(MSG_SERVICE_REFUSED));
        let Request::Exec(e) = &got[3] else {
            panic!("{got:?}")
        };
        assert!(e.just);
        assert_eq!(Service::of(e), Service::WaitForSession);
        for (cmd, service) in [
            ("QUBESRPC qubes.SuspendPreAll dom0", Service::Suspend),
            ("QUBESRPC qubes.SuspendPostAll+ dom0", Service::Suspend),
            ("QUBESRPC qubes.SetDateTimeX dom0", Service::Refused),
            ("QUBESRPC  dom0", Service::Refused),
            ("qubes.SetDateTime", Service::Refused),
        ] {
            let e = Exec {
                command: cmd.into(),
                ..e.clone()
            };
            assert_eq!(Service::of(&e), service, "{cmd}");
        }
        assert_eq!(
            messages(&e.terminated()),
            vec![(MSG_CONNECTION_TERMINATED, exec_body(0, 514, b""))]
        );
    }

    #[test]
    fn hostile_control_input_is_an_error_not_a_panic() {
        // Version 1, a wrong first message, a short HELLO.
        for first in [
            encode(MSG_HELLO, &1u32.to_le_bytes()),
            encode(MSG_EXEC_CMDLINE, &exec_body(0, 1, b"a:b\0")),
            encode(MSG_HELLO, &[3, 0]),
        ] {
            assert!(Control::new().receive(&first).is_err(), "{first:?}");
        }
        let hello = encode(MSG_HELLO, &3u32.to_le_bytes());
        for body in [
            exec_body(0, 1, b"no colon\0"),
            exec_body(0, 1, b"user:cmd"),
            exec_body(0, 1, b"us\0er:cmd\0"),
            exec_body(0, 1, b"user:\xff\0"),
            vec![1, 2, 3],
        ] {
            let mut c = Control::new();
            c.receive(&hello).unwrap();
            let r = c.receive(&encode(MSG_EXEC_CMDLINE, &body));
            assert_eq!(r, Err(QrexecError::BadExec), "{body:?}");
        }
        // A length beyond the limit fails without waiting for the body,
        // and the decoder stays failed.
        let mut c = Control::new();
        c.receive(&hello).unwrap();
        let mut huge = MSG_EXEC_CMDLINE.to_le_bytes().to_vec();
        huge.extend_from_slice(&u32::MAX.to_le_bytes());
        assert_eq!(c.receive(&huge), Err(QrexecError::TooLong(u32::MAX)));
        assert_eq!(c.receive(&hello), Err(QrexecError::Failed));
        // A second HELLO is an error.
        let mut c = Control::new();
        c.receive(&hello).unwrap();
        assert!(c.receive(&hello).is_err());
    }

    fn session(cmd: &[u8], just: bool) -> Session {
        let ty = if just {
            MSG_JUST_EXEC
        } else {
            MSG_EXEC_CMDLINE
        };
        let exec = Exec::parse(ty, &exec_body(0, 600, cmd)).unwrap();
        let (s, hello_out) = Session::new(exec);
        assert_eq!(
            messages(&hello_out),
            vec![(MSG_HELLO, PROTOCOL_VERSION.to_le_bytes().to_vec())]
        );
        s
    }

    #[test]
    fn wait_for_session_finishes_at_once_with_status_0() {
        let mut s = session(b"user:QUBESRPC qubes.WaitForSession dom0\0", false);
        assert!(s.receive(&[]).unwrap().is_empty(), "nothing before HELLO");
        let out = s.receive(&encode(MSG_HELLO, &3u32.to_le_bytes())).unwrap();
        assert_eq!(s.version(), Some(3));
        assert_eq!(
            messages(&out),
            vec![
                (MSG_DATA_STDOUT, vec![]),
                (MSG_DATA_STDERR, vec![]),
                (MSG_DATA_EXIT_CODE, 0u32.to_le_bytes().to_vec())
            ]
        );
        assert!(s.finished());
        // Late stdin is ignored; nothing more is sent.
        let late = encode(MSG_DATA_STDIN, b"x");
        assert!(s.receive(&late).unwrap().is_empty());
        assert!(s.finish().is_empty());
    }

    #[test]
    fn set_date_time_reads_stdin_to_its_end() {
        let mut s = session(b"DEFAULT:QUBESRPC qubes.SetDateTime dom0\0", false);
        assert!(s
            .receive(&encode(MSG_HELLO, &2u32.to_le_bytes()))
            .unwrap()
            .is_empty());
        let mut wire = encode(MSG_DATA_STDIN, b"2026-11-27T23:59:59+00:00");
        wire.extend(encode(MSG_DATA_STDIN, b"\n"));
        assert!(s.receive(&wire).unwrap().is_empty(), "stdin still open");
        let out = s.receive(&encode(MSG_DATA_STDIN, &[])).unwrap();
        assert_eq!(s.stdin(), b"2026-11-27T23:59:59+00:00\n");
        assert_eq!(
            messages(&out).last(),
            Some(&(MSG_DATA_EXIT_CODE, 0u32.to_le_bytes().to_vec()))
        );
        // A peer that never closes stdin: `finish` ends it once.
        let mut s = session(b"DEFAULT:QUBESRPC qubes.SetDateTime dom0\0", false);
        assert!(s.finish().is_empty(), "not before the handshake");
        s.receive(&encode(MSG_HELLO, &3u32.to_le_bytes())).unwrap();
        assert!(!s.finish().is_empty());
        assert!(s.finish().is_empty());
    }

    #[test]
    fn other_services_and_commands_are_refused_with_127() {
        for (cmd, what) in [
            (
                &b"user:QUBESRPC qubes.Filecopy dom0\0"[..],
                "service qubes.Filecopy",
            ),
            (b"root:/bin/sh -c id\0", "running commands"),
        ] {
            let mut s = session(cmd, false);
            let out = s.receive(&encode(MSG_HELLO, &3u32.to_le_bytes())).unwrap();
            let m = messages(&out);
            assert_eq!(m[0].0, MSG_DATA_STDERR);
            let text = String::from_utf8(m[0].1.clone()).unwrap();
            assert!(text.contains(what), "{text}");
            assert_eq!(
                m.last(),
                Some(&(MSG_DATA_EXIT_CODE, EXIT_NOT_FOUND.to_le_bytes().to_vec()))
            );
        }
        // JUST_EXEC: only the exit status.
        let mut s = session(b"user:true\0", true);
        let out = s.receive(&encode(MSG_HELLO, &3u32.to_le_bytes())).unwrap();
        assert_eq!(
            messages(&out),
            vec![(MSG_DATA_EXIT_CODE, EXIT_NOT_FOUND.to_le_bytes().to_vec())]
        );
    }

    #[test]
    fn a_session_refuses_bad_hellos_and_unexpected_messages() {
        let mut s = session(b"u:QUBESRPC qubes.SetDateTime dom0\0", false);
        assert_eq!(
            s.receive(&encode(MSG_HELLO, &1u32.to_le_bytes())),
            Err(QrexecError::OldVersion(1))
        );
        let mut s = session(b"u:QUBESRPC qubes.SetDateTime dom0\0", false);
        s.receive(&encode(MSG_HELLO, &3u32.to_le_bytes())).unwrap();
        assert_eq!(
            s.receive(&encode(MSG_DATA_STDOUT, b"?")),
            Err(QrexecError::Unexpected(MSG_DATA_STDOUT))
        );
        // Stdin beyond 4 KiB is read and dropped.
        let mut s = session(b"u:QUBESRPC qubes.SetDateTime dom0\0", false);
        s.receive(&encode(MSG_HELLO, &3u32.to_le_bytes())).unwrap();
        for _ in 0..3 {
            s.receive(&encode(MSG_DATA_STDIN, &[b'x'; 2000])).unwrap();
        }
        assert_eq!(s.stdin().len(), 4096);
    }
}
