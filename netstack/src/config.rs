//! The configuration model: QubesDB keys, whatever transport brought them.
//!
//! Under QEMU the keys come from a text snapshot (`<path> <value>` per line)
//! passed through fw_cfg and from `<path>=<value>` command-line tokens;
//! under Xen they will come from QubesDB over vchan. `NetConfig::from_db`
//! turns them into the addresses and per-client rule sets the firewall
//! uses. A missing or malformed address key is an error naming the key (the
//! kernel then refuses to forward); a client whose rules do not parse keeps
//! the error, and all its traffic is dropped.

use alloc::collections::BTreeMap;
use alloc::string::{String, ToString};
use alloc::vec::Vec;
use core::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use crate::rules::{RuleError, Ruleset};

/// Longest QubesDB path (the protocol's fixed field is 64 bytes).
pub const MAX_PATH: usize = 63;
/// Longest QubesDB value.
pub const MAX_VALUE: usize = 3072;

/// A QubesDB snapshot: path → value.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct QubesDb {
    entries: BTreeMap<String, String>,
}

/// A refused QubesDB entry or snapshot line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DbError {
    /// Line `line` of a snapshot is not `<path> <value>` with an absolute path.
    BadLine {
        line: usize,
    },
    BadPath(String),
    ValueTooLong(String),
}

impl core::fmt::Display for DbError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            Self::BadLine { line } => {
                write!(f, "qubesdb snapshot line {line}: expected '<path> <value>'")
            }
            Self::BadPath(p) => write!(
                f,
                "qubesdb path '{p}' is not an absolute path of at most {MAX_PATH} bytes"
            ),
            Self::ValueTooLong(p) => {
                write!(f, "qubesdb value of '{p}' is longer than {MAX_VALUE} bytes")
            }
        }
    }
}

impl QubesDb {
    pub fn new() -> Self {
        Self::default()
    }

    /// Parses a snapshot: one entry per line, `<path> <value>`, the value
    /// running to the end of the line (it may be empty or hold spaces).
    /// Blank lines and lines starting with `#` are skipped.
    pub fn parse_snapshot(text: &str) -> Result<Self, DbError> {
        let mut db = Self::new();
        for (i, line) in text.lines().enumerate() {
            let line = line.trim_end_matches('\r');
            if line.trim().is_empty() || line.starts_with('#') {
                continue;
            }
            let (path, value) = line.split_once(' ').unwrap_or((line, ""));
            if !path.starts_with('/') {
                return Err(DbError::BadLine { line: i + 1 });
            }
            db.set(path, value)?;
        }
        Ok(db)
    }

    pub fn set(&mut self, path: &str, value: &str) -> Result<(), DbError> {
        if !path.starts_with('/')
            || path.len() > MAX_PATH
            || path.chars().any(|c| c.is_whitespace())
        {
            return Err(DbError::BadPath(path.into()));
        }
        if value.len() > MAX_VALUE {
            return Err(DbError::ValueTooLong(path.into()));
        }
        self.entries.insert(path.into(), value.into());
        Ok(())
    }

    pub fn get(&self, path: &str) -> Option<&str> {
        self.entries.get(path).map(String::as_str)
    }

    /// Entries whose path starts with `prefix`.
    pub fn under<'a>(&'a self, prefix: &'a str) -> impl Iterator<Item = (&'a str, &'a str)> + 'a {
        self.entries
            .range::<str, _>((
                core::ops::Bound::Included(prefix),
                core::ops::Bound::Unbounded,
            ))
            .take_while(move |(k, _)| k.starts_with(prefix))
            .map(|(k, v)| (k.as_str(), v.as_str()))
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}

/// A client VM behind the firewall.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientConfig {
    /// One of the client's addresses (from `/connected-ips` or
    /// `/connected-ips6`); each address has its own rules.
    pub ip: IpAddr,
    /// The client's rules, or why they were refused (then all its traffic
    /// is dropped).
    pub rules: Result<Ruleset, RuleError>,
}

/// Everything the firewall needs to know about its addresses and clients.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NetConfig {
    /// Own address on the uplink (`/qubes-ip`) and its prefix length.
    pub uplink_ip: Ipv4Addr,
    pub uplink_prefix: u8,
    /// Upstream gateway (`/qubes-gateway`).
    pub gateway: Ipv4Addr,
    /// Upstream DNS servers (`/qubes-primary-dns`, `/qubes-secondary-dns`).
    pub upstream_dns: [Option<Ipv4Addr>; 2],
    /// Own address towards clients (`/qubes-netvm-gateway`).
    pub client_gateway: Ipv4Addr,
    pub client_prefix: u8,
    /// Virtual DNS addresses clients query (`/qubes-netvm-*-dns`).
    pub virtual_dns: [Option<Ipv4Addr>; 2],
    /// IPv6 forwarding, when the keys for it are all present.
    pub ip6: Option<Ipv6Config>,
    pub clients: Vec<ClientConfig>,
}

