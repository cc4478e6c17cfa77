/*
 * Application-processor start-up code. The boot CPU copies the bytes from
 * ap_trampoline_start to ap_trampoline_end to AP_BASE (below 1 MiB), fills
 * in the data words at the end, and sends INIT-SIPI-SIPI with vector
 * AP_BASE >> 12. The AP starts in real mode at CS:IP = AP_BASE >> 4 : 0,
 * goes through protected mode into long mode on the kernel's page tables,
 * and calls ap_entry(ap_arg) on the stack it was given. Every address is
 * AP_BASE plus an offset inside this blob, since it does not run where it
 * was linked.
 */
    .set AP_BASE, 0x8000

    .section .rodata.ap_trampoline, "a"
    .balign 16
    .global ap_trampoline_start
    .global ap_trampoline_end
    .global ap_cr3
    .global ap_stack
    .global ap_entry
    .global ap_arg

    .code16
ap_trampoline_start:
    cli
    cld
    movw %cs, %ax
    movw %ax, %ds
    lgdtl (ap_gdt_ptr - ap_trampoline_start)
    movl %cr0, %eax
    orl $1, %eax
    movl %eax, %cr0
    ljmpl $0x08, $(AP_BASE + ap_pm32 - ap_trampoline_start)

    .code32
ap_pm32:
    movw $0x10, %ax
    movw %ax, %ds
    movw %ax, %es
    movw %ax, %ss
    movl %cr4, %eax             /* PAE */
    orl $0x20, %eax
    movl %eax, %cr4
    movl (AP_BASE + ap_cr3 - ap_trampoline_start), %eax
    movl %eax, %cr3
    movl $0xc0000080, %ecx      /* EFER.LME | EFER.NXE */
    rdmsr
    orl $0x900, %eax
    wrmsr
    movl %cr0, %eax             /* PG | WP | PE */
    orl $0x80010001, %eax
    movl %eax, %cr0
    ljmpl $0x18, $(AP_BASE + ap_lm64 - ap_trampoline_start)

    .code64
ap_lm64:
    movw $0x10, %ax
    movw %ax, %ds
    movw %ax, %es
    movw %ax, %ss
    xorw %ax, %ax
    movw %ax, %fs
    movw %ax, %gs
    movq (AP_BASE + ap_stack - ap_trampoline_start), %rsp
    movq (AP_BASE + ap_arg - ap_trampoline_start), %rdi
    movq (AP_BASE + ap_entry - ap_trampoline_start), %rax
    xorl %ebp, %ebp
    callq *%rax
2:  cli
    hlt
    jmp 2b

    .balign 8
ap_gdt:
    .quad 0
    .quad 0x00cf9a000000ffff    /* 0x08: 32-bit code */
    .quad 0x00cf92000000ffff    /* 0x10: data */
    .quad 0x00af9a000000ffff    /* 0x18: 64-bit code */
ap_gdt_ptr:
    .word ap_gdt_ptr - ap_gdt - 1
    .long AP_BASE + ap_gdt - ap_trampoline_start

    .balign 8
ap_cr3:
    .quad 0
ap_stack:
    .quad 0
ap_entry:
    .quad 0
ap_arg:
    .quad 0
ap_trampoline_end:
