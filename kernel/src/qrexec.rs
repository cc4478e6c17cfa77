//! The qrexec agent of a Qubes firewall VM: the control connection that
//! dom0's qrexec daemon opens (a vchan we serve on port 512, from pages
//! granted to dom0) and one data connection per service call (a vchan we
//! connect to, where dom0 serves it). The protocol and the services'
//! answers are `xen_shim::qrexec` (host-tested); this module moves bytes,
//! from the loop's housekeeping, never on the packet path.
//!
//! Lifecycle: served at start under Qubes (where QubesDB came over vchan);
//! when dom0's daemon goes away (its end exits) the grants are ended and
//! the connection is served again for the next daemon. A service call
//! whose peer stops talking is ended after `SESSION_TIMEOUT_MS` with what
//! it has; a data connection that fails is closed and reported to dom0 as
//! terminated, as the agent does.

use alloc::format;
use alloc::string::String;
use alloc::vec::Vec;

use xen_shim::qrexec::{self as q, Control, Exec, Request, Service, Session};
use xen_shim::vchan::Live;

use crate::clock;
use crate::gnttab::GrantTable;
use crate::vchan::{ServerPages, Vchan};
use crate::xenstore::SharedStore;

/// A service call whose peer neither finishes nor closes is ended after
/// this long.
const SESSION_TIMEOUT_MS: u64 = 10_000;
/// At most this many service calls at once; more are refused (reported
/// terminated at once).
const MAX_SESSIONS: usize = 4;

/// One service call in progress.
struct Call {
    vchan: Vchan,
    session: Session,
    since: u64,
}

pub struct Agent {
    store: SharedStore,
    table: GrantTable,
    pages: ServerPages,
    domid: String,
    control: Option<Vchan>,
    conversation: Control,
    hello_sent: bool,
    calls: Vec<Call>,
}

impl Agent {
    /// Serves the control connection to dom0 (`data/vchan/0/512` in our
    /// XenStore area) with grants from `table`.
    pub fn start(store: SharedStore, table: GrantTable, domid: &str) -> Result<Self, String> {
        let mut agent = Self {
            store,
            table,
            pages: ServerPages::new(),
            domid: domid.into(),
            control: None,
            conversation: Control::new(),
            hello_sent: false,
            calls: Vec::new(),
        };
        agent.serve()?;
        Ok(agent)
    }

    fn serve(&mut self) -> Result<(), String> {
        let path = format!("data/vchan/0/{}", q::VCHAN_PORT);
        let (table, pages) = (&mut self.table, &mut self.pages);
        let vc = self
            .store
            .with(|s| Vchan::serve(s, table, pages, 0, &path))?;
        println!(
            "qrexec: agent serving dom0 on vchan port {} (event channel {})",
            q::VCHAN_PORT,
            vc.port()
        );
        self.control = Some(vc);
        self.conversation = Control::new();
        self.hello_sent = false;
        Ok(())
    }

    /// Moves what is waiting on every connection (each housekeeping round).
    /// False once the agent cannot go on (reported; the firewall goes on
    /// without it).
    pub fn poll(&mut self) -> bool {
        let now = clock::recent_ms();
        if let Err(e) = self.poll_control(now) {
            println!("qrexec: {e}");
            return self.restart();
        }
        self.poll_calls(now);
        true
    }

    fn poll_control(&mut self, now: u64) -> Result<(), String> {
        let Some(vc) = self.control.as_mut() else {
            return Ok(());
        };
        match vc
            .peer()
            .map_err(|e| format!("control connection: {e:?}"))?
        {
            Live::NotYet => return Ok(()),
            Live::Exited => return Err("dom0's daemon closed the control connection".into()),
            Live::Connected => {}
        }
        if !self.hello_sent {
            vc.send_all(&q::hello(), now + 1000)?;
            self.hello_sent = true;
        }
        let mut bytes = Vec::new();
        vc.recv(&mut bytes)
            .map_err(|e| format!("control connection: {e:?}"))?;
        if bytes.is_empty() {
            return Ok(());
        }
        let requests = self
            .conversation
            .receive(&bytes)
            .map_err(|e| format!("from dom0's daemon: {e:?}"))?;
        for r in requests {
            match r {
                Request::Connected(v) => {
                    println!("qrexec: dom0's daemon connected (protocol version {v})")
                }
                Request::Exec(e) => self.start_call(e, now)?,
                Request::Ignored(ty) => println!("qrexec: message type {ty:#x} from dom0 ignored"),
            }
        }
        Ok(())
    }

