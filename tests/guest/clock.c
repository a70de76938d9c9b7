/*
 * Time base: the TSC, calibrated once at boot against PIT channel 2.
 *
 * Under TCG QEMU derives the guest TSC from the host's clock, and its PIT from
 * QEMU_CLOCK_VIRTUAL, so counting TSC ticks over a PIT one-shot gives the rate the
 * heartbeat loop needs. Channel 2 is used because its output can be polled through
 * port 0x61 without interrupts, and its gate is under our control.
 */
#include "guest.h"

#define PIT_HZ 1193182u
#define CALIBRATE_MS 20u

u64 tsc_per_ms(void)
{
	const u32 count = PIT_HZ * CALIBRATE_MS / 1000u;
	u64 t0, t1;
	u32 spins = 0;
	u8 ctl;

	ctl = inb(0x61);
	outb(0x61, (u8)((ctl & ~0x02) | 0x01)); /* gate on, speaker off */
	outb(0x43, 0xb0);                        /* channel 2, lo/hi byte, mode 0 */
	outb(0x42, (u8)(count & 0xff));
	outb(0x42, (u8)(count >> 8));
	t0 = rdtsc();
	/* OUT2 (port 0x61 bit 5) rises when the count reaches zero. */
	while (!(inb(0x61) & 0x20)) {
		if (++spins > 200000000u)
			return 0;
	}
	t1 = rdtsc();
	outb(0x61, ctl);
	return (t1 - t0) / CALIBRATE_MS;
}
