//! The boot command line: whitespace-separated `key=value` tokens.
//!
//! Tokens whose key starts with `/` are QubesDB entries (`/qubes-ip=...`)
//! that override the snapshot the kernel was given; `qubesdb_overrides`
//! lists them. Every other token must be understood. A token the kernel does not know, a token
//! without `=`, or a value out of range is an error that names the token; the
//! kernel then refuses to run rather than guess what was meant.

use log::LevelFilter;

/// A deliberate fault, for tests that check the exception reporter.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TestFault {
    /// Read from an unmapped address: #PF (vector 14).
    PageFault,
    /// Execute `ud2`: #UD (vector 6).
    InvalidOpcode,
    /// Call `panic!`.
    Panic,
}

/// How the dataplane is spread over the CPUs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Layout {
    /// Everything on the boot CPU.
    Single,
    /// NICs on the boot CPU, the firewall stage on a second CPU, joined by
    /// rings.
    Pipeline,
    /// Run to completion: each CPU owns one queue pair of every NIC and a
    /// firewall of its own; frames of flows another CPU owns are handed to
    /// it over rings.
    Rtc,
}

impl Layout {
    pub fn name(self) -> &'static str {
        match self {
            Self::Single => "single",
            Self::Pipeline => "pipeline",
            Self::Rtc => "rtc",
        }
    }
}

/// What a polling loop does when a round found no work.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Idle {
    /// Spin with `pause`: the lowest latency; the vCPU stays busy.
    Poll,
    /// After a few empty rounds, halt until the local APIC timer (every
    /// `wake_us` microseconds) wakes the core: the vCPU sleeps, a packet
    /// waits at most that long.
    Halt { wake_us: u32 },
}

/// Default wake-up period of `idle=halt`.
pub const DEFAULT_WAKE_US: u32 = 100;

/// What the command line configures.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BootConfig {
    pub log_level: LevelFilter,
    pub test_fault: Option<TestFault>,
    /// Print the counters every this many seconds (0: only on demand).
    pub stats_interval_s: u32,
    /// `None`: chosen by the CPUs online.
    pub layout: Option<Layout>,
    pub idle: Idle,
    /// `firewall=off`: forward without filtering (the benchmark's limit
    /// mode, `Firewall::set_forward_only`); never for deployment.
    pub firewall_off: bool,
    /// `generate=LEN`: the traffic generator sends synthetic UDP frames of
    /// LEN bytes (60-1514) out of the uplink as fast as it can.
    pub generate: Option<u16>,
    /// `queues=N`: receive/transmit queue pairs asked of each virtio NIC
    /// (1-16; a device offering fewer gives what it has).
    pub queues: u16,
    /// `clients=N`: client vifs served under Xen (Qubes's firewall VM
    /// role), 1-`MAX_CLIENTS`: each is a dataplane port.
    pub clients: usize,
    /// `xen-wake-us=N`: under Xen, the longest an idle loop blocks in Xen
    /// (`SCHEDOP_poll`) before it looks around anyway. Frames wake it
    /// through their event channels at once; the timeout is for the rest
    /// (XenStore, QubesDB, qrexec, the console, the housekeeping timers).
    pub xen_wake_us: u32,
}

/// `xen-wake-us` when not given: the housekeeping period
/// (`dataplane::HOUSEKEEPING_MS`), so an idle firewall VM wakes a hundred
/// times a second, not ten thousand.
pub const DEFAULT_XEN_WAKE_US: u32 = 10_000;

/// Client vifs served when `clients=` is not given.
pub const DEFAULT_CLIENTS: usize = 32;
/// The most client vifs: a blocked loop waits on every client's event
/// channel and the uplink's in one `SCHEDOP_poll`, which takes at most
/// 128 ports; and each client's frontend state is watched in XenStore,
/// whose default quota is 128 watches a domain (a few are the uplink's
/// and the configuration's).
pub const MAX_CLIENTS: usize = 100;

impl Default for BootConfig {
    fn default() -> Self {
        Self {
            log_level: LevelFilter::Info,
            test_fault: None,
            stats_interval_s: 0,
            layout: None,
            // Measured on the development host (docs/benchmarks.md): less
            // CPU when idle, lower latency and more throughput than
            // spinning; and a Qubes firewall VM must not hold a CPU busy.
            idle: Idle::Halt {
                wake_us: DEFAULT_WAKE_US,
            },
            firewall_off: false,
            generate: None,
            queues: 1,
            clients: DEFAULT_CLIENTS,
            xen_wake_us: DEFAULT_XEN_WAKE_US,
        }
    }
}

/// Why a token was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CmdlineErrorKind {
    /// The token has no `=`, or an empty key or value.
    NotKeyValue,
    /// The key is not one the kernel knows.
    UnknownKey,
    /// The key is known but the value is not one of its values.
    BadValue { expected: &'static str },
    /// The command line is not UTF-8.
    NotUtf8,
}

/// A refused token, with the token itself for the console message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CmdlineError<'a> {
    pub token: &'a str,
    pub kind: CmdlineErrorKind,
}

impl core::fmt::Display for CmdlineError<'_> {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self.kind {
            CmdlineErrorKind::NotKeyValue => {
                write!(
                    f,
                    "bad command-line token '{}': expected key=value",
                    self.token
                )
            }
            CmdlineErrorKind::UnknownKey => {
                write!(f, "bad command-line token '{}': unknown key", self.token)
            }
            CmdlineErrorKind::BadValue { expected } => {
                write!(
                    f,
                    "bad command-line token '{}': expected {expected}",
                    self.token
                )
            }
            CmdlineErrorKind::NotUtf8 => write!(f, "command line is not UTF-8"),
        }
    }
}

/// Decodes raw command-line bytes (as found in guest memory, NUL excluded).
pub fn parse_bytes(raw: &[u8]) -> Result<BootConfig, CmdlineError<'_>> {
    match core::str::from_utf8(raw) {
        Ok(s) => parse(s),
        Err(_) => Err(CmdlineError {
            token: "",
            kind: CmdlineErrorKind::NotUtf8,
        }),
    }
}

/// A number within `range`, or the error naming what was `expected`.
fn number<T: core::str::FromStr + PartialOrd>(
    value: &str,
    range: core::ops::RangeInclusive<T>,
    expected: &'static str,
) -> Result<T, CmdlineErrorKind> {
    value
        .parse()
        .ok()
        .filter(|n| range.contains(n))
        .ok_or(CmdlineErrorKind::BadValue { expected })
}

