//! Where a virtio PCI device's registers are (virtio 1.x, section 4.1.4):
//! the vendor-specific capabilities that name a BAR, an offset and a
//! length for the common configuration and the notification area, and the
//! BARs' addresses. Pure decoding of configuration-space words given by
//! the caller, so it is tested on the host; the binary reads the space and
//! the registers.
//!
//! What it is for: each queue's notification register
//! (`notify area + queue_notify_off × notify_off_multiplier`), so a queue
//! is notified with one store instead of the transport's select, read and
//! store, and so a queue can be notified from the core that owns it.

/// PCI capability id of the virtio structures.
const CAP_VENDOR: u8 = 0x09;
/// `cfg_type`s.
const COMMON_CFG: u8 = 1;
const NOTIFY_CFG: u8 = 2;
/// In the common configuration: `queue_select` and `queue_notify_off`.
pub const QUEUE_SELECT: u64 = 0x16;
pub const QUEUE_NOTIFY_OFF: u64 = 0x1e;
/// Bytes of common configuration this kernel touches.
const COMMON_CFG_MIN: u32 = 0x20;

/// A structure inside a BAR.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Region {
    pub bar: u8,
    pub offset: u32,
    pub length: u32,
}

/// The two structures a queue's notification needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VirtioCaps {
    pub common: Region,
    pub notify: Region,
    pub notify_off_multiplier: u32,
}

/// Reads the capability list of a function through `read(offset)` (a
/// dword of configuration space at a 4-aligned offset). `None` when the
/// function has no list, or either structure is missing or malformed.
/// The walk stops after 48 capabilities (a looping list ends).
pub fn find_caps(read: impl Fn(u16) -> u32) -> Option<VirtioCaps> {
    let status = (read(0x04) >> 16) as u16;
    if status & (1 << 4) == 0 {
        return None;
    }
    let byte = |off: u16| (read(off & !3) >> (8 * (off & 3))) as u8;
    let mut at = u16::from(byte(0x34) & !3);
    let (mut common, mut notify) = (None, None);
    for _ in 0..48 {
        if at < 0x40 {
            break;
        }
        let (id, next, len, cfg_type) = (byte(at), byte(at + 1), byte(at + 2), byte(at + 3));
        // (A capability must lie inside the 256 bytes of PCI space.)
        if id == CAP_VENDOR && len >= 16 && at + u16::from(len) <= 0x100 {
            let region = Region {
                bar: byte(at + 4),
                offset: read(at + 8),
                length: read(at + 12),
            };
            let usable = region.bar <= 5 && region.offset.checked_add(region.length).is_some();
            match cfg_type {
                COMMON_CFG if common.is_none() && usable && region.length >= COMMON_CFG_MIN => {
                    common = Some(region)
                }
                NOTIFY_CFG if notify.is_none() && usable && len >= 20 => {
                    notify = Some((region, read(at + 16)))
                }
                _ => {}
            }
        }
        at = u16::from(next & !3);
    }
    let (notify, notify_off_multiplier) = notify?;
    Some(VirtioCaps {
        common: common?,
        notify,
        notify_off_multiplier,
    })
}

/// The address BAR `bar` decodes, from `read` as in `find_caps`: memory
/// BARs only (32- or 64-bit); `None` for I/O BARs, an unassigned BAR, or
/// the upper half of a 64-bit one.
pub fn bar_address(read: impl Fn(u16) -> u32, bar: u8) -> Option<u64> {
    if bar > 5 {
        return None;
    }
    let reg = 0x10 + 4 * u16::from(bar);
    let low = read(reg);
    if low & 1 != 0 {
        return None; // I/O space
    }
    let addr = match (low >> 1) & 3 {
        0 => u64::from(low & !0xf),
        2 if bar < 5 => u64::from(low & !0xf) | u64::from(read(reg + 4)) << 32,
        _ => return None,
    };
    (addr != 0).then_some(addr)
}

/// The notification register of a queue whose `queue_notify_off` is
/// `notify_off`: two bytes inside the notification area, or `None`.
pub fn notify_address(caps: &VirtioCaps, notify_bar: u64, notify_off: u16) -> Option<u64> {
    let within = u64::from(notify_off) * u64::from(caps.notify_off_multiplier);
    (within + 2 <= u64::from(caps.notify.length))
        .then(|| notify_bar + u64::from(caps.notify.offset) + within)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A function's configuration space (256 bytes) with the given
    /// capabilities, each (offset, bytes), chained in order.
    fn space(caps: &[(u8, &[u8])]) -> [u8; 256] {
        let mut s = [0u8; 256];
        s[0x06] = 1 << 4; // capability list
        s[0x34] = caps.first().map_or(0, |c| c.0);
        for (i, (at, bytes)) in caps.iter().enumerate() {
            let at = usize::from(*at);
            s[at..at + bytes.len()].copy_from_slice(bytes);
            s[at + 1] = caps.get(i + 1).map_or(0, |c| c.0);
        }
        s
    }

    fn reader(s: [u8; 256]) -> impl Fn(u16) -> u32 {
        move |off| {
            let o = usize::from(off);
            u32::from_le_bytes([s[o], s[o + 1], s[o + 2], s[o + 3]])
        }
    }

    fn vendor(cfg_type: u8, bar: u8, offset: u32, length: u32, extra: &[u8]) -> Vec<u8> {
        let mut c = vec![
            CAP_VENDOR,
            0,
            16 + extra.len() as u8,
            cfg_type,
            bar,
            0,
            0,
            0,
        ];
        c.extend_from_slice(&offset.to_le_bytes());
        c.extend_from_slice(&length.to_le_bytes());
        c.extend_from_slice(extra);
        c
    }

    /// What QEMU's virtio-net-pci offers: MSI-X first, then the virtio
    /// structures in BAR 4.
    fn qemu_like() -> [u8; 256] {
        let msix = [0x11u8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0];
        let common = vendor(COMMON_CFG, 4, 0, 0x1000, &[]);
        let isr = vendor(3, 4, 0x1000, 0x1000, &[]);
        let notify = vendor(NOTIFY_CFG, 4, 0x3000, 0x1000, &4u32.to_le_bytes());
        let mut s = space(&[
            (0x98, &msix),
            (0x84, &common),
            (0x70, &isr),
            (0x5c, &notify),
        ]);
        // BAR 4: a 64-bit memory BAR at 0x1_febf_4000 (low half, high half).
        s[0x20..0x24].copy_from_slice(&(0xfebf_4000u32 | 0b100).to_le_bytes());
        s[0x24..0x28].copy_from_slice(&0x1u32.to_le_bytes());
        s
    }

    #[test]
    fn finds_the_structures_and_the_notification_registers() {
        let s = qemu_like();
        let caps = find_caps(reader(s)).unwrap();
        assert_eq!(
            caps,
            VirtioCaps {
                common: Region {
                    bar: 4,
                    offset: 0,
                    length: 0x1000
                },
                notify: Region {
                    bar: 4,
                    offset: 0x3000,
                    length: 0x1000
                },
                notify_off_multiplier: 4,
            }
        );
        let bar = bar_address(reader(s), 4).unwrap();
        assert_eq!(bar, 0x1_febf_4000);
        assert_eq!(notify_address(&caps, bar, 0), Some(0x1_febf_7000));
        assert_eq!(notify_address(&caps, bar, 3), Some(0x1_febf_700c));
        // The last register that fits, and one past the area.
        assert_eq!(notify_address(&caps, bar, 1023), Some(0x1_febf_7ffc));
        assert_eq!(notify_address(&caps, bar, 1024), None);
    }

    #[test]
    fn refuses_what_it_cannot_use() {
        // No capability list.
        let mut s = qemu_like();
        s[0x06] = 0;
        assert_eq!(find_caps(reader(s)), None);
        // No notification structure.
        let common = vendor(COMMON_CFG, 4, 0, 0x1000, &[]);
        assert_eq!(find_caps(reader(space(&[(0x40, &common)]))), None);
        // A BAR number beyond 5, an offset + length that overflows, a
        // notification capability too short for its multiplier.
        for notify in [
            vendor(NOTIFY_CFG, 6, 0, 0x1000, &4u32.to_le_bytes()),
            vendor(NOTIFY_CFG, 4, u32::MAX, 2, &4u32.to_le_bytes()),
            vendor(NOTIFY_CFG, 4, 0x3000, 0x1000, &[]),
        ] {
            let s = space(&[(0x40, &common), (0x60, &notify)]);
            assert_eq!(find_caps(reader(s)), None, "{notify:?}");
        }
        // A capability running past the 256 bytes is not read.
        let mut s = qemu_like();
        s[0x5c + 2] = 0xf0;
        assert_eq!(find_caps(reader(s)), None);
        // A list that loops on itself ends.
        let notify = vendor(NOTIFY_CFG, 4, 0x3000, 0x1000, &4u32.to_le_bytes());
        let mut s = space(&[(0x40, &notify)]);
        s[0x41] = 0x40;
        assert_eq!(find_caps(reader(s)), None);
        // I/O BARs, unassigned BARs, the upper half of a 64-bit BAR.
        let mut s = [0u8; 256];
        s[0x10] = 0xc1; // I/O at 0xc0
        s[0x14..0x18].copy_from_slice(&0xfebf_1000u32.to_le_bytes());
        assert_eq!(bar_address(reader(s), 0), None);
        assert_eq!(bar_address(reader(s), 1), Some(0xfebf_1000));
        assert_eq!(bar_address(reader(s), 2), None);
        assert_eq!(bar_address(reader(s), 6), None);
        let mut s = [0u8; 256];
        s[0x24..0x28].copy_from_slice(&0xfebf_2004u32.to_le_bytes());
        assert_eq!(
            bar_address(reader(s), 5),
            None,
            "a 64-bit BAR cannot start at 5"
        );
    }
}
