//! Qubes firewall rules, parsed from QubesDB text and matched per packet.
//!
//! The semantics follow the Qubes firewall agent (core-agent-linux
//! `qubesagent/firewall.py`): rules `NNNN` apply in numeric order, the
//! first match wins, then the `policy`. `action=drop` is a reject with ICMP
//! admin-prohibited. A rule without `proto` but with `dstports` applies to
//! TCP and UDP; without either it applies to every protocol.
//! `specialtarget=dns` matches the DNS addresses on port 53, and a DNS rule
//! naming other ports is skipped. Any parse error makes the whole rule set
//! an error, and the caller drops all of that client's traffic.
//!
//! `dsthost=NAME` matches the addresses the name resolves to (A records
//! for an IPv4 client's rules, AAAA for an IPv6 client's), which the
//! firewall's resolver supplies with `set_host`; a name that resolves to
//! nothing matches nothing. Until every name of a rule set has been
//! resolved once the set is `pending` and the firewall starts no flow for
//! it: a `drop` rule on a name must not be skipped while the name is
//! still being looked up.
//!
//! A client's IPv4 and IPv6 addresses have rule sets of their own. In an
//! IPv6 set `proto=icmp` and `icmptype` mean ICMPv6, `dst4` is an error
//! (as `dst6` is in an IPv4 set), and DNS rules match nothing: the Qubes
//! DNS addresses are IPv4 only, and the agent skips a DNS rule when the
//! family has no DNS server.

use alloc::string::String;
use alloc::vec::Vec;
use core::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use crate::ipv6::PROTO_ICMPV6;

mod classify;
use crate::wire::{PROTO_ICMP, PROTO_TCP, PROTO_UDP};
use classify::Classifier;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    Accept,
    /// Rejected with ICMP admin-prohibited, as Qubes does.
    Drop,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Proto {
    Tcp,
    Udp,
    Icmp,
}

impl Proto {
    fn number(self, v6: bool) -> u8 {
        match self {
            Self::Tcp => PROTO_TCP,
            Self::Udp => PROTO_UDP,
            Self::Icmp if v6 => PROTO_ICMPV6,
            Self::Icmp => PROTO_ICMP,
        }
    }
}

/// One rule line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rule {
    pub action: Action,
    pub proto: Option<Proto>,
    pub dst4: Option<(Ipv4Addr, u8)>,
    pub dst6: Option<(Ipv6Addr, u8)>,
    /// A name, matched by the addresses it resolves to.
    pub dsthost: Option<String>,
    pub dstports: Option<(u16, u16)>,
    pub icmptype: Option<u8>,
    pub dns: bool,
}

/// Why a rule set was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RuleError {
    NoPolicy,
    BadPolicy(String),
    BadRuleNumber(String),
    NotKeyValue(String),
    UnknownKey(String),
    DuplicateKey(String),
    MissingAction,
    BadValue {
        key: String,
        value: String,
    },
    /// `dst6` in an IPv4 client's rules, or `dst4` in an IPv6 client's.
    WrongFamily,
}

impl core::fmt::Display for RuleError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            Self::NoPolicy => write!(f, "no 'policy' defined"),
            Self::BadPolicy(p) => write!(f, "invalid policy '{p}'"),
            Self::BadRuleNumber(n) => write!(f, "unexpected non-rule entry '{n}'"),
            Self::NotKeyValue(t) => write!(f, "'{t}' is not key=value"),
            Self::UnknownKey(k) => write!(f, "unsupported rule option '{k}'"),
            Self::DuplicateKey(k) => write!(f, "option '{k}' given twice"),
            Self::MissingAction => write!(f, "rule lacks action"),
            Self::BadValue { key, value } => write!(f, "invalid {key} '{value}'"),
            Self::WrongFamily => write!(f, "rule for the other address family"),
        }
    }
}

fn bad(key: &str, value: &str) -> RuleError {
    RuleError::BadValue {
        key: key.into(),
        value: value.into(),
    }
}

fn parse_action(v: &str) -> Option<Action> {
    match v {
        "accept" => Some(Action::Accept),
        "drop" => Some(Action::Drop),
        _ => None,
    }
}

fn parse_prefix<A: core::str::FromStr>(v: &str, max: u8) -> Option<(A, u8)> {
    let (addr, len) = match v.split_once('/') {
        Some((a, l)) => (a, l.parse::<u8>().ok().filter(|l| *l <= max)?),
        None => (v, max),
    };
    Some((addr.parse().ok()?, len))
}

fn parse_ports(v: &str) -> Option<(u16, u16)> {
    let (lo, hi) = v.split_once('-').unwrap_or((v, v));
    let (lo, hi) = (lo.parse::<u16>().ok()?, hi.parse::<u16>().ok()?);
    (lo <= hi).then_some((lo, hi))
}

impl Rule {
    /// Parses one rule value: `key=value` words separated by single spaces.
    pub fn parse(text: &str) -> Result<Self, RuleError> {
        let mut rule = Rule {
            action: Action::Drop,
            proto: None,
            dst4: None,
            dst6: None,
            dsthost: None,
            dstports: None,
            icmptype: None,
            dns: false,
        };
        let mut seen: Vec<&str> = Vec::new();
        let mut action = None;
        for word in text.split(' ') {
            let (k, v) = word
                .split_once('=')
                .ok_or_else(|| RuleError::NotKeyValue(word.into()))?;
            if seen.contains(&k) {
                return Err(RuleError::DuplicateKey(k.into()));
            }
            seen.push(k);
            match k {
                "action" => action = Some(parse_action(v).ok_or_else(|| bad(k, v))?),
                "proto" => {
                    rule.proto = Some(match v {
                        "tcp" => Proto::Tcp,
                        "udp" => Proto::Udp,
                        "icmp" => Proto::Icmp,
                        _ => return Err(bad(k, v)),
                    })
                }
                "dst4" => rule.dst4 = Some(parse_prefix(v, 32).ok_or_else(|| bad(k, v))?),
                "dst6" => rule.dst6 = Some(parse_prefix(v, 128).ok_or_else(|| bad(k, v))?),
                "dsthost" => {
                    if !crate::dns::valid_name(v) {
                        return Err(bad(k, v));
                    }
                    rule.dsthost = Some(v.into());
                }
                "dstports" => rule.dstports = Some(parse_ports(v).ok_or_else(|| bad(k, v))?),
                "icmptype" => rule.icmptype = Some(v.parse().map_err(|_| bad(k, v))?),
                "specialtarget" => {
                    if v != "dns" {
                        return Err(bad(k, v));
                    }
                    rule.dns = true;
                }
                _ => return Err(RuleError::UnknownKey(k.into())),
            }
        }
        rule.action = action.ok_or(RuleError::MissingAction)?;
        Ok(rule)
    }
}

/// What a rule is matched against: the packet as the client sent it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Probe {
    pub proto: u8,
    /// The destination, of the rule set's family (the other never matches).
    pub dst: IpAddr,
    /// TCP/UDP destination port; 0 otherwise.
    pub dport: u16,
    /// ICMP (ICMPv6 for IPv6) type; 0 otherwise.
    pub icmp_type: u8,
    /// The destination is one of the DNS addresses.
    pub to_dns: bool,
}

/// A client's parsed rules and policy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ruleset {
    pub rules: Vec<Rule>,
    pub policy: Action,
    /// The family of the client address the rules are for.
    pub v6: bool,
    matchers: Vec<Matcher>,
    /// The matchers as bit sets (`classify`), up to `classify::MAX_RULES`
    /// rules and `classify::MAX_BYTES` of sets.
    classifier: Option<Classifier>,
    /// The `dsthost` names and what they resolved to.
    hosts: Vec<Host>,
}

/// A `dsthost` name of a rule set.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Host {
    name: String,
    /// Resolved addresses of the rule set's family, as `Matcher::net`.
    addrs: Vec<u128>,
    resolved: bool,
}

