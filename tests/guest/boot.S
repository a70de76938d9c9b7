/*
 * Multiboot (v1) entry point of the heartbeat guest.
 *
 * QEMU's -kernel loader recognises a 32-bit ELF carrying this header in its first
 * 8 KiB, loads the PT_LOAD segments at their physical addresses and jumps to the ELF
 * entry in flat 32-bit protected mode with paging and interrupts off, EAX holding the
 * bootloader magic and EBX the physical address of the multiboot information.
 */

#define MB_MAGIC      0x1BADB002
/* bit 0: page-align modules; bit 1: fill mem_lower/mem_upper. */
#define MB_FLAGS      0x00000003

	.section .multiboot, "a"
	.align 4
	.long MB_MAGIC
	.long MB_FLAGS
	.long -(MB_MAGIC + MB_FLAGS)

	.section .bss
	.align 16
stack_bottom:
	.skip 16384
stack_top:

	.section .text
	.globl _start
_start:
	cli
	movl $stack_top, %esp
	cld
	pushl %ebx              /* multiboot info */
	pushl %eax              /* bootloader magic */
	call guest_main
1:	hlt
	jmp 1b

	.section .note.GNU-stack, "", @progbits
