//! The Linux baseline for `cargo xtask bench`: a firewall VM made of
//! Debian's stock kernel (`linux-image-amd64`) and a tiny initramfs —
//! busybox, `nft` with its libraries, the kernel modules the ruleset needs —
//! whose init configures forwarding, NAT and a ruleset equivalent to what
//! Portcullis enforces with `config/demo.qubesdb` (anti-spoofing,
//! established/related, per-client accept, reject with admin-prohibited,
//! masquerade, DNS DNAT), the way a Qubes Linux net VM does.
//!
//! `LinuxFirewall::ensure` builds it once under
//! `/var/cache/portcullis/linux-fw` (root: the packages come from the
//! machine's apt sources with `apt-get download`). Its NICs are found by the
//! MACs `Machine` gives them: 52:54:00:12:34:56 is the uplink (10.0.2.15/24,
//! gateway 10.0.2.2), 52:54:00:12:34:57 the client side (10.137.0.1, proxy
//! ARP, client 10.137.0.10 routed on it).
//!
//! On its serial console it prints `linux-fw: ready mem_used_kib=N` once
//! configured (N: MemTotal - MemAvailable), then reads commands: `m` prints
//! the memory line again, `c` the nftables counters, `q` powers off.

use std::path::{Path, PathBuf};
use std::process::Command;

use crate::debian::{self, cpio, run};
use crate::Machine;

/// Bumped when the recipe changes, so old caches are rebuilt.
const RECIPE: &str = "portcullis-linux-fw-v3";
pub const CACHE: &str = "/var/cache/portcullis/linux-fw";

/// The modules the ruleset and the NICs need (their dependencies follow
/// from `modules.dep`).
/// `crc32c_generic` first: `libcrc32c` asks the crypto API for crc32c,
/// which an initramfs without `modprobe` cannot load on demand.
const MODULES: &[&str] = &[
    "kernel/crypto/crc32c_generic.ko",
    "kernel/drivers/virtio/virtio_pci.ko",
    "kernel/drivers/net/virtio_net.ko",
    "kernel/net/netfilter/nft_ct.ko",
    "kernel/net/netfilter/nft_chain_nat.ko",
    "kernel/net/netfilter/nft_nat.ko",
    "kernel/net/netfilter/nft_masq.ko",
    "kernel/net/netfilter/nft_reject_inet.ko",
];

/// The ruleset: `UPLINK` and `CLIENT` are replaced by the interface names.
/// Equivalent to `config/demo.qubesdb` for client 10.137.0.10 (IPv4; the
/// bench does not use IPv6, which this VM does not forward).
pub const RULESET: &str = r#"flush ruleset
table inet qubes {
    chain antispoof {
        type filter hook prerouting priority raw; policy accept;
        iifname "CLIENT" ip saddr != 10.137.0.10 counter drop
        iifname "CLIENT" meta nfproto ipv6 counter drop
    }
    chain dns {
        type nat hook prerouting priority dstnat; policy accept;
        iifname "CLIENT" ip daddr { 10.139.1.1, 10.139.1.2 } meta l4proto { tcp, udp } th dport 53 dnat ip to 10.0.2.3
    }
    chain nat {
        type nat hook postrouting priority srcnat; policy accept;
        oifname "UPLINK" masquerade
    }
    chain forward {
        type filter hook forward priority filter; policy drop;
        ct state invalid counter drop
        ct state established,related accept
        iifname "CLIENT" oifname "UPLINK" ip saddr 10.137.0.10 jump client-10-137-0-10
        counter drop
    }
    chain client-10-137-0-10 {
        tcp dport 5201 accept
        udp dport 5201 accept
        ct status dnat meta l4proto { tcp, udp } th dport 53 accept
        meta l4proto icmp accept
        counter reject with icmpx type admin-prohibited
    }
    chain input {
        type filter hook input priority filter; policy drop;
        ct state established,related accept
        iifname "lo" accept
        meta l4proto icmp accept
        counter drop
    }
}
"#;

const INIT: &str = r#"#!/bin/busybox sh
/bin/busybox --install -s /bin
export PATH=/bin:/sbin:/usr/sbin
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev 2>/dev/null
for m in $(cat /modules.order); do insmod /lib/modules/$m || echo "linux-fw: insmod $m failed"; done
ifname() {
    for d in /sys/class/net/*; do
        [ "$(cat $d/address)" = "$1" ] && basename $d
    done
}
i=0
while [ -z "$(ifname 52:54:00:12:34:57)" ] && [ $i -lt 100 ]; do sleep 0.05; i=$((i + 1)); done
up=$(ifname 52:54:00:12:34:56)
cl=$(ifname 52:54:00:12:34:57)
ip link set lo up
ip addr add 10.0.2.15/24 dev $up
ip link set $up up
ip route add default via 10.0.2.2
ip addr add 10.137.0.1/32 dev $cl
ip link set $cl up
ip route add 10.137.0.10/32 dev $cl
echo 1 > /proc/sys/net/ipv4/conf/$cl/proxy_arp
echo 1 > /proc/sys/net/ipv4/ip_forward
sed -e "s/UPLINK/$up/g" -e "s/CLIENT/$cl/g" /rules.nft > /tmp.nft
nft -f /tmp.nft || echo "linux-fw: nft failed"
mem() {
    awk '/^MemTotal:/ { t = $2 } /^MemAvailable:/ { a = $2 } END { print "mem_used_kib=" t - a }' /proc/meminfo
}
echo "linux-fw: ready $(mem) uplink $up client $cl"
while read cmd; do
    case "$cmd" in
        m) echo "linux-fw: $(mem)" ;;
        c) nft list ruleset | grep counter | sed 's/^/linux-fw: /' ;;
        q) poweroff -f ;;
    esac
done
poweroff -f
"#;

/// The built VM: a kernel and its initramfs.
pub struct LinuxFirewall {
    pub kernel: PathBuf,
    pub initrd: PathBuf,
}

fn io(e: std::io::Error) -> String {
    e.to_string()
}

/// The modules to load, dependencies first, from `modules.dep`, whose
/// lines list a module's dependencies, transitively, deepest last.
pub fn load_order(modules_dep: &str, wanted: &[&str]) -> Result<Vec<String>, String> {
    let deps: std::collections::HashMap<&str, Vec<&str>> = modules_dep
        .lines()
        .filter_map(|l| l.split_once(':'))
        .map(|(m, d)| (m.trim(), d.split_whitespace().collect()))
        .collect();
    let mut order: Vec<String> = Vec::new();
    for w in wanted {
        let d = deps
            .get(w)
            .ok_or_else(|| format!("module {w} is not in modules.dep"))?;
        for m in d.iter().rev().chain(std::iter::once(w)) {
            if !order.iter().any(|o| o == m) {
                order.push((*m).to_string());
            }
        }
    }
    Ok(order)
}

/// The shared libraries an executable loads, with the loader, from `ldd`.
fn libraries(exe: &Path) -> Result<Vec<PathBuf>, String> {
    let out = run(Command::new("ldd").arg(exe))?;
    Ok(out
        .lines()
        .filter_map(|l| {
            let w: Vec<&str> = l.split_whitespace().collect();
            match w.as_slice() {
                [_, "=>", path, ..] if path.starts_with('/') => Some(PathBuf::from(path)),
                [path, ..] if path.starts_with('/') => Some(PathBuf::from(path)),
                _ => None,
            }
        })
        .collect())
}

fn copy_into(root: &Path, file: &Path) -> Result<(), String> {
    let to = root.join(file.strip_prefix("/").unwrap_or(file));
    std::fs::create_dir_all(to.parent().unwrap_or(root)).map_err(io)?;
    std::fs::copy(file, &to).map_err(|e| format!("copy {}: {e}", file.display()))?;
    Ok(())
}

impl LinuxFirewall {
    /// The VM, built first if the cache lacks it.
    pub fn ensure() -> Result<Self, String> {
        let dir = PathBuf::from(CACHE);
        let fw = Self {
            kernel: dir.join("vmlinuz"),
            initrd: dir.join("initrd.cpio"),
        };
        let stamp = dir.join("stamp");
        if std::fs::read_to_string(&stamp).is_ok_and(|s| s.trim() == RECIPE)
            && fw.kernel.is_file()
            && fw.initrd.is_file()
        {
            return Ok(fw);
        }
        if !crate::netns::is_root() {
            return Err("building the Linux firewall VM needs root (apt-get download)".into());
        }
        eprintln!("linux-fw: building the Linux baseline VM in {CACHE} (once)");
        let nft = PathBuf::from("/usr/sbin/nft");
        if !nft.is_file() {
            return Err("the Linux baseline needs nft (apt-get install nftables)".into());
        }
        let _ = std::fs::remove_dir_all(&dir);
        let (kernel_pkg, kver) = debian::kernel_package()?;
        debian::fetch(
            &dir.join("debs"),
            &[
                (&kernel_pkg, &dir.join("k")),
                ("busybox-static", &dir.join("b")),
            ],
        )?;
        let busybox = dir.join("b/bin/busybox");
        let k = dir.join("k");
        run(Command::new(&busybox)
            .args(["depmod", "-b"])
            .arg(&k)
            .arg(&kver))?;
        let moddir = k.join(format!("lib/modules/{kver}"));
        let dep = std::fs::read_to_string(moddir.join("modules.dep")).map_err(io)?;
        let order = load_order(&dep, MODULES)?;

        let root = dir.join("root");
        for d in ["bin", "sbin", "proc", "sys", "dev", "tmp", "lib/modules"] {
            std::fs::create_dir_all(root.join(d)).map_err(io)?;
        }
        std::fs::copy(&busybox, root.join("bin/busybox")).map_err(io)?;
        for m in &order {
            let to = root.join("lib/modules").join(m);
            std::fs::create_dir_all(to.parent().unwrap_or(&root)).map_err(io)?;
            std::fs::copy(moddir.join(m), &to).map_err(|e| format!("{m}: {e}"))?;
        }
        std::fs::write(root.join("modules.order"), order.join("\n") + "\n").map_err(io)?;
        copy_into(&root, &nft)?;
        for lib in libraries(&nft)? {
            copy_into(&root, &lib)?;
        }
        std::fs::write(root.join("rules.nft"), RULESET).map_err(io)?;
        std::fs::write(root.join("init"), INIT).map_err(io)?;
        run(Command::new("chmod").arg("+x").arg(root.join("init")))?;
        cpio(&root, &fw.initrd)?;
        std::fs::copy(k.join(format!("boot/vmlinuz-{kver}")), &fw.kernel).map_err(io)?;
        for scratch in ["debs", "k", "b", "root"] {
            let _ = std::fs::remove_dir_all(dir.join(scratch));
        }
        std::fs::write(&stamp, RECIPE).map_err(io)?;
        Ok(fw)
    }

    /// Makes `m` (which carries the NICs) boot this VM: its kernel, its
    /// initramfs, 256 MiB as a Qubes net VM has, no QubesDB.
    pub fn machine(&self, m: Machine) -> Machine {
        let mut m = m.memory_mib(256).append("console=ttyS0 quiet panic=-1");
        m.kernel = self.kernel.clone();
        m.qubesdb = None;
        m.extra
            .extend(["-initrd".to_string(), self.initrd.display().to_string()]);
        m
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn modules_load_after_their_dependencies_once_each() {
        let dep = "kernel/a.ko: kernel/b.ko kernel/c.ko\nkernel/b.ko: kernel/c.ko\n\
                   kernel/c.ko:\nkernel/d.ko: kernel/c.ko\n";
        assert_eq!(
            load_order(dep, &["kernel/a.ko", "kernel/d.ko"]).unwrap(),
            ["kernel/c.ko", "kernel/b.ko", "kernel/a.ko", "kernel/d.ko"]
        );
        assert!(load_order(dep, &["kernel/e.ko"]).is_err());
    }
}
