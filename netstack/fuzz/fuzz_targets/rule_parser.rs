//! Any text as a QubesDB snapshot and as rule values: no panic; a rule set
//! either parses or is an error (which closes the client).
#![no_main]

use libfuzzer_sys::fuzz_target;
use netstack::config::{NetConfig, QubesDb};
use netstack::rules::{Probe, Rule, Ruleset};

fuzz_target!(|data: &[u8]| {
    let Ok(text) = core::str::from_utf8(data) else {
        return;
    };
    let _ = Rule::parse(text);
    for v4 in [true, false] {
        let entries = text.lines().filter_map(|l| l.split_once(' '));
        let Ok(rs) = Ruleset::from_entries(entries, v4) else {
            continue;
        };
        for proto in [1u8, 6, 17, 47, 58] {
            for dst in ["192.0.2.1", "2001:db8::1"] {
                let p = Probe {
                    proto,
                    dst: dst.parse().unwrap(),
                    dport: 53,
                    icmp_type: 8,
                    to_dns: proto == 17,
                };
                let (_, hit) = rs.decide(&p, true);
                assert!(hit.is_none_or(|i| i < rs.rules.len()));
                if p.dst.is_ipv4() != v4 {
                    assert!(hit.is_none(), "a rule matched the other family");
                }
            }
        }
    }
    if let Ok(db) = QubesDb::parse_snapshot(text) {
        let _ = NetConfig::from_db(&db);
    }
});