    /// Connects the data connection of a service call.
    fn start_call(&mut self, exec: Exec, now: u64) -> Result<(), String> {
        let path = format!(
            "/local/domain/{}/data/vchan/{}/{}",
            exec.domain, self.domid, exec.port
        );
        let domain = u16::try_from(exec.domain)
            .ok()
            .filter(|_| self.calls.len() < MAX_SESSIONS);
        let connected = match domain {
            Some(d) => self.store.with(|s| Vchan::connect(s, d, &path)),
            None => Err(String::from("too many calls at once, or no such domain")),
        };
        match connected {
            Ok(mut vchan) => {
                let (session, hello) = Session::new(exec);
                vchan.send_all(&hello, now + 1000)?;
                self.calls.push(Call {
                    vchan,
                    session,
                    since: now,
                });
            }
            Err(e) => {
                println!("qrexec: '{}:{}': {e}", exec.user, exec.command);
                self.control_send(&exec.terminated(), now)?;
            }
        }
        Ok(())
    }

    fn control_send(&mut self, bytes: &[u8], now: u64) -> Result<(), String> {
        match self.control.as_mut() {
            Some(vc) => vc.send_all(bytes, now + 1000),
            None => Ok(()),
        }
    }

    fn poll_calls(&mut self, now: u64) {
        let mut i = 0;
        while i < self.calls.len() {
            let c = &mut self.calls[i];
            let mut bytes = Vec::new();
            let step = c
                .vchan
                .recv(&mut bytes)
                .map_err(|e| format!("{e:?}"))
                .and_then(|_| c.session.receive(&bytes).map_err(|e| format!("{e:?}")))
                .map(|mut out| {
                    if out.is_empty() && now.saturating_sub(c.since) > SESSION_TIMEOUT_MS {
                        out = c.session.finish();
                    }
                    out
                })
                .and_then(|out| c.vchan.send_all(&out, now + 1000));
            let peer_gone = matches!(c.vchan.peer(), Ok(Live::Exited) | Err(_));
            let timed_out = now.saturating_sub(c.since) > 2 * SESSION_TIMEOUT_MS;
            if step.is_ok() && !c.session.finished() && !peer_gone && !timed_out {
                i += 1;
                continue;
            }
            let c = self.calls.swap_remove(i);
            report(&c.session, step.err());
            c.vchan.close();
            if let Err(e) = self.control_send(&c.session.exec.terminated(), now) {
                println!("qrexec: {e}");
            }
        }
    }

    /// Tears the control connection down and serves it again; false when
    /// dom0 still maps our pages (they cannot be reused).
    fn restart(&mut self) -> bool {
        for c in self.calls.drain(..) {
            c.vchan.close();
        }
        if let Some(vc) = self.control.take() {
            vc.close();
        }
        if !self.pages.end(&mut self.table) {
            println!("qrexec: dom0 still maps the control connection's pages; the agent stops");
            return false;
        }
        match self.serve() {
            Ok(()) => true,
            Err(e) => {
                println!("qrexec: serving again: {e}; the agent stops");
                false
            }
        }
    }
}

/// One line per finished call: what was asked, what was answered.
fn report(s: &Session, error: Option<String>) {
    let what = match s.exec.service() {
        Some(name) => format!("{name} from domain {}", s.exec.domain),
        None => format!("command '{}' from domain {}", s.exec.command, s.exec.domain),
    };
    let outcome = match (error, s.finished(), s.service) {
        (Some(e), _, _) => format!("failed: {e}"),
        (None, false, _) => String::from("ended: the peer went away"),
        (None, true, Service::Refused) => format!("refused (exit {})", q::EXIT_NOT_FOUND),
        (None, true, Service::SetDateTime) => {
            // dom0's bytes, shown tamed: printable ASCII, 64 at most.
            let date: String = s
                .stdin()
                .iter()
                .take(64)
                .map(|&b| {
                    if (0x20..0x7f).contains(&b) {
                        b as char
                    } else {
                        '?'
                    }
                })
                .collect();
            format!("dom0's date is '{}'; exit 0", date.trim_end_matches('?'))
        }
        (None, true, Service::WaitForSession) => String::from("no session to wait for; exit 0"),
        (None, true, Service::Suspend) => String::from("nothing to quiesce; exit 0"),
    };
    println!("qrexec: {what}: {outcome}");
}
