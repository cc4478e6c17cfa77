//! Descriptor tables and the CPU exception reporter.
//!
//! Every exception vector (0-31) runs on its own IST stack, so that even a
//! stack overflow or a double fault reaches the reporter. The reporter
//! prints the vector, RIP, error code, CR2 and the registers, then exits
//! with failure: an exception in Portcullis is a bug, never something to
//! resume from. Device interrupts are not used (the dataplane polls); the
//! one interrupt there is, the local APIC timer of `idle=halt`, only wakes
//! a halted core (`WAKE_VECTOR`).

use spin::Once;
use x86_64::instructions::segmentation::{Segment, CS, DS, ES, SS};
use x86_64::instructions::tables::{lidt, load_tss};
use x86_64::registers::control::Cr2;
use x86_64::structures::gdt::{Descriptor, GlobalDescriptorTable, SegmentSelector};
use x86_64::structures::tss::TaskStateSegment;
use x86_64::structures::DescriptorTablePointer;
use x86_64::VirtAddr;

use crate::exit;

const EXCEPTION_STACK_SIZE: usize = 16 * 1024;
/// IST slot (1-based in the IDT entry, 0-based in the TSS array).
const EXCEPTION_IST: u8 = 1;

#[repr(C, align(16))]
struct Stack([u8; EXCEPTION_STACK_SIZE]);

static mut EXCEPTION_STACK: Stack = Stack([0; EXCEPTION_STACK_SIZE]);

static TSS: Once<TaskStateSegment> = Once::new();
static GDT: Once<(
    GlobalDescriptorTable,
    SegmentSelector,
    SegmentSelector,
    SegmentSelector,
)> = Once::new();

/// One 16-byte long-mode interrupt gate.
#[derive(Clone, Copy)]
#[repr(C)]
struct Gate {
    offset_low: u16,
    selector: u16,
    ist: u8,
    type_attr: u8,
    offset_mid: u16,
    offset_high: u32,
    reserved: u32,
}

const EMPTY_GATE: Gate = Gate {
    offset_low: 0,
    selector: 0,
    ist: 0,
    type_attr: 0,
    offset_mid: 0,
    offset_high: 0,
    reserved: 0,
};

#[repr(C, align(16))]
struct Idt([Gate; 256]);

static IDT: Once<Idt> = Once::new();

extern "C" {
    /// Entry stubs for vectors 0-31, from `exceptions.S`.
    static exception_stubs: [u64; 32];
    fn wake_interrupt();
    fn spurious_interrupt();
}

/// The local APIC timer's vector (`idle=halt`).
pub const WAKE_VECTOR: u8 = 0x40;
/// The local APIC's spurious-interrupt vector.
pub const SPURIOUS_VECTOR: u8 = 0xff;

/// An interrupt gate to `addr`, on the current stack.
fn gate(addr: u64, selector: u16, ist: u8) -> Gate {
    Gate {
        offset_low: addr as u16,
        selector,
        ist,
        type_attr: 0x8e, // present, ring 0, 64-bit interrupt gate
        offset_mid: (addr >> 16) as u16,
        offset_high: (addr >> 32) as u32,
        reserved: 0,
    }
}

/// Loads the kernel's GDT (with a TSS for the IST stack) and the IDT.
pub fn init() {
    let tss = TSS.call_once(|| {
        let mut tss = TaskStateSegment::new();
        let base = VirtAddr::from_ptr(core::ptr::addr_of!(EXCEPTION_STACK));
        tss.interrupt_stack_table[usize::from(EXCEPTION_IST - 1)] =
            base + EXCEPTION_STACK_SIZE as u64;
        tss
    });
    let (gdt, code, data, tss_sel) = GDT.call_once(|| {
        let mut gdt = GlobalDescriptorTable::new();
        let code = gdt.append(Descriptor::kernel_code_segment());
        let data = gdt.append(Descriptor::kernel_data_segment());
        let tss_sel = gdt.append(Descriptor::tss_segment(tss));
        (gdt, code, data, tss_sel)
    });
    load_gdt(gdt, *code, *data, *tss_sel);

    let idt = IDT.call_once(|| {
        let mut idt = Idt([EMPTY_GATE; 256]);
        // SAFETY: `exception_stubs` is an immutable table of 32 addresses
        // emitted by exceptions.S.
        let stubs = unsafe { &*core::ptr::addr_of!(exception_stubs) };
        for (g, &addr) in idt.0.iter_mut().zip(stubs.iter()) {
            *g = gate(addr, code.0, EXCEPTION_IST);
        }
        idt.0[usize::from(WAKE_VECTOR)] = gate(wake_interrupt as *const () as u64, code.0, 0);
        idt.0[usize::from(SPURIOUS_VECTOR)] =
            gate(spurious_interrupt as *const () as u64, code.0, 0);
        idt
    });
    load_idt(idt);
}

fn load_gdt(
    gdt: &'static GlobalDescriptorTable,
    code: SegmentSelector,
    data: SegmentSelector,
    tss: SegmentSelector,
) {
    gdt.load();
    // SAFETY: the selectors index descriptors of the GDT just loaded, which
    // is 'static; code and data are flat ring-0 segments as the trampoline's.
    unsafe {
        CS::set_reg(code);
        DS::set_reg(data);
        ES::set_reg(data);
        SS::set_reg(data);
        load_tss(tss);
    }
}

fn load_idt(idt: &'static Idt) {
    let ptr = DescriptorTablePointer {
        limit: (core::mem::size_of::<Idt>() - 1) as u16,
        base: VirtAddr::from_ptr(idt as *const Idt),
    };
    // SAFETY: the IDT is 'static; every present gate points at a stub:
    // the exception stubs never return to the faulting code, the wake and
    // spurious stubs restore what they touch and return with `iretq`.
    unsafe { lidt(&ptr) };
}

/// Descriptor tables for an application processor: its own GDT, TSS and
/// IST stack (from the heap, kept for the kernel's life) and the shared IDT.
/// The GDT has the boot CPU's layout, so the IDT's selectors fit.
pub fn init_ap() {
    let stack: &'static mut [u8] = alloc::vec![0u8; EXCEPTION_STACK_SIZE].leak();
    let mut tss = TaskStateSegment::new();
    let top = VirtAddr::from_ptr(stack.as_ptr()) + EXCEPTION_STACK_SIZE as u64;
    tss.interrupt_stack_table[usize::from(EXCEPTION_IST - 1)] = top.align_down(16u64);
    let tss: &'static TaskStateSegment = alloc::boxed::Box::leak(alloc::boxed::Box::new(tss));
    let mut gdt = GlobalDescriptorTable::new();
    let code = gdt.append(Descriptor::kernel_code_segment());
    let data = gdt.append(Descriptor::kernel_data_segment());
    let tss_sel = gdt.append(Descriptor::tss_segment(tss));
    let gdt: &'static GlobalDescriptorTable = alloc::boxed::Box::leak(alloc::boxed::Box::new(gdt));
    load_gdt(gdt, code, data, tss_sel);
    match IDT.get() {
        Some(idt) => load_idt(idt),
        None => panic!("an application processor started before the boot CPU's IDT"),
    }
}

/// What `exception_common` leaves on the stack, lowest address first.
#[repr(C)]
pub struct ExceptionFrame {
    r15: u64,
    r14: u64,
    r13: u64,
    r12: u64,
    r11: u64,
    r10: u64,
    r9: u64,
    r8: u64,
    rbp: u64,
    rdi: u64,
    rsi: u64,
    rdx: u64,
    rcx: u64,
    rbx: u64,
    rax: u64,
    vector: u64,
    error_code: u64,
    rip: u64,
    cs: u64,
    rflags: u64,
    rsp: u64,
    ss: u64,
}

fn vector_name(v: u64) -> &'static str {
    match v {
        0 => "#DE divide error",
        1 => "#DB debug",
        2 => "NMI",
        3 => "#BP breakpoint",
        4 => "#OF overflow",
        5 => "#BR bound range",
        6 => "#UD invalid opcode",
        7 => "#NM device not available",
        8 => "#DF double fault",
        10 => "#TS invalid TSS",
        11 => "#NP segment not present",
        12 => "#SS stack fault",
        13 => "#GP general protection",
        14 => "#PF page fault",
        16 => "#MF x87 error",
        17 => "#AC alignment check",
        18 => "#MC machine check",
        19 => "#XM SIMD error",
        20 => "#VE virtualization",
        21 => "#CP control protection",
        _ => "reserved",
    }
}

/// Called by `exception_common` with the saved state; never returns.
#[no_mangle]
extern "C" fn exception_report(frame: &ExceptionFrame) -> ! {
    crate::console::emergency();
    let cr2 = Cr2::read_raw();
    println!(
        "FATAL: exception {} ({}) rip={:#x} error={:#x} cr2={:#x}",
        frame.vector,
        vector_name(frame.vector),
        frame.rip,
        frame.error_code,
        cr2
    );
    println!(
        "  rax={:#x} rbx={:#x} rcx={:#x} rdx={:#x} rsi={:#x} rdi={:#x} rbp={:#x} rsp={:#x}",
        frame.rax, frame.rbx, frame.rcx, frame.rdx, frame.rsi, frame.rdi, frame.rbp, frame.rsp
    );
    println!(
        "  r8={:#x} r9={:#x} r10={:#x} r11={:#x} r12={:#x} r13={:#x} r14={:#x} r15={:#x}",
        frame.r8, frame.r9, frame.r10, frame.r11, frame.r12, frame.r13, frame.r14, frame.r15
    );
    println!(
        "  cs={:#x} ss={:#x} rflags={:#x}",
        frame.cs, frame.ss, frame.rflags
    );
    exit::failure();
}

/// Executes `ud2`, for the `test-fault=invalid-opcode` switch.
pub fn invalid_opcode() -> ! {
    // SAFETY: ud2 raises #UD, which the reporter turns into a failure exit.
    unsafe { core::arch::asm!("ud2", options(noreturn)) }
}