/// Parses the command line; the first bad token is returned as the error.
pub fn parse(cmdline: &str) -> Result<BootConfig, CmdlineError<'_>> {
    let mut config = BootConfig::default();
    for token in cmdline.split_ascii_whitespace() {
        let err = |kind| CmdlineError { token, kind };
        let (key, value) = match token.split_once('=') {
            Some((k, v)) if !k.is_empty() && !v.is_empty() => (k, v),
            _ => return Err(err(CmdlineErrorKind::NotKeyValue)),
        };
        match key {
            "loglevel" => {
                config.log_level = match value {
                    "off" => LevelFilter::Off,
                    "error" => LevelFilter::Error,
                    "warn" => LevelFilter::Warn,
                    "info" => LevelFilter::Info,
                    "debug" => LevelFilter::Debug,
                    "trace" => LevelFilter::Trace,
                    _ => {
                        return Err(err(CmdlineErrorKind::BadValue {
                            expected: "off|error|warn|info|debug|trace",
                        }))
                    }
                }
            }
            _ if key.starts_with('/') => {}
            "stats-interval" => {
                config.stats_interval_s =
                    number(value, 0..=86_400, "seconds, 0-86400").map_err(err)?;
            }
            "layout" => {
                config.layout = Some(match value {
                    "single" => Layout::Single,
                    "pipeline" => Layout::Pipeline,
                    "rtc" => Layout::Rtc,
                    _ => {
                        return Err(err(CmdlineErrorKind::BadValue {
                            expected: "single|pipeline|rtc",
                        }))
                    }
                })
            }
            "idle" => {
                config.idle = match (value, config.idle) {
                    ("poll", _) => Idle::Poll,
                    ("halt", Idle::Halt { wake_us }) => Idle::Halt { wake_us },
                    ("halt", Idle::Poll) => Idle::Halt {
                        wake_us: DEFAULT_WAKE_US,
                    },
                    _ => {
                        return Err(err(CmdlineErrorKind::BadValue {
                            expected: "poll|halt",
                        }))
                    }
                }
            }
            "firewall" => {
                config.firewall_off = match value {
                    "on" => false,
                    "off" => true,
                    _ => return Err(err(CmdlineErrorKind::BadValue { expected: "on|off" })),
                }
            }
            "generate" => {
                config.generate =
                    Some(number(value, 60..=1514, "a frame length, 60-1514").map_err(err)?)
            }
            "queues" => config.queues = number(value, 1..=16, "queue pairs, 1-16").map_err(err)?,
            "clients" => {
                config.clients =
                    number(value, 1..=MAX_CLIENTS, "client vifs, 1-100").map_err(err)?
            }
            "idle-wake-us" => {
                let wake_us =
                    number(value, 10..=100_000, "microseconds, 10-100000").map_err(err)?;
                // Implies `idle=halt`.
                config.idle = Idle::Halt { wake_us };
            }
            "xen-wake-us" => {
                config.xen_wake_us =
                    number(value, 10..=1_000_000, "microseconds, 10-1000000").map_err(err)?
            }
            "test-fault" => {
                config.test_fault = Some(match value {
                    "page-fault" => TestFault::PageFault,
                    "invalid-opcode" => TestFault::InvalidOpcode,
                    "panic" => TestFault::Panic,
                    _ => {
                        return Err(err(CmdlineErrorKind::BadValue {
                            expected: "page-fault|invalid-opcode|panic",
                        }))
                    }
                })
            }
            _ => return Err(err(CmdlineErrorKind::UnknownKey)),
        }
    }
    Ok(config)
}

/// The QubesDB entries given on the command line, as (path, value).
/// Call after `parse` succeeded.
pub fn qubesdb_overrides(cmdline: &str) -> impl Iterator<Item = (&str, &str)> {
    cmdline
        .split_ascii_whitespace()
        .filter_map(|t| t.split_once('='))
        .filter(|(k, _)| k.starts_with('/'))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn idle_modes() {
        assert_eq!(parse("idle=poll").unwrap().idle, Idle::Poll);
        assert_eq!(
            parse("idle=halt").unwrap().idle,
            Idle::Halt {
                wake_us: DEFAULT_WAKE_US
            }
        );
        for line in ["idle=halt idle-wake-us=250", "idle-wake-us=250 idle=halt"] {
            assert_eq!(parse(line).unwrap().idle, Idle::Halt { wake_us: 250 });
        }
        assert_eq!(parse("").unwrap().xen_wake_us, DEFAULT_XEN_WAKE_US);
        assert_eq!(parse("xen-wake-us=100").unwrap().xen_wake_us, 100);
        assert_eq!(
            parse("idle-wake-us=250").unwrap().xen_wake_us,
            DEFAULT_XEN_WAKE_US,
            "the APIC timer's period is not Xen's"
        );
        for bad in [
            "idle=mwait",
            "idle-wake-us=5",
            "idle-wake-us=x",
            "xen-wake-us=9",
            "xen-wake-us=1000001",
        ] {
            assert!(matches!(
                parse(bad),
                Err(CmdlineError {
                    kind: CmdlineErrorKind::BadValue { .. },
                    ..
                })
            ));
        }
    }

    #[test]
    fn empty_line_is_defaults() {
        assert_eq!(parse(""), Ok(BootConfig::default()));
        assert_eq!(parse("   \t "), Ok(BootConfig::default()));
    }

    #[test]
    fn known_keys_parse() {
        let c = parse(" loglevel=debug  test-fault=page-fault ").unwrap();
        assert_eq!(c.log_level, LevelFilter::Debug);
        assert_eq!(c.test_fault, Some(TestFault::PageFault));
        assert_eq!(
            parse("test-fault=invalid-opcode").unwrap().test_fault,
            Some(TestFault::InvalidOpcode)
        );
    }

    #[test]
    fn bad_tokens_are_named() {
        let e = parse("loglevel=info bogus").unwrap_err();
        assert_eq!(
            e,
            CmdlineError {
                token: "bogus",
                kind: CmdlineErrorKind::NotKeyValue
            }
        );
        assert_eq!(
            e.to_string(),
            "bad command-line token 'bogus': expected key=value"
        );
        assert_eq!(parse("=x").unwrap_err().kind, CmdlineErrorKind::NotKeyValue);
        assert_eq!(
            parse("loglevel=").unwrap_err().kind,
            CmdlineErrorKind::NotKeyValue
        );
        let e = parse("speed=11").unwrap_err();
        assert_eq!(
            (e.token, e.kind),
            ("speed=11", CmdlineErrorKind::UnknownKey)
        );
        let e = parse("loglevel=loud").unwrap_err();
        assert_eq!(e.token, "loglevel=loud");
        assert!(matches!(e.kind, CmdlineErrorKind::BadValue { .. }));
        assert!(e.to_string().contains("off|error|warn|info|debug|trace"));
    }

    #[test]
    fn qubesdb_tokens_and_stats_interval() {
        let line = "/qubes-ip=10.0.2.15 stats-interval=5 /connected-ips=10.137.0.10";
        assert_eq!(parse(line).unwrap().stats_interval_s, 5);
        assert_eq!(
            parse("layout=pipeline").unwrap().layout,
            Some(Layout::Pipeline)
        );
        assert_eq!(parse("layout=rtc").unwrap().layout, Some(Layout::Rtc));
        assert!(parse("layout=rr").is_err());
        assert!(!parse("").unwrap().firewall_off);
        assert!(parse("firewall=off").unwrap().firewall_off);
        assert!(!parse("firewall=off firewall=on").unwrap().firewall_off);
        assert!(parse("firewall=no").is_err());
        assert_eq!(parse("").unwrap().generate, None);
        assert_eq!(parse("generate=60").unwrap().generate, Some(60));
        assert_eq!(parse("generate=1514").unwrap().generate, Some(1514));
        assert!(parse("generate=59").is_err());
        assert!(parse("generate=1515").is_err());
        assert_eq!(parse("").unwrap().queues, 1);
        assert_eq!(parse("queues=4").unwrap().queues, 4);
        assert_eq!(parse("queues=16").unwrap().queues, 16);
        for bad in ["queues=0", "queues=17", "queues=two"] {
            assert!(parse(bad).is_err(), "{bad}");
        }
        assert_eq!(parse("").unwrap().clients, DEFAULT_CLIENTS);
        assert_eq!(parse("clients=1").unwrap().clients, 1);
        assert_eq!(parse("clients=100").unwrap().clients, MAX_CLIENTS);
        for bad in ["clients=0", "clients=101", "clients=-1", "clients=many"] {
            assert!(parse(bad).is_err(), "{bad}");
        }
        let o: Vec<_> = qubesdb_overrides(line).collect();
        assert_eq!(
            o,
            [
                ("/qubes-ip", "10.0.2.15"),
                ("/connected-ips", "10.137.0.10")
            ]
        );
        assert_eq!(
            parse("/qubes-ip=").unwrap_err().kind,
            CmdlineErrorKind::NotKeyValue
        );
        assert!(matches!(
            parse("stats-interval=-1").unwrap_err().kind,
            CmdlineErrorKind::BadValue { .. }
        ));
    }

    #[test]
    fn non_utf8_is_refused() {
        assert_eq!(
            parse_bytes(b"loglevel=\xff").unwrap_err().kind,
            CmdlineErrorKind::NotUtf8
        );
        assert!(parse_bytes(b"loglevel=warn").is_ok());
    }
}
