//! The nested-Xen tests' memory check (`CORE_CHECK`), on the host: it
//! decides whether a stopped domain gets a second run, so it must call a
//! domain as built sound and one with its code or tables overwritten
//! damaged. Judged on cores in `xl dump-core`'s format made here from the
//! kernel ELF, with the tables filled in as the kernel fills them.

use std::path::Path;
use std::process::Command;

use qemu_tests::kernel;
use qemu_tests::xen::CORE_CHECK;

/// Writes `core` from the kernel ELF: its loaded segments, identity page
/// tables at `boot_pml4`, the IDT's exception gates at their stubs (IST
/// 1), the GDT and the TSS as `cpu::init` leaves them; then applies
/// `damage` (`code`, `idt`, `tss` or `none`).
const MAKE_CORE: &str = r#"
import struct, sys
elf = open(sys.argv[1], "rb").read()
out, damage = sys.argv[2], sys.argv[3]
shoff, = struct.unpack_from("<Q", elf, 0x28)
shentsize, shnum, shstrndx = struct.unpack_from("<HHH", elf, 0x3a)
hdrs = [struct.unpack_from("<IIQQQQIIQQ", elf, shoff + i * shentsize) for i in range(shnum)]
names = hdrs[shstrndx][4]
sec = {elf[names + h[0]:elf.index(b"\0", names + h[0])].decode(): h for h in hdrs}
sym = {}
st, strtab = sec[".symtab"], sec[".strtab"][4]
for i in range(st[5] // 24):
    nm, info, other, shn, value, size = struct.unpack_from("<IBBHQQ", elf, st[4] + 24 * i)
    sym[elf[strtab + nm:elf.index(b"\0", strtab + nm)].decode(errors="replace")] = value
find = lambda part: next(v for k, v in sym.items() if part in k)
mem = {}
def wr(a, b):
    for i, x in enumerate(b):
        mem.setdefault((a + i) >> 12, bytearray(4096))[(a + i) & 4095] = x
def rd(a, n):
    return bytes(mem[(a + i) >> 12][(a + i) & 4095] for i in range(n))
phoff, = struct.unpack_from("<Q", elf, 0x20)
phentsize, phnum = struct.unpack_from("<HH", elf, 0x36)
for i in range(phnum):
    t, flags, off, va, pa, filesz, memsz, align = struct.unpack_from("<IIQQQQQQ", elf, phoff + i * phentsize)
    if t == 1:
        wr(pa, elf[off:off + filesz])
        wr(pa + filesz, bytes(memsz - filesz))
# pml4 -> pdpt -> pd with one 2 MiB identity page (the kernel's first).
wr(find("boot_pml4"), struct.pack("<Q", 0x50003))
wr(0x50000, struct.pack("<Q", 0x51003))
wr(0x51000, struct.pack("<Q", 0x83))
stubs, idt = find("exception_stubs"), find("3cpu3IDT")
gdt, tss, stack = find("3cpu3GDT"), find("3cpu3TSS"), find("3cpu15EXCEPTION_STACK")
for i in range(32):
    a, = struct.unpack("<Q", rd(stubs + 8 * i, 8))
    wr(idt + 16 * i, struct.pack("<HHBBHII", a & 0xffff, 8, 1, 0x8e, (a >> 16) & 0xffff, a >> 32, 0))
lo = 0x67 | ((tss & 0xffffff) << 16) | (0x8b << 40) | (((tss >> 24) & 0xff) << 56)
wr(gdt, struct.pack("<QQQQQ", 0, 0x00af9b000000ffff, 0x00cf93000000ffff, lo, tss >> 32))
wr(tss + 0x24, struct.pack("<Q", stack + 16 * 1024))
if damage == "code":
    wr(0x101000 + 0x40, b"\xcc")
elif damage == "idt":
    wr(idt + 16 * 14, bytes(16))
elif damage == "tss":
    wr(tss + 0x24, struct.pack("<Q", 0))
pfns = sorted(mem)
pages = b"".join(bytes(mem[p]) for p in pfns)
pfn = b"".join(struct.pack("<Q", p) for p in pfns)
shstr = b"\0.shstrtab\0.xen_pfn\0.xen_pages\0"
at_pfn = (64 + len(shstr) + 7) & ~7
at_pages = (at_pfn + len(pfn) + 4095) & ~4095
at_sh = at_pages + len(pages)
sh = lambda n, t, o, s: struct.pack("<IIQQQQIIQQ", n, t, 0, 0, o, s, 0, 0, 1, 0)
f = bytearray(at_sh)
f[0:4] = b"\x7fELF"
struct.pack_into("<Q", f, 0x28, at_sh)
struct.pack_into("<HHH", f, 0x3a, 64, 4, 1)
f[64:64 + len(shstr)] = shstr
f[at_pfn:at_pfn + len(pfn)] = pfn
f[at_pages:] = pages
f += sh(0, 0, 0, 0) + sh(1, 3, 64, len(shstr)) + sh(11, 1, at_pfn, len(pfn)) + sh(20, 1, at_pages, len(pages))
open(out, "wb").write(f)
"#;

/// The check's verdict line on a core made with `damage`.
fn verdict(dir: &Path, elf: &Path, damage: &str) -> String {
    let core = dir.join(format!("core-{damage}"));
    let made = Command::new("python3")
        .args(["-c", MAKE_CORE])
        .arg(elf)
        .arg(&core)
        .arg(damage)
        .output()
        .expect("python3");
    assert!(
        made.status.success(),
        "{}",
        String::from_utf8_lossy(&made.stderr)
    );
    let checked = Command::new("python3")
        .arg(dir.join("corecheck.py"))
        .arg(&core)
        .arg(elf)
        .output()
        .expect("python3");
    let out = String::from_utf8_lossy(&checked.stdout).into_owned();
    assert!(
        checked.status.success(),
        "{out}{}",
        String::from_utf8_lossy(&checked.stderr)
    );
    out.lines()
        .rev()
        .find_map(|l| l.strip_prefix("core: verdict: "))
        .unwrap_or_else(|| panic!("no verdict: {out}"))
        .to_string()
}

#[test]
fn tells_a_domain_as_built_from_one_overwritten() {
    let elf = kernel();
    let dir = std::env::temp_dir().join(format!("portcullis-core-check-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    // The check as dom0 gets it: the shell snippet writes the script.
    let wrote = Command::new("sh")
        .arg("-c")
        .arg(CORE_CHECK.replace(
            "/corecheck.py",
            &dir.join("corecheck.py").display().to_string(),
        ))
        .status()
        .unwrap();
    assert!(wrote.success());
    assert!(
        verdict(&dir, elf, "none").starts_with("sound"),
        "a domain as built"
    );
    for (damage, what) in [("code", "segment 0x101000"), ("idt", "IDT"), ("tss", "TSS")] {
        let v = verdict(&dir, elf, damage);
        assert!(
            v.starts_with("damaged") && v.contains(what),
            "{damage}: {v}"
        );
    }
    let _ = std::fs::remove_dir_all(&dir);
}
