/*
 * PVH entry. Xen and QEMU's PVH option ROM enter here in 32-bit protected
 * mode, paging off, interrupts off, with %ebx = physical address of the
 * hvm_start_info. We zero .bss, identity-map the first 4 GiB with 2 MiB
 * pages, enter long mode and call kernel_main(start_info_paddr).
 */

    .section .note.Xen, "a", @note
    .balign 4
    .long 4                     /* namesz: "Xen\0" */
    .long 8                     /* descsz: a 64-bit address */
    .long 18                    /* XEN_ELFNOTE_PHYS32_ENTRY */
    .asciz "Xen"
    .balign 4
    .quad pvh_start32
    .balign 4

    .section .text.boot, "ax"
    .code32
    .global pvh_start32
pvh_start32:
    cli
    cld
    movl %ebx, %esi             /* start info; %esi survives to long mode */

    movl $__bss_start, %edi     /* the loader need not have zeroed .bss */
    movl $__bss_end, %ecx
    subl %edi, %ecx
    xorl %eax, %eax
    rep stosb

    movl $boot_stack_top, %esp

    movl $boot_pdpt, %eax       /* PML4[0] -> PDPT */
    orl $0x3, %eax
    movl %eax, boot_pml4

    movl $boot_pd, %eax         /* PDPT[0..4] -> four page directories */
    orl $0x3, %eax
    movl %eax, boot_pdpt
    addl $0x1000, %eax
    movl %eax, boot_pdpt + 8
    addl $0x1000, %eax
    movl %eax, boot_pdpt + 16
    addl $0x1000, %eax
    movl %eax, boot_pdpt + 24

    movl $boot_pd, %edi         /* PD[i] = i * 2 MiB | PS | RW | P */
    xorl %ecx, %ecx
1:  movl %ecx, %eax
    shll $21, %eax
    orl $0x83, %eax
    movl %eax, (%edi, %ecx, 8)
    movl $0, 4(%edi, %ecx, 8)
    incl %ecx
    cmpl $2048, %ecx
    jne 1b

    movl %cr4, %eax             /* PAE */
    orl $0x20, %eax
    movl %eax, %cr4

    movl $boot_pml4, %eax
    movl %eax, %cr3

    movl $0xc0000080, %ecx      /* EFER.LME | EFER.NXE */
    rdmsr
    orl $0x900, %eax
    wrmsr

    movl %cr0, %eax             /* PG | WP | PE */
    orl $0x80010001, %eax
    movl %eax, %cr0

    lgdt boot_gdt_ptr
    ljmp $0x08, $long_mode_entry

    .code64
long_mode_entry:
    movw $0x10, %ax
    movw %ax, %ds
    movw %ax, %es
    movw %ax, %ss
    xorw %ax, %ax
    movw %ax, %fs
    movw %ax, %gs
    movq $boot_stack_top, %rsp
    xorl %ebp, %ebp
    movl %esi, %edi             /* zero-extended start info address */
    call kernel_main
2:  cli
    hlt
    jmp 2b

    .section .rodata
    .balign 8
boot_gdt:
    .quad 0
    /* Accessed bits set: the CPU need not write to a read-only page. */
    .quad 0x00af9b000000ffff    /* 0x08: 64-bit code, ring 0 */
    .quad 0x00cf93000000ffff    /* 0x10: data */
boot_gdt_ptr:
    .word boot_gdt_ptr - boot_gdt - 1
    .long boot_gdt

    .section .bss
    .balign 4096
    .global boot_pml4
boot_pml4:
    .skip 4096
boot_pdpt:
    .skip 4096
boot_pd:
    .skip 4096 * 4
    .balign 16
boot_stack:
    .skip 65536
boot_stack_top:
