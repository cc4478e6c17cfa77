/*
 * CPU exception entry stubs (vectors 0-31). Each stub makes the stack look
 * the same (vector, error code or 0, then the CPU's frame), saves the
 * general registers and calls exception_report, which never returns: any
 * exception in Portcullis is a bug to report, not a condition to resume.
 */
    .section .text
    .code64

.macro STUB_NOERR n
exception_stub_\n:
    pushq $0
    pushq $\n
    jmp exception_common
.endm

.macro STUB_ERR n
exception_stub_\n:
    pushq $\n
    jmp exception_common
.endm

.irp n, 0,1,2,3,4,5,6,7,9,15,16,18,19,20,22,23,24,25,26,27,28,31
    STUB_NOERR \n
.endr
.irp n, 8,10,11,12,13,14,17,21,29,30
    STUB_ERR \n
.endr

exception_common:
    pushq %rax
    pushq %rbx
    pushq %rcx
    pushq %rdx
    pushq %rsi
    pushq %rdi
    pushq %rbp
    pushq %r8
    pushq %r9
    pushq %r10
    pushq %r11
    pushq %r12
    pushq %r13
    pushq %r14
    pushq %r15
    movq %rsp, %rdi
    andq $-16, %rsp
    call exception_report
3:  cli
    hlt
    jmp 3b

/*
 * The local APIC timer's interrupt (idle=halt): it only ends a `hlt`, so
 * it acknowledges the interrupt (EOI register of the xAPIC, identity
 * mapped) and returns. Interrupts are enabled only across that `hlt`, so
 * this never lands in the middle of other code.
 */
    .global wake_interrupt
wake_interrupt:
    pushq %rax
    movl $0xfee000b0, %eax
    movl $0, (%rax)
    popq %rax
    iretq

/* The APIC's spurious vector: no EOI. */
    .global spurious_interrupt
spurious_interrupt:
    iretq

    .section .rodata
    .balign 8
    .global exception_stubs
exception_stubs:
.irp n, 0,1,2,3,4,5,6,7,8,9,10,11,12,13,14,15,16,17,18,19,20,21,22,23,24,25,26,27,28,29,30,31
    .quad exception_stub_\n
.endr
