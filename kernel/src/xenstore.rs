//! A polling XenStore client over the shared ring Xen gives the domain
//! (`HVM_PARAM_STORE_PFN` / `HVM_PARAM_STORE_EVTCHN`). One request at a
//! time; every index and reply header from xenstored is checked
//! (`xen_shim::xenstore`) and a bad one is an error, never a panic or a
//! hang: each wait has a deadline.

use alloc::collections::VecDeque;
use alloc::string::String;
use alloc::vec::Vec;
use core::sync::atomic::{fence, AtomicU32, Ordering};

use xen_shim::hypercall::{HVM_PARAM_STORE_EVTCHN, HVM_PARAM_STORE_PFN};
use xen_shim::xenstore::{self as xs, XsError};

use crate::{clock, phys, xen};

/// How long one request may wait for room or for its reply.
const TIMEOUT_MS: u64 = 2000;
/// Runs of a transaction that keeps meeting conflicting changes, at most.
const TRANSACTION_TRIES: u32 = 8;

pub struct XenStore {
    page: u64,
    port: u32,
    next_id: u32,
    /// Watch events that arrived while a reply was awaited.
    events: VecDeque<(String, String)>,
}

/// Room for queued watch events, reserved once: a burst (a client's
/// device directory removed fires an event per node) fits without the
/// queue growing, so the heap after a client's restart is what it was
/// after the previous one.
const EVENT_ROOM: usize = 64;

/// Requests inside a transaction (`XenStore::transaction`).
pub struct Transaction<'a> {
    store: &'a mut XenStore,
    id: u32,
}

impl Transaction<'_> {
    pub fn read(&mut self, path: &str) -> Result<String, XsError> {
        self.store.read_in(path, self.id)
    }

    pub fn write(&mut self, path: &str, value: &str) -> Result<(), XsError> {
        self.store.write_in(path, value, self.id)
    }

    /// The store itself, for a request outside the transaction (the boot
    /// report makes a conflict with it).
    pub fn outside(&mut self) -> &mut XenStore {
        self.store
    }
}

fn index(page: u64, off: usize) -> &'static AtomicU32 {
    // SAFETY: `off` is one of the four 4-aligned index fields inside the
    // XenStore page, which Xen placed in this domain's memory for its life;
    // xenstored updates them concurrently, hence atomics.
    unsafe { AtomicU32::from_ptr((page as usize + off) as *mut u32) }
}

impl XenStore {
    /// The domain's XenStore ring, if Xen gave one in mapped memory.
    pub fn open() -> Option<Self> {
        let pfn = xen::hvm_param(HVM_PARAM_STORE_PFN)?;
        let port = u32::try_from(xen::hvm_param(HVM_PARAM_STORE_EVTCHN)?).ok()?;
        let page = pfn << 12;
        (pfn != 0 && port != 0 && phys::is_mapped(page, 4096)).then_some(Self {
            page,
            port,
            next_id: 1,
            events: VecDeque::with_capacity(EVENT_ROOM),
        })
    }

    fn send(&mut self, msg: &[u8]) -> Result<(), XsError> {
        let (prod_ix, cons_ix) = (
            index(self.page, xs::REQ_PROD),
            index(self.page, xs::REQ_CONS),
        );
        let mut prod = prod_ix.load(Ordering::Relaxed);
        let deadline = clock::now_ms() + TIMEOUT_MS;
        for &b in msg {
            // Acquire: xenstored finished reading the slots it released.
            while xs::used(prod, cons_ix.load(Ordering::Acquire))? >= xs::RING_SIZE {
                if clock::now_ms() > deadline {
                    return Err(XsError::Timeout);
                }
                core::hint::spin_loop();
            }
            let slot = self.page as usize + xs::REQ + (prod % xs::RING_SIZE) as usize;
            // SAFETY: a free slot of the request ring inside the page.
            unsafe { (slot as *mut u8).write_volatile(b) };
            prod = prod.wrapping_add(1);
        }
        // Release: the message bytes before the index that publishes them;
        // then a full fence before the notification.
        prod_ix.store(prod, Ordering::Release);
        fence(Ordering::SeqCst);
        xen::notify(self.port);
        Ok(())
    }

    fn receive(&mut self, out: &mut [u8], deadline: u64) -> Result<(), XsError> {
        let (prod_ix, cons_ix) = (
            index(self.page, xs::RSP_PROD),
            index(self.page, xs::RSP_CONS),
        );
        let mut cons = cons_ix.load(Ordering::Relaxed);
        for b in out.iter_mut() {
            // Acquire: the reply bytes are read after the index covering them.
            while xs::used(prod_ix.load(Ordering::Acquire), cons)? == 0 {
                if clock::now_ms() > deadline {
                    return Err(XsError::Timeout);
                }
                core::hint::spin_loop();
            }
            let slot = self.page as usize + xs::RSP + (cons % xs::RING_SIZE) as usize;
            // SAFETY: a filled slot of the response ring inside the page.
            *b = unsafe { (slot as *const u8).read_volatile() };
            cons = cons.wrapping_add(1);
        }
        // Release: our reads are done before xenstored may reuse the slots.
        cons_ix.store(cons, Ordering::Release);
        fence(Ordering::SeqCst);
        xen::notify(self.port);
        Ok(())
    }