/// The IPv6 addresses of a firewall VM that forwards IPv6: on when
/// `/qubes-ip6`, `/qubes-gateway6` and `/qubes-netvm-gateway6` are all
/// set (Qubes writes them when the `ipv6` feature is on for this VM and
/// its upstream); otherwise IPv6 is off and every IPv6 frame is dropped.
/// Clients' IPv6 traffic leaves with the uplink address (masquerade), as
/// Qubes's `ip6 qubes` table does; everything off-link goes through the
/// gateway.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ipv6Config {
    /// Own address on the uplink (`/qubes-ip6`).
    pub uplink_ip: Ipv6Addr,
    /// Upstream gateway (`/qubes-gateway6`).
    pub gateway: Ipv6Addr,
    /// Own address towards clients (`/qubes-netvm-gateway6`).
    pub client_gateway: Ipv6Addr,
}

/// A configuration key that is missing or does not parse.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    pub key: String,
    pub problem: &'static str,
}

impl core::fmt::Display for ConfigError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        write!(f, "{}: {}", self.key, self.problem)
    }
}

fn netmask_prefix(mask: Ipv4Addr) -> Option<u8> {
    let m = u32::from(mask);
    let len = m.leading_ones();
    (m.checked_shl(len).unwrap_or(0) == 0).then_some(len as u8)
}

impl NetConfig {
    /// The connected clients (`/connected-ips`, `/connected-ips6`), each
    /// with its rules from `/qubes-firewall/<ip>/` (or why they were
    /// refused): what `from_db` takes, and what the firewall takes again
    /// when dom0 changes the list (`Firewall::set_clients`).
    pub fn clients_from_db(db: &QubesDb) -> Result<Vec<ClientConfig>, ConfigError> {
        let mut clients: Vec<ClientConfig> = Vec::new();
        for (key, problem) in [
            ("/connected-ips", "not a list of IPv4 addresses"),
            ("/connected-ips6", "not a list of IPv6 addresses"),
        ] {
            let v4 = key == "/connected-ips";
            for word in db.get(key).unwrap_or("").split_whitespace() {
                let client: IpAddr = match (v4, word.parse::<IpAddr>()) {
                    (true, Ok(a @ IpAddr::V4(_))) | (false, Ok(a @ IpAddr::V6(_))) => a,
                    _ => {
                        return Err(ConfigError {
                            key: key.to_string(),
                            problem,
                        })
                    }
                };
                if clients.iter().any(|c| c.ip == client) {
                    continue;
                }
                let prefix = alloc::format!("/qubes-firewall/{client}/");
                let entries = db.under(&prefix).map(|(k, v)| (&k[prefix.len()..], v));
                clients.push(ClientConfig {
                    ip: client,
                    rules: Ruleset::from_entries(entries, v4),
                });
            }
        }
        Ok(clients)
    }

    pub fn from_db(db: &QubesDb) -> Result<Self, ConfigError> {
        let err = |key: &str, problem| ConfigError {
            key: key.to_string(),
            problem,
        };
        let ip = |key: &str| -> Result<Ipv4Addr, ConfigError> {
            db.get(key)
                .ok_or_else(|| err(key, "missing"))?
                .parse()
                .map_err(|_| err(key, "not an IPv4 address"))
        };
        let opt_ip = |key: &str| -> Result<Option<Ipv4Addr>, ConfigError> {
            match db.get(key) {
                None | Some("") => Ok(None),
                Some(v) => v
                    .parse()
                    .map(Some)
                    .map_err(|_| err(key, "not an IPv4 address")),
            }
        };
        let prefix = |key: &str, default: u8| -> Result<u8, ConfigError> {
            match db.get(key) {
                None => Ok(default),
                Some(v) => v
                    .parse()
                    .ok()
                    .and_then(netmask_prefix)
                    .ok_or_else(|| err(key, "not a contiguous IPv4 netmask")),
            }
        };
        let ip6 = |key: &str| -> Result<Option<Ipv6Addr>, ConfigError> {
            match db.get(key) {
                None | Some("") => Ok(None),
                Some(v) => v
                    .parse()
                    .map(Some)
                    .map_err(|_| err(key, "not an IPv6 address")),
            }
        };
        let clients = Self::clients_from_db(db)?;
        let ip6 = match (
            ip6("/qubes-ip6")?,
            ip6("/qubes-gateway6")?,
            ip6("/qubes-netvm-gateway6")?,
        ) {
            (Some(uplink_ip), Some(gateway), Some(client_gateway)) => Some(Ipv6Config {
                uplink_ip,
                gateway,
                client_gateway,
            }),
            _ => None,
        };
        Ok(Self {
            uplink_ip: ip("/qubes-ip")?,
            uplink_prefix: prefix("/qubes-netmask", 32)?,
            gateway: ip("/qubes-gateway")?,
            upstream_dns: [
                opt_ip("/qubes-primary-dns")?,
                opt_ip("/qubes-secondary-dns")?,
            ],
            client_gateway: ip("/qubes-netvm-gateway")?,
            client_prefix: prefix("/qubes-netvm-netmask", 32)?,
            virtual_dns: [
                opt_ip("/qubes-netvm-primary-dns")?,
                opt_ip("/qubes-netvm-secondary-dns")?,
            ],
            ip6,
            clients,
        })
    }

    /// Whether `ip` is on the uplink's link (reached without the
    /// gateway): on its subnet, or the gateway itself — Qubes gives a VM a
    /// /32 address (`/qubes-netmask` 255.255.255.255) and a gateway
    /// outside it, as it does a firewall VM behind another.
    #[inline]
    pub fn on_uplink_subnet(&self, ip: Ipv4Addr) -> bool {
        let mask = crate::wire::prefix_mask(self.uplink_prefix);
        (u32::from(ip) ^ u32::from(self.uplink_ip)) & mask == 0 || ip == self.gateway
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rules::Action;

    pub(crate) const SAMPLE: &str = "\
/qubes-ip 10.0.2.15
/qubes-netmask 255.255.255.0
/qubes-gateway 10.0.2.2
/qubes-primary-dns 10.0.2.3
/qubes-netvm-gateway 10.137.0.1
/qubes-netvm-netmask 255.255.255.255
/qubes-netvm-primary-dns 10.139.1.1
/qubes-netvm-secondary-dns 10.139.1.2
/connected-ips 10.137.0.10 10.137.0.11
/qubes-firewall/10.137.0.10/policy drop
/qubes-firewall/10.137.0.10/0000 action=accept proto=tcp dstports=5201-5201
/qubes-firewall/10.137.0.10/0001 action=accept specialtarget=dns
/qubes-firewall/10.137.0.11/policy accept
/qubes-firewall/10.137.0.11/0000 action=accept proto=bogus
/qubes-firewall/10.137.0.10
";

    #[test]
    fn snapshot_to_config() {
        let db = QubesDb::parse_snapshot(SAMPLE).unwrap();
        assert_eq!(db.get("/qubes-firewall/10.137.0.10"), Some(""));
        let c = NetConfig::from_db(&db).unwrap();
        assert_eq!(c.uplink_ip, Ipv4Addr::new(10, 0, 2, 15));
        assert_eq!((c.uplink_prefix, c.client_prefix), (24, 32));
        assert_eq!(c.upstream_dns, [Some(Ipv4Addr::new(10, 0, 2, 3)), None]);
        assert_eq!(c.virtual_dns[1], Some(Ipv4Addr::new(10, 139, 1, 2)));
        assert_eq!(c.clients.len(), 2);
        let rs = c.clients[0].rules.as_ref().unwrap();
        assert_eq!((rs.rules.len(), rs.policy), (2, Action::Drop));
        assert!(
            c.clients[1].rules.is_err(),
            "a bad rule fails the whole client closed"
        );
        assert!(c.on_uplink_subnet(Ipv4Addr::new(10, 0, 2, 200)));
        assert!(!c.on_uplink_subnet(Ipv4Addr::new(10, 0, 3, 1)));
        // A /32 uplink (a firewall VM behind another): its gateway is on
        // the link, nothing else is.
        let mut narrow = c.clone();
        narrow.uplink_prefix = 32;
        assert!(narrow.on_uplink_subnet(narrow.gateway));
        assert!(!narrow.on_uplink_subnet(Ipv4Addr::new(10, 0, 2, 200)));
    }

    #[test]
    fn missing_and_bad_keys_are_named() {
        let mut db = QubesDb::parse_snapshot(SAMPLE).unwrap();
        db.set("/qubes-gateway", "10.0.2").unwrap();
        assert_eq!(NetConfig::from_db(&db).unwrap_err().key, "/qubes-gateway");
        db.set("/qubes-gateway", "10.0.2.2").unwrap();
        db.set("/qubes-netmask", "255.0.255.0").unwrap();
        assert_eq!(NetConfig::from_db(&db).unwrap_err().key, "/qubes-netmask");
        assert_eq!(
            NetConfig::from_db(&QubesDb::new()).unwrap_err().problem,
            "missing"
        );
        db.set("/qubes-netmask", "255.255.255.0").unwrap();
        db.set("/connected-ips", "10.137.0.10 nope").unwrap();
        assert_eq!(NetConfig::from_db(&db).unwrap_err().key, "/connected-ips");
    }

    #[test]
    fn snapshot_errors() {
        assert_eq!(
            QubesDb::parse_snapshot("qubes-ip 1.2.3.4"),
            Err(DbError::BadLine { line: 1 })
        );
        assert!(QubesDb::parse_snapshot(&alloc::format!("/{} x", "a".repeat(70))).is_err());
        let db = QubesDb::parse_snapshot("# comment\n\n/a b c \n").unwrap();
        assert_eq!(db.get("/a"), Some("b c "));
        assert_eq!(netmask_prefix(Ipv4Addr::new(255, 255, 255, 255)), Some(32));
        assert_eq!(netmask_prefix(Ipv4Addr::new(0, 0, 0, 0)), Some(0));
    }
}
