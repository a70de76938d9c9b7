/*
 * The heartbeat guest.
 *
 * Serial protocol (COM1, one line each):
 *   BOOT tsc_per_ms=<n> base=<hex> end=<hex> stride=<n> acpi_pm=<hex>
 *                                            (acpi_pm: PM I/O base, 0 if no power button)
 *   READY mem=<bytes>                        after the first full fill
 *   HB <counter> err=<errors> pass=<passes>  about every hb_us (default 1 ms);
 *                                            " drop=<n>" is appended once lines were lost
 *   ERR addr=<hex> want=<hex> got=<hex>      for the first MAX_ERR_LINES mismatches
 *   POWEROFF                                 the ACPI power button was pressed (QMP
 *                                            system_powerdown); the guest then asks for
 *                                            soft-off (S5) and halts
 *   EJECT slots=<hex>                        PCI slots released on QEMU's request
 *                                            (device_del), as a bit mask
 *
 * RAM from TEST_BASE to the end holds, one word every `stride` bytes, the value
 * addr ^ seed(generation). Each pass walks all of it page by page, checks every
 * sampled word against the previous generation and rewrites it with the next, so
 * every 4 KiB page is read and dirtied once per pass. A page that a migration lost
 * (zero, stale generation, another page's contents) fails the check. Between two
 * pages the loop looks at the TSC and emits a heartbeat when it is due, so the
 * heartbeat interval does not depend on the RAM size. With each heartbeat it also
 * looks at the power button and at PCI unplug requests (acpi.c).
 */
#include "guest.h"

#define MB_BOOT_MAGIC 0x2BADB002u
#define MB_INFO_MEM (1u << 0)
#define MB_INFO_CMDLINE (1u << 2)
#define MAX_ERR_LINES 16u
#define MAX_END 0xfffff000u

struct multiboot_info {
	u32 flags;
	u32 mem_lower; /* KiB below 640 KiB */
	u32 mem_upper; /* KiB from 1 MiB to the first hole */
	u32 boot_device;
	u32 cmdline;   /* physical address of a NUL-terminated string */
};

static struct options opt = { .mem_bytes = 0, .stride = 64, .hb_us = 1000, .ports = 1 };
static char cmdline[1024];
static u64 hb_period;
static u64 next_hb;
static u64 hb_count;
static u32 errors;
static u32 err_lines;
static u32 passes;

/* Distinct for every generation: (gen + 1) * odd is a bijection on u32. */
static u32 seed(u32 gen)
{
	return ((gen + 1u) * 0x9e3779b9u) ^ 0xa5c3e10fu;
}

static void poweroff(void)
{
	out_str("POWEROFF");
	out_line_end();
	uart_flush();
	acpi_poweroff();
	for (;;)
		__asm__ volatile("hlt");
}

static void eject_unplugged(void)
{
	u32 slots = acpi_eject_unplugged_slots();

	if (slots) {
		out_str("EJECT slots=");
		out_hex(slots);
		out_line_end();
	}
}

static void heartbeat_if_due(void)
{
	u64 now = rdtsc();

	if ((s64)(now - next_hb) >= 0) {
		hb_count++;
		out_str("HB ");
		out_u64(hb_count);
		out_str(" err=");
		out_u64(errors);
		out_str(" pass=");
		out_u64(passes);
		if (uart_dropped_lines()) {
			out_str(" drop=");
			out_u64(uart_dropped_lines());
		}
		out_line_end();
		next_hb += hb_period;
		/*
		 * After a stall (VM paused, host busy) or a TSC that moved backwards across
		 * a migration, restart the schedule from now instead of sending a burst.
		 */
		if ((s64)(now - next_hb) >= 0 || (s64)(next_hb - now) > (s64)(2 * hb_period))
			next_hb = now + hb_period;
		if (acpi_power_button_pressed())
			poweroff();
		eject_unplugged();
	}
	uart_drain();
}

static void mismatch(u32 addr, u32 want, u32 got)
{
	errors++;
	if (err_lines < MAX_ERR_LINES) {
		err_lines++;
		out_str("ERR addr=");
		out_hex(addr);
		out_str(" want=");
		out_hex(want);
		out_str(" got=");
		out_hex(got);
		out_line_end();
	}
}

static void fill(u32 base, u32 end, u32 s)
{
	const u32 stride = opt.stride;
	u32 page, a;

	for (page = base; page < end; page += PAGE_SIZE) {
		for (a = page; a < page + PAGE_SIZE; a += stride)
			*(volatile u32 *)a = a ^ s;
		heartbeat_if_due();
	}
}

static void check_and_advance(u32 base, u32 end, u32 s_old, u32 s_new)
{
	const u32 stride = opt.stride;
	u32 page, a, v;

	for (page = base; page < end; page += PAGE_SIZE) {
		for (a = page; a < page + PAGE_SIZE; a += stride) {
			v = *(volatile u32 *)a;
			if (v != (a ^ s_old))
				mismatch(a, a ^ s_old, v);
			*(volatile u32 *)a = a ^ s_new;
		}
		heartbeat_if_due();
	}
}

static void halt_with(const char *msg)
{
	out_str("FATAL ");
	out_str(msg);
	out_line_end();
	for (;;)
		__asm__ volatile("hlt");
}

static u32 ram_end(const struct multiboot_info *mbi)
{
	u64 end = 0;

	if (opt.mem_bytes)
		end = opt.mem_bytes;
	else if (mbi->flags & MB_INFO_MEM)
		end = 0x100000ull + (u64)mbi->mem_upper * 1024u;
	if (end > MAX_END)
		end = MAX_END;
	return (u32)end & ~(PAGE_SIZE - 1);
}

void guest_main(u32 magic, const struct multiboot_info *mbi)
{
	u32 end, gen = 0, i;
	u64 per_ms;
	u16 pm;

	uart_init();
	if (magic != MB_BOOT_MAGIC)
		halt_with("not started by a multiboot loader");
	if (mbi->flags & MB_INFO_CMDLINE) {
		const char *src = (const char *)mbi->cmdline;
		for (i = 0; i + 1 < sizeof(cmdline) && src[i]; i++)
			cmdline[i] = src[i];
		cmdline[i] = 0;
		parse_cmdline(cmdline, &opt);
	}
	uart_mirror(opt.ports);
	end = ram_end(mbi);
	if (end <= TEST_BASE)
		halt_with("no RAM above 2 MiB (give mem= or boot with more memory)");

	pm = acpi_init();
	per_ms = tsc_per_ms();
	if (per_ms == 0)
		halt_with("PIT channel 2 never fired; cannot calibrate the TSC");
	hb_period = per_ms * opt.hb_us / 1000u;
	next_hb = rdtsc() + hb_period;

	out_str("BOOT tsc_per_ms=");
	out_u64(per_ms);
	out_str(" base=");
	out_hex(TEST_BASE);
	out_str(" end=");
	out_hex(end);
	out_str(" stride=");
	out_u64(opt.stride);
	out_str(" acpi_pm=");
	out_hex(pm);
	out_line_end();

	fill(TEST_BASE, end, seed(gen));
	out_str("READY mem=");
	out_u64(end);
	out_line_end();

	if (opt.selftest_corrupt) {
		/* One word the next pass must flag, in the middle of the tested range. */
		u32 victim = (TEST_BASE + (end - TEST_BASE) / 2) & ~(PAGE_SIZE - 1);
		*(volatile u32 *)victim = ~(victim ^ seed(gen));
	}

	for (;;) {
		check_and_advance(TEST_BASE, end, seed(gen), seed(gen + 1));
		gen++;
		passes++;
	}
}