    /// Sends request `msg` (made with id `id`) and returns the payload of
    /// its reply of type `kind`.
    fn transact(&mut self, kind: u32, id: u32, msg: &[u8]) -> Result<Vec<u8>, XsError> {
        self.send(msg)?;
        let deadline = clock::now_ms() + TIMEOUT_MS;
        loop {
            let (h, payload) = self.message(deadline)?;
            if h.kind == xs::XS_WATCH_EVENT {
                self.events.push_back(xs::watch_event(&h, &payload)?);
                continue;
            }
            if h.req_id != id {
                continue; // a stale reply: not ours
            }
            return xs::check_reply(&h, &payload, kind, id);
        }
    }

    /// The next message from xenstored: header and payload.
    fn message(&mut self, deadline: u64) -> Result<(xs::Header, Vec<u8>), XsError> {
        let mut raw = [0u8; xs::HEADER];
        self.receive(&mut raw, deadline)?;
        let h = xs::Header::parse(&raw)?;
        let mut payload: Vec<u8> = alloc::vec![0; h.len as usize];
        self.receive(&mut payload, deadline)?;
        Ok((h, payload))
    }

    /// Watches `path` (and below); events carry `token`. xenstored sends
    /// one event at once, then one per change.
    pub fn watch(&mut self, path: &str, token: &str) -> Result<(), XsError> {
        let id = self.id();
        self.transact(xs::XS_WATCH, id, &xs::watch(id, path, token)?)
            .map(|_| ())
    }

    /// Removes the watch made with `path` and `token`.
    pub fn unwatch(&mut self, path: &str, token: &str) -> Result<(), XsError> {
        let id = self.id();
        self.transact(xs::XS_UNWATCH, id, &xs::unwatch(id, path, token)?)
            .map(|_| ())
    }

    /// The watch events that have arrived, without waiting for any: for a
    /// polling loop. Messages already begun are read to their end (with
    /// the usual deadline); late replies are skipped.
    pub fn poll_events(&mut self) -> Result<Vec<(String, String)>, XsError> {
        let (prod_ix, cons_ix) = (
            index(self.page, xs::RSP_PROD),
            index(self.page, xs::RSP_CONS),
        );
        loop {
            // Acquire: as in `receive`.
            let waiting = xs::used(
                prod_ix.load(Ordering::Acquire),
                cons_ix.load(Ordering::Relaxed),
            )?;
            if waiting == 0 {
                return Ok(self.events.drain(..).collect());
            }
            let (h, payload) = self.message(clock::now_ms() + TIMEOUT_MS)?;
            if h.kind == xs::XS_WATCH_EVENT {
                self.events.push_back(xs::watch_event(&h, &payload)?);
            }
        }
    }

    /// As `poll_events`, for the events whose token is one of `tokens`;
    /// the others stay queued for whoever watches with them.
    pub fn poll_events_for(&mut self, tokens: &[&str]) -> Result<Vec<(String, String)>, XsError> {
        let all = self.poll_events()?;
        let (mine, others): (Vec<_>, Vec<_>) = all
            .into_iter()
            .partition(|(_, token)| tokens.contains(&token.as_str()));
        self.events.extend(others);
        Ok(mine)
    }

    /// The event channel xenstored signals.
    pub fn port(&self) -> u32 {
        self.port
    }

    /// The next watch event (path, token), waiting at most `timeout_ms`.
    pub fn next_event(&mut self, timeout_ms: u64) -> Result<(String, String), XsError> {
        if let Some(e) = self.events.pop_front() {
            return Ok(e);
        }
        let deadline = clock::now_ms() + timeout_ms;
        loop {
            let (h, payload) = self.message(deadline)?;
            if h.kind == xs::XS_WATCH_EVENT {
                return xs::watch_event(&h, &payload);
            }
            // A late reply to an earlier request: nothing waits for it.
        }
    }

    fn id(&mut self) -> u32 {
        let id = self.next_id;
        self.next_id = self.next_id.wrapping_add(1);
        id
    }

    /// Reads `path` (relative to the domain's own node unless absolute).
    pub fn read(&mut self, path: &str) -> Result<String, XsError> {
        self.read_in(path, 0)
    }

    /// Writes `value` to `path`.
    pub fn write(&mut self, path: &str, value: &str) -> Result<(), XsError> {
        self.write_in(path, value, 0)
    }

    /// Removes `path` and everything under it.
    pub fn remove(&mut self, path: &str) -> Result<(), XsError> {
        let id = self.id();
        self.transact(xs::XS_RM, id, &xs::remove(id, path)?)
            .map(|_| ())
    }

    fn read_in(&mut self, path: &str, tx: u32) -> Result<String, XsError> {
        let id = self.id();
        let msg = xs::in_transaction(xs::read(id, path)?, tx);
        let value = self.transact(xs::XS_READ, id, &msg)?;
        String::from_utf8(value).map_err(|_| XsError::NotText)
    }

    fn write_in(&mut self, path: &str, value: &str, tx: u32) -> Result<(), XsError> {
        let id = self.id();
        let msg = xs::in_transaction(xs::write(id, path, value)?, tx);
        self.transact(xs::XS_WRITE, id, &msg).map(|_| ())
    }

    /// Runs `body` in a transaction and commits it: xenstored applies its
    /// writes all at once, or not at all. A commit refused with `EAGAIN`
    /// (something the transaction touched changed meanwhile) runs `body`
    /// again from the start, up to `TRANSACTION_TRIES` times; an error
    /// from `body` aborts the transaction and is returned.
    pub fn transaction<T>(
        &mut self,
        mut body: impl FnMut(&mut Transaction<'_>) -> Result<T, XsError>,
    ) -> Result<T, XsError> {
        let mut tries = 0;
        loop {
            tries += 1;
            let id = self.id();
            let reply = self.transact(xs::XS_TRANSACTION_START, id, &xs::transaction_start(id)?)?;
            let tx = xs::transaction_id(&reply)?;
            let result = body(&mut Transaction {
                store: self,
                id: tx,
            });
            let id = self.id();
            let end = xs::transaction_end(id, tx, result.is_ok())?;
            let ended = self.transact(xs::XS_TRANSACTION_END, id, &end);
            match (result, ended) {
                (Err(e), _) => return Err(e),
                (Ok(v), Ok(_)) => return Ok(v),
                (Ok(_), Err(e)) if xs::must_retry(&e) && tries < TRANSACTION_TRIES => {}
                (Ok(_), Err(e)) => return Err(e),
            }
        }
    }

    /// The names of `path`'s children.
    pub fn directory(&mut self, path: &str) -> Result<Vec<String>, XsError> {
        let id = self.id();
        let payload = self.transact(xs::XS_DIRECTORY, id, &xs::directory(id, path)?)?;
        xs::directory_entries(&payload)
    }
}

static SHARED: spin::Once<spin::Mutex<XenStore>> = spin::Once::new();

/// The domain's one XenStore connection, shared by the devices that follow
/// XenStore from the loop (the uplink's netfront, the client vifs' netback):
/// each request holds it for its own length. Never used inside another
/// request (a transaction's body gets its `Transaction`).
#[derive(Clone, Copy)]
pub struct SharedStore(&'static spin::Mutex<XenStore>);

impl SharedStore {
    /// Shares `store` from now on (once: a second call gets the first).
    pub fn install(store: XenStore) -> Self {
        Self(SHARED.call_once(|| spin::Mutex::new(store)))
    }

    pub fn read(&mut self, path: &str) -> Result<String, XsError> {
        self.0.lock().read(path)
    }

    pub fn write(&mut self, path: &str, value: &str) -> Result<(), XsError> {
        self.0.lock().write(path, value)
    }

    /// Several requests in a row, for code written against a `XenStore`
    /// (vchan's connect and serve).
    pub fn with<T>(&mut self, body: impl FnOnce(&mut XenStore) -> T) -> T {
        body(&mut self.0.lock())
    }

    pub fn directory(&mut self, path: &str) -> Result<Vec<String>, XsError> {
        self.0.lock().directory(path)
    }

    pub fn watch(&mut self, path: &str, token: &str) -> Result<(), XsError> {
        self.0.lock().watch(path, token)
    }

    pub fn unwatch(&mut self, path: &str, token: &str) -> Result<(), XsError> {
        self.0.lock().unwatch(path, token)
    }

    pub fn remove(&mut self, path: &str) -> Result<(), XsError> {
        self.0.lock().remove(path)
    }

    pub fn transaction<T>(
        &mut self,
        body: impl FnMut(&mut Transaction<'_>) -> Result<T, XsError>,
    ) -> Result<T, XsError> {
        self.0.lock().transaction(body)
    }

    pub fn poll_events_for(&mut self, tokens: &[&str]) -> Result<Vec<(String, String)>, XsError> {
        self.0.lock().poll_events_for(tokens)
    }

    pub fn port(&self) -> u32 {
        self.0.lock().port()
    }
}
