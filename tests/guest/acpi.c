/*
 * The ACPI power button, without ACPI tables or an SCI handler: the guest polls.
 *
 * QMP system_powerdown (libvirt's `virsh shutdown`) makes QEMU set PWRBTN_STS in the PM1
 * status register, but only if the guest set PWRBTN_EN in PM1_EN (hw/acpi/core.c,
 * acpi_pm1_evt_power_down). A guest answers by writing SLP_TYP and SLP_EN to PM1_CNT;
 * SLP_TYP 0 is soft-off (S5), which QEMU turns into a guest shutdown
 * (acpi_pm1_cnt_write), so QEMU exits, or stops in the shutdown state under -no-shutdown.
 *
 * The PM1 registers sit in the chipset's PM I/O block, wherever the firmware put it: on the
 * `pc` machine the PIIX4 PM function (00:01.3) decodes it at PMBA (config 0x40) once
 * PMREGMISC (0x80) bit 0 is set (hw/acpi/piix4.c, pm_io_space_update); on `q35` the ICH9
 * LPC bridge (00:1f.0) at PMBASE (0x40) once ACPI_CNTL (0x44) bit 7 is set. SeaBIOS places
 * it at 0x600 on both. Every register is 16 bits wide and QEMU accepts only 16-bit accesses.
 * The enable bit is device state, so it crosses a migration with the guest.
 *
 * PCI hot-unplug (QMP device_del, `virsh detach-device`) on `pc` goes through the same
 * chipset: QEMU sets the slot's bit in the PIIX4 ACPI PCI hotplug "down" register and waits
 * for the guest's _EJ0 method to write that bit to the eject register; only then is the
 * device removed and DEVICE_DELETED sent (hw/acpi/pcihp.c, acpi_pcihp_eject_slot). The guest
 * does what _EJ0 would, for the root bus (BSEL 0): the registers are at 0xae00 (up, down,
 * eject, removable, select), 32 bits each, and one eject write releases one slot.
 */
#include "guest.h"

#define PCI_ADDR 0xcf8
#define PCI_DATA 0xcfc

#define PIIX4_PM_ID 0x71138086u   /* 8086:7113, 00:01.3 */
#define ICH9_LPC_ID 0x29188086u   /* 8086:2918, 00:1f.0 */

#define PM1_STS 0
#define PM1_EN 2
#define PM1_CNT 4
#define PWRBTN 0x0100u            /* PWRBTN_STS and PWRBTN_EN: bit 8 of both */
#define SLP_TYP_MASK 0x1c00u      /* bits 12:10 */
#define SLP_EN 0x2000u            /* bit 13 */

#define PCIHP_BASE 0xae00         /* ACPI_PCIHP_ADDR_PIIX4 */
#define PCIHP_DOWN 0x04
#define PCIHP_EJECT 0x08
#define PCIHP_SELECT 0x10

static u16 pm_base;
static int piix4;

static u32 pci_read(u32 dev, u32 fn, u32 reg)
{
	outl(PCI_ADDR, 0x80000000u | (dev << 11) | (fn << 8) | (reg & 0xfc));
	return inl(PCI_DATA);
}

/* The PM I/O base the firmware programmed and enabled, or 0. */
static u16 find_pm_block(void)
{
	if (pci_read(1, 3, 0x00) == PIIX4_PM_ID) {
		piix4 = 1;
		if (!(pci_read(1, 3, 0x80) & 0x01))
			return 0;
		return (u16)(pci_read(1, 3, 0x40) & 0xffc0u);
	}
	if (pci_read(31, 0, 0x00) == ICH9_LPC_ID) {
		if (!(pci_read(31, 0, 0x44) & 0x80))
			return 0;
		return (u16)(pci_read(31, 0, 0x40) & 0xff80u);
	}
	return 0;
}

/* Arms the power button; returns the PM I/O base, 0 if there is no PM block to use. */
u16 acpi_init(void)
{
	pm_base = find_pm_block();
	if (!pm_base)
		return 0;
	outw(pm_base + PM1_STS, PWRBTN); /* write 1 to clear a stale press */
	outw(pm_base + PM1_EN, (u16)(inw(pm_base + PM1_EN) | PWRBTN));
	return pm_base;
}

int acpi_power_button_pressed(void)
{
	return pm_base && (inw(pm_base + PM1_STS) & PWRBTN);
}

/* Requests S5 (soft-off). QEMU acts on it after the write returns. */
void acpi_poweroff(void)
{
	u16 cnt;

	if (!pm_base)
		return;
	outw(pm_base + PM1_STS, PWRBTN);
	cnt = inw(pm_base + PM1_CNT);
	outw(pm_base + PM1_CNT, (u16)((cnt & ~SLP_TYP_MASK) | SLP_EN));
}

/*
 * Ejects every root-bus slot QEMU asked the guest to release (a pending device_del);
 * returns the slots ejected, as a bit mask.
 */
u32 acpi_eject_unplugged_slots(void)
{
	u32 down, slot;

	if (!piix4)
		return 0;
	outl(PCIHP_BASE + PCIHP_SELECT, 0);
	down = inl(PCIHP_BASE + PCIHP_DOWN);
	for (slot = 0; slot < 32; slot++)
		if (down & (1u << slot))
			outl(PCIHP_BASE + PCIHP_EJECT, 1u << slot);
	return down;
}
