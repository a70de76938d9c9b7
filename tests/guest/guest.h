/*
 * Shared declarations of the heartbeat guest: a freestanding 32-bit program that
 * proves from inside a VM that it keeps running (a serial heartbeat about every
 * millisecond) and that its RAM survives intact (a rolling pattern check).
 */
#ifndef GUEST_H
#define GUEST_H

typedef unsigned char u8;
typedef unsigned short u16;
typedef unsigned int u32;
typedef unsigned long long u64;
typedef long long s64;

/* First byte the RAM tester owns; the image, its stack and the multiboot info sit below. */
#define TEST_BASE 0x200000u
#define PAGE_SIZE 4096u

static inline void outb(u16 port, u8 val)
{
	__asm__ volatile("outb %0, %1" : : "a"(val), "Nd"(port));
}

static inline u8 inb(u16 port)
{
	u8 val;
	__asm__ volatile("inb %1, %0" : "=a"(val) : "Nd"(port));
	return val;
}

static inline void outw(u16 port, u16 val)
{
	__asm__ volatile("outw %0, %1" : : "a"(val), "Nd"(port));
}

static inline u16 inw(u16 port)
{
	u16 val;
	__asm__ volatile("inw %1, %0" : "=a"(val) : "Nd"(port));
	return val;
}

static inline void outl(u16 port, u32 val)
{
	__asm__ volatile("outl %0, %1" : : "a"(val), "Nd"(port));
}

static inline u32 inl(u16 port)
{
	u32 val;
	__asm__ volatile("inl %1, %0" : "=a"(val) : "Nd"(port));
	return val;
}

static inline u64 rdtsc(void)
{
	u32 lo, hi;
	__asm__ volatile("rdtsc" : "=a"(lo), "=d"(hi));
	return ((u64)hi << 32) | lo;
}

/* uart.c: COM1 output through a ring buffer, so a slow port never stalls the tester. */
void uart_init(void);
void uart_mirror(u32 ports);
void uart_drain(void);
void out_str(const char *s);
void out_u64(u64 v);
void out_hex(u32 v);
void out_line_end(void);
void uart_flush(void);
u32 uart_dropped_lines(void);

/* clock.c: TSC calibrated against PIT channel 2. */
u64 tsc_per_ms(void);

/*
 * acpi.c: the ACPI power button (what QMP system_powerdown and `virsh shutdown` press), and
 * the guest's part of PCI hot-unplug (device_del, `virsh detach-device`) on `pc`.
 */
u16 acpi_init(void);
int acpi_power_button_pressed(void);
void acpi_poweroff(void);
u32 acpi_eject_unplugged_slots(void);

/* cmdline.c */
struct options {
	u64 mem_bytes;      /* 0: take the size from multiboot mem_upper */
	u32 stride;         /* bytes between checked words (4..4096, power of two) */
	u32 hb_us;          /* heartbeat period */
	int selftest_corrupt;
	u32 ports;          /* COM ports the output goes to, 1..4 */
};
void parse_cmdline(const char *cmdline, struct options *opt);
u64 parse_size(const char *s, const char **end);

#endif