fn addr_bits(a: IpAddr, v6: bool) -> Option<u128> {
    match a {
        IpAddr::V4(a) if !v6 => Some(u128::from(u32::from(a))),
        IpAddr::V6(a) if v6 => Some(u128::from(a)),
        _ => None,
    }
}

impl Ruleset {
    /// Builds a rule set from QubesDB entries under `/qubes-firewall/<ip>/`,
    /// given as (last path element, value) pairs in any order.
    pub fn from_entries<'a, I>(entries: I, ipv4_client: bool) -> Result<Self, RuleError>
    where
        I: IntoIterator<Item = (&'a str, &'a str)>,
    {
        let mut policy = None;
        let mut numbered: Vec<(&str, Rule)> = Vec::new();
        for (name, value) in entries {
            if name == "policy" {
                policy =
                    Some(parse_action(value).ok_or_else(|| RuleError::BadPolicy(value.into()))?);
            } else if name.len() == 4 && name.bytes().all(|b| b.is_ascii_digit()) {
                let rule = Rule::parse(value)?;
                if (ipv4_client && rule.dst6.is_some()) || (!ipv4_client && rule.dst4.is_some()) {
                    return Err(RuleError::WrongFamily);
                }
                numbered.push((name, rule));
            } else {
                return Err(RuleError::BadRuleNumber(name.into()));
            }
        }
        numbered.sort_by(|a, b| a.0.cmp(b.0));
        let policy = policy.ok_or(RuleError::NoPolicy)?;
        let rules: Vec<Rule> = numbered.into_iter().map(|(_, r)| r).collect();
        let v6 = !ipv4_client;
        let mut hosts = Vec::new();
        let matchers: Vec<Matcher> = rules
            .iter()
            .map(|r| Matcher::compile(r, v6, &mut hosts))
            .collect();
        let icmp = if v6 { PROTO_ICMPV6 } else { PROTO_ICMP };
        Ok(Self {
            rules,
            policy,
            v6,
            classifier: Classifier::build(&matchers, icmp),
            matchers,
            hosts,
        })
    }

    /// The `dsthost` names the rules use.
    pub fn hosts(&self) -> impl Iterator<Item = &str> {
        self.hosts.iter().map(|h| h.name.as_str())
    }

    /// Whether a name is still to be resolved for the first time.
    pub fn pending(&self) -> bool {
        self.hosts.iter().any(|h| !h.resolved)
    }

    /// What `name` resolved to (addresses of the other family are
    /// ignored); an empty list makes its rules match nothing.
    pub fn set_host(&mut self, name: &str, addrs: &[IpAddr]) {
        let v6 = self.v6;
        for h in self.hosts.iter_mut().filter(|h| h.name == name) {
            h.addrs = addrs.iter().filter_map(|a| addr_bits(*a, v6)).collect();
            h.resolved = true;
        }
    }

    /// The decision for `p`, and the index of the rule that made it
    /// (`None` for the policy). `have_dns` says whether any DNS address is
    /// configured (DNS rules are skipped otherwise, as in Qubes). Inlined
    /// into its callers (`Firewall::check_rules`): as a call it cost a new
    /// flow 14 more instructions and 27 more loads and stores (the
    /// caller's registers saved around it).
    #[inline(always)]
    pub fn decide(&self, p: &Probe, have_dns: bool) -> (Action, Option<usize>) {
        // A packet of the other family: only the policy applies.
        let Some(dst) = addr_bits(p.dst, self.v6) else {
            return (self.policy, None);
        };
        let hosts = &self.hosts;
        let hit = match &self.classifier {
            Some(c) => c.first(
                p.proto,
                dst,
                p.dport,
                p.icmp_type,
                have_dns && p.to_dns,
                |r| self.matchers.get(r).is_some_and(|m| m.host_ok(dst, hosts)),
            ),
            None => self.decide_linear(p, dst, have_dns),
        };
        match hit.and_then(|i| self.matchers.get(i).map(|m| (m.action, i))) {
            Some((action, i)) => (action, Some(i)),
            None => (self.policy, None),
        }
    }

    /// The first matching rule by a scan: what the classifier must agree
    /// with, and the lookup for rule sets too long to classify.
    fn decide_linear(&self, p: &Probe, dst: u128, have_dns: bool) -> Option<usize> {
        let hosts = &self.hosts;
        self.matchers
            .iter()
            .position(|m| m.matches(p, dst, have_dns, hosts))
    }
}

/// A rule compiled for matching: small, fixed-size, no options to unwrap.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Matcher {
    /// `ANY_PROTO`, `TCP_OR_UDP`, or a protocol number.
    proto: u8,
    /// The family's ICMP protocol number (ICMP or ICMPv6).
    icmp: u8,
    /// Destination prefix; an IPv4 address is its 32 low bits.
    net: u128,
    mask: u128,
    /// Ports apply (TCP and UDP only).
    ports: Option<(u16, u16)>,
    /// The destination must be one of this `dsthost`'s addresses.
    host: Option<usize>,
    icmp_type: Option<u8>,
    /// Matches only traffic to the DNS addresses, and only when any exist.
    dns: bool,
    /// Names the other family's destination, or is skipped (a DNS rule
    /// naming ports other than 53; any DNS rule for IPv6).
    never: bool,
    action: Action,
}

const ANY_PROTO: u8 = 0;
const TCP_OR_UDP: u8 = 255;

impl Matcher {
    fn compile(r: &Rule, v6: bool, hosts: &mut Vec<Host>) -> Self {
        let mut ports = r.dstports;
        let other_family = if v6 {
            r.dst4.is_some()
        } else {
            r.dst6.is_some()
        };
        let mut never = other_family;
        // As the agent does: `dst4`/`dst6` first, else `dsthost`.
        let host = match (&r.dsthost, r.dst4, r.dst6) {
            (Some(name), None, None) => Some(
                hosts
                    .iter()
                    .position(|h| h.name == *name)
                    .unwrap_or_else(|| {
                        hosts.push(Host {
                            name: name.clone(),
                            addrs: Vec::new(),
                            resolved: false,
                        });
                        hosts.len() - 1
                    }),
            ),
            _ => None,
        };
        if r.dns {
            never |= v6 || !matches!(ports, None | Some((53, 53)));
            ports = Some((53, 53));
        }
        let proto = match (r.proto, ports) {
            (Some(p), _) => p.number(v6),
            (None, Some(_)) => TCP_OR_UDP,
            (None, None) => ANY_PROTO,
        };
        let (net, mask) = match (r.dst4, r.dst6) {
            // An IPv4 address is the low 32 bits; the mask's high bits are
            // set so that the prefix is also a range of those values.
            (Some((a, l)), _) if !v6 => (
                u128::from(u32::from(a)),
                u128::from(crate::wire::prefix_mask(l)) | (u128::MAX << 32),
            ),
            (_, Some((a, l))) if v6 => (u128::from(a), prefix_mask6(l)),
            _ => (0, 0),
        };
        Self {
            proto,
            icmp: if v6 { PROTO_ICMPV6 } else { PROTO_ICMP },
            net: net & mask,
            mask,
            ports,
            host,
            icmp_type: r.icmptype,
            dns: r.dns,
            never,
            action: r.action,
        }
    }

    #[inline]
    fn matches(&self, p: &Probe, dst: u128, have_dns: bool, hosts: &[Host]) -> bool {
        let tcp_udp = p.proto == PROTO_TCP || p.proto == PROTO_UDP;
        !self.never
            && (!self.dns || (have_dns && p.to_dns))
            && match self.proto {
                ANY_PROTO => true,
                TCP_OR_UDP => tcp_udp,
                n => n == p.proto,
            }
            && dst & self.mask == self.net
            && self.host_ok(dst, hosts)
            && self
                .ports
                .is_none_or(|(lo, hi)| tcp_udp && p.dport >= lo && p.dport <= hi)
            && self
                .icmp_type
                .is_none_or(|t| p.proto == self.icmp && p.icmp_type == t)
    }

    /// A `dsthost` rule's destination must be one of the name's addresses.
    #[inline]
    fn host_ok(&self, dst: u128, hosts: &[Host]) -> bool {
        self.host
            .is_none_or(|h| hosts.get(h).is_some_and(|h| h.addrs.contains(&dst)))
    }
}

/// The netmask of an IPv6 prefix length (0..=128; longer is 128).
fn prefix_mask6(len: u8) -> u128 {
    match len {
        0 => 0,
        n => u128::MAX << (128 - u32::from(n.min(128))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn set(entries: &[(&str, &str)]) -> Ruleset {
        Ruleset::from_entries(entries.iter().copied(), true).unwrap()
    }

    fn tcp(dst: [u8; 4], port: u16) -> Probe {
        Probe {
            proto: PROTO_TCP,
            dst: dst.into(),
            dport: port,
            icmp_type: 0,
            to_dns: false,
        }
    }

    #[test]
    fn parses_every_key() {
        let r =
            Rule::parse("action=accept proto=tcp dst4=192.168.0.0/16 dstports=443-443").unwrap();
        assert_eq!(r.action, Action::Accept);
        assert_eq!(r.proto, Some(Proto::Tcp));
        assert_eq!(r.dst4, Some((Ipv4Addr::new(192, 168, 0, 0), 16)));
        assert_eq!(r.dstports, Some((443, 443)));
        let r = Rule::parse("action=drop proto=icmp icmptype=8 dst4=1.2.3.4").unwrap();
        assert_eq!(
            (r.icmptype, r.dst4),
            (Some(8), Some((Ipv4Addr::new(1, 2, 3, 4), 32)))
        );
        assert!(Rule::parse("action=accept specialtarget=dns").unwrap().dns);
        assert_eq!(
            Rule::parse("action=accept dsthost=example.com")
                .unwrap()
                .dsthost
                .as_deref(),
            Some("example.com")
        );
        assert_eq!(
            Rule::parse("action=accept dst6=2001:db8::/32")
                .unwrap()
                .dst6
                .unwrap()
                .1,
            32
        );
    }

    #[test]
    fn refuses_bad_rules() {
        for bad in [
            "proto=tcp",
            "action=allow",
            "action=accept proto=sctp",
            "action=accept dst4=300.1.1.1",
            "action=accept dst4=1.1.1.1/33",
            "action=accept dstports=90-80",
            "action=accept dstports=x",
            "action=accept icmptype=300",
            "action=accept specialtarget=ntp",
            "action=accept expire=123",
            "action=accept  proto=tcp",
            "action=accept proto",
            "action=accept action=drop",
        ] {
            assert!(Rule::parse(bad).is_err(), "{bad} parsed");
        }
        assert_eq!(
            Ruleset::from_entries([("0000", "action=accept")], true),
            Err(RuleError::NoPolicy)
        );
        assert!(Ruleset::from_entries([("policy", "reject")], true).is_err());
        assert!(
            Ruleset::from_entries([("policy", "drop"), ("12", "action=accept")], true).is_err()
        );
        assert_eq!(
            Ruleset::from_entries(
                [("policy", "drop"), ("0000", "action=accept dst6=::1")],
                true
            ),
            Err(RuleError::WrongFamily)
        );
    }

    #[test]
    fn first_match_in_numeric_order_then_policy() {
        let rs = set(&[
            ("policy", "drop"),
            ("0001", "action=accept proto=tcp dstports=80-80"),
            ("0000", "action=drop dst4=10.0.0.0/8"),
        ]);
        assert_eq!(
            rs.decide(&tcp([10, 1, 1, 1], 80), true),
            (Action::Drop, Some(0))
        );
        assert_eq!(
            rs.decide(&tcp([8, 8, 8, 8], 80), true),
            (Action::Accept, Some(1))
        );
        assert_eq!(
            rs.decide(&tcp([8, 8, 8, 8], 81), true),
            (Action::Drop, None)
        );
    }

    #[test]
    fn ports_without_proto_mean_tcp_and_udp_only() {
        let rs = set(&[
            ("policy", "drop"),
            ("0000", "action=accept dstports=1000-2000"),
        ]);
        assert_eq!(rs.decide(&tcp([1, 1, 1, 1], 1500), true).0, Action::Accept);
        let udp = Probe {
            proto: PROTO_UDP,
            ..tcp([1, 1, 1, 1], 1000)
        };
        assert_eq!(rs.decide(&udp, true).0, Action::Accept);
        let icmp = Probe {
            proto: PROTO_ICMP,
            dport: 0,
            icmp_type: 8,
            ..tcp([1, 1, 1, 1], 0)
        };
        assert_eq!(rs.decide(&icmp, true).0, Action::Drop);
        // No proto and no ports: every protocol.
        let all = set(&[("policy", "drop"), ("0000", "action=accept dst4=1.1.1.1")]);
        assert_eq!(all.decide(&icmp, true).0, Action::Accept);
    }

    #[test]
    fn icmp_type_and_dns_target() {
        let rs = set(&[
            ("policy", "drop"),
            ("0000", "action=accept proto=icmp icmptype=8"),
            ("0001", "action=accept specialtarget=dns"),
            ("0002", "action=accept specialtarget=dns dstports=5353-5353"),
        ]);
        let echo = Probe {
            proto: PROTO_ICMP,
            dst: [9, 9, 9, 9].into(),
            dport: 0,
            icmp_type: 8,
            to_dns: false,
        };
        assert_eq!(rs.decide(&echo, true).0, Action::Accept);
        assert_eq!(
            rs.decide(
                &Probe {
                    icmp_type: 13,
                    ..echo
                },
                true
            )
            .0,
            Action::Drop
        );
        let dns = Probe {
            proto: PROTO_UDP,
            dst: [10, 139, 1, 1].into(),
            dport: 53,
            icmp_type: 0,
            to_dns: true,
        };
        assert_eq!(rs.decide(&dns, true), (Action::Accept, Some(1)));
        assert_eq!(
            rs.decide(&dns, false),
            (Action::Drop, None),
            "no DNS configured: rule skipped"
        );
        assert_eq!(
            rs.decide(&Probe { dport: 5353, ..dns }, true).0,
            Action::Drop,
            "dns rule with other ports skipped"
        );
        assert_eq!(
            rs.decide(
                &Probe {
                    to_dns: false,
                    ..dns
                },
                true
            )
            .0,
            Action::Drop
        );
    }

    #[test]
    fn ipv6_rule_sets() {
        let rs = Ruleset::from_entries(
            [
                ("policy", "drop"),
                ("0000", "action=accept proto=icmp icmptype=128"),
                ("0001", "action=accept dst6=2001:db8::/32 proto=tcp"),
                ("0002", "action=accept specialtarget=dns"),
            ],
            false,
        )
        .unwrap();
        let p = |proto, dst: &str, icmp_type, dport| Probe {
            proto,
            dst: dst.parse().unwrap(),
            dport,
            icmp_type,
            to_dns: true,
        };
        assert_eq!(
            rs.decide(&p(PROTO_ICMPV6, "2001:db9::1", 128, 0), true),
            (Action::Accept, Some(0))
        );
        assert_eq!(
            rs.decide(&p(PROTO_ICMP, "2001:db9::1", 128, 0), true).0,
            Action::Drop,
            "proto=icmp means ICMPv6 here"
        );
        assert_eq!(
            rs.decide(&p(PROTO_TCP, "2001:db8:5::1", 0, 80), true),
            (Action::Accept, Some(1))
        );
        assert_eq!(
            rs.decide(&p(PROTO_TCP, "2001:db9::1", 0, 80), true),
            (Action::Drop, None)
        );
        assert_eq!(
            rs.decide(&p(PROTO_UDP, "2001:db9::1", 0, 53), true),
            (Action::Drop, None),
            "no DNS rule over IPv6"
        );
        assert_eq!(
            rs.decide(&p(PROTO_TCP, "192.0.2.1", 0, 80), true),
            (Action::Drop, None),
            "a packet of the other family meets only the policy"
        );
        assert_eq!(
            Ruleset::from_entries(
                [("policy", "drop"), ("0000", "action=accept dst4=1.2.3.4")],
                false
            ),
            Err(RuleError::WrongFamily)
        );
    }

    /// Random rule sets and packets: the bit-set classifier decides as
    /// the rule-by-rule scan does.
    #[test]
    fn classifier_agrees_with_the_scan() {
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        let mut rnd = move |n: u64| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x % n
        };
        let mut compared = 0;
        for round in 0..400 {
            let v6 = round % 3 == 0;
            // Every eighth set long: several words a set, and past 512.
            let n = if round % 8 == 0 {
                100 + rnd(1100) as usize
            } else {
                classify::MIN_RULES + 1 + rnd(40) as usize
            };
            let mut entries = vec![(
                "policy".to_string(),
                ["drop", "accept"][rnd(2) as usize].to_string(),
            )];
            for i in 0..n {
                let mut w = vec![format!("action={}", ["accept", "drop"][rnd(2) as usize])];
                let proto = rnd(4);
                match proto {
                    0 => w.push("proto=tcp".into()),
                    1 => w.push("proto=udp".into()),
                    2 => w.push("proto=icmp".into()),
                    _ => {}
                }
                match rnd(4) {
                    0 | 1 if v6 => w.push(format!(
                        "dst6=2001:db8:{:x}::{:x}/{}",
                        rnd(4),
                        rnd(4),
                        [32, 48, 126, 128][rnd(4) as usize]
                    )),
                    // (First octets on both sides of 10, and prefixes
                    // shorter than 8: ranges that span top bytes, for
                    // the IPv4 destinations' first level.)
                    0 | 1 => w.push(format!(
                        "dst4={}.{}.0.{}/{}",
                        [9, 10, 10, 11, 255][rnd(5) as usize],
                        rnd(4),
                        rnd(4),
                        [0, 4, 7, 8, 16, 30, 32][rnd(7) as usize]
                    )),
                    2 => w.push(format!("dsthost=h{}.example", rnd(3))),
                    _ => {}
                }
                if proto != 2 && rnd(2) == 0 {
                    let lo = rnd(60);
                    w.push(format!("dstports={lo}-{}", lo + rnd(30)));
                }
                // (`icmptype` without `proto` too: it then means ICMP only.)
                if proto >= 2 && rnd(2) == 0 {
                    w.push(format!("icmptype={}", rnd(4)));
                }
                if rnd(6) == 0 {
                    w.push("specialtarget=dns".into());
                }
                entries.push((format!("{i:04}"), w.join(" ")));
            }
            let Ok(mut rs) =
                Ruleset::from_entries(entries.iter().map(|(a, b)| (a.as_str(), b.as_str())), !v6)
            else {
                continue;
            };
            assert!(rs.classifier.is_some());
            for h in 0..3 {
                let addrs: Vec<IpAddr> = if v6 {
                    vec![format!("2001:db8:{h:x}::{h:x}").parse().unwrap()]
                } else {
                    vec![format!("10.{h}.0.{h}").parse().unwrap()]
                };
                rs.set_host(&format!("h{h}.example"), &addrs[..rnd(2) as usize]);
            }
            for _ in 0..200 {
                let dst: IpAddr = if v6 {
                    format!("2001:db8:{:x}::{:x}", rnd(5), rnd(5))
                        .parse()
                        .unwrap()
                } else {
                    let first = [0, 9, 10, 10, 11, 12, 255][rnd(7) as usize];
                    format!("{first}.{}.0.{}", rnd(5), rnd(5)).parse().unwrap()
                };
                let icmp = if v6 { PROTO_ICMPV6 } else { PROTO_ICMP };
                let p = Probe {
                    proto: [PROTO_TCP, PROTO_UDP, icmp, 47][rnd(4) as usize],
                    dst,
                    dport: rnd(100) as u16,
                    icmp_type: rnd(5) as u8,
                    to_dns: rnd(2) == 0,
                };
                let have_dns = rnd(3) != 0;
                let bits = addr_bits(dst, v6).unwrap();
                assert_eq!(
                    rs.decide(&p, have_dns).1,
                    rs.decide_linear(&p, bits, have_dns),
                    "{entries:?} {p:?} dns={have_dns}"
                );
                compared += 1;
            }
        }
        assert!(compared > 40_000, "{compared}");
    }

    /// Long rule sets are classified while their sets fit `MAX_BYTES`,
    /// and scanned beyond it, with the same decisions either way.
    #[test]
    fn long_rule_sets_are_classified_within_the_memory_budget() {
        // `n` rules each to its own /32 (2n + 1 intervals), then one for
        // TCP port 80 anywhere.
        let rules = |n: usize| {
            let mut e: Vec<(String, String)> = (0..n)
                .map(|i| {
                    (
                        format!("{i:04}"),
                        format!("action=drop proto=tcp dst4=10.{}.{}.1", i / 250, i % 250),
                    )
                })
                .collect();
            e.push((
                format!("{n:04}"),
                "action=accept proto=tcp dstports=80-80".into(),
            ));
            e.push(("policy".into(), "drop".into()));
            Ruleset::from_entries(e.iter().map(|(a, b)| (a.as_str(), b.as_str())), true).unwrap()
        };
        let probe = |dst: [u8; 4]| Probe {
            proto: PROTO_TCP,
            dst: IpAddr::from(dst),
            dport: 80,
            icmp_type: 0,
            to_dns: false,
        };
        // 1,000 rules: 2,001 + 3 + 1 intervals of 16 words (250 KiB).
        let classified = rules(1000);
        assert!(classified.classifier.is_some());
        // 1,100: 2,205 intervals of 24 words (18 rounded up to the next
        // compiled width: 413 KiB), over the budget.
        let scanned = rules(1100);
        assert!(scanned.classifier.is_none());
        for rs in [&classified, &scanned] {
            assert_eq!(
                rs.decide(&probe([10, 3, 249, 1]), false),
                (Action::Drop, Some(999))
            );
            assert_eq!(
                rs.decide(&probe([10, 0, 7, 1]), false),
                (Action::Drop, Some(7))
            );
            let last = rs.rules.len() - 1;
            assert_eq!(
                rs.decide(&probe([10, 0, 7, 2]), false),
                (Action::Accept, Some(last))
            );
            let mut udp = probe([10, 0, 7, 1]);
            udp.proto = PROTO_UDP;
            assert_eq!(rs.decide(&udp, false), (Action::Drop, None));
        }
    }

    #[test]
    fn dsthost_rules_wait_for_their_names_then_match_their_addresses() {
        let mut rs = Ruleset::from_entries(
            [
                ("policy", "accept"),
                ("0000", "action=drop dsthost=evil.example"),
                (
                    "0001",
                    "action=accept proto=tcp dsthost=Good.example dstports=443-443",
                ),
                ("0002", "action=drop proto=tcp"),
            ],
            true,
        )
        .unwrap();
        assert_eq!(
            rs.hosts().collect::<Vec<_>>(),
            ["evil.example", "Good.example"]
        );
        assert!(rs.pending(), "nothing resolved yet");
        rs.set_host("evil.example", &["192.0.2.66".parse().unwrap()]);
        assert!(rs.pending());
        // An IPv6 address of a name is ignored by IPv4 rules.
        rs.set_host(
            "Good.example",
            &[
                "2001:db8::1".parse().unwrap(),
                "198.51.100.1".parse().unwrap(),
            ],
        );
        assert!(!rs.pending());
        assert_eq!(
            rs.decide(&tcp([192, 0, 2, 66], 443), true),
            (Action::Drop, Some(0))
        );
        assert_eq!(
            rs.decide(&tcp([198, 51, 100, 1], 443), true),
            (Action::Accept, Some(1))
        );
        assert_eq!(
            rs.decide(&tcp([198, 51, 100, 2], 443), true),
            (Action::Drop, Some(2))
        );
        // A name that resolves to nothing matches nothing.
        rs.set_host("evil.example", &[]);
        assert_eq!(
            rs.decide(&tcp([192, 0, 2, 66], 443), true),
            (Action::Drop, Some(2))
        );
        assert!(Rule::parse("action=accept dsthost=bad..name").is_err());
    }
}
