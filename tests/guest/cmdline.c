/*
 * Kernel command line (QEMU passes "<kernel path> <-append text>"):
 *   mem=<size>          RAM size in bytes, K/M/G suffix allowed; wins over multiboot
 *   stride=<bytes>      distance between checked words, power of two in [4, 4096]
 *   hb_us=<micros>      heartbeat period, default 1000
 *   selftest-corrupt    after READY, damage one word once, so the host can see that
 *                       a lost write is reported (the checker must be able to fail)
 *   ports=<n>           send every line to COM1..COMn (1..4), each port at its pace
 */
#include "guest.h"

static int starts_with(const char *s, const char *prefix)
{
	while (*prefix)
		if (*s++ != *prefix++)
			return 0;
	return 1;
}

static int is_space(char c)
{
	return c == ' ' || c == '\t';
}

u64 parse_size(const char *s, const char **end)
{
	u64 v = 0;

	while (*s >= '0' && *s <= '9')
		v = v * 10 + (u64)(*s++ - '0');
	switch (*s) {
	case 'k': case 'K': v <<= 10; s++; break;
	case 'm': case 'M': v <<= 20; s++; break;
	case 'g': case 'G': v <<= 30; s++; break;
	}
	*end = s;
	return v;
}

void parse_cmdline(const char *s, struct options *opt)
{
	const char *end;
	u64 v;

	while (*s) {
		while (is_space(*s))
			s++;
		if (starts_with(s, "mem=")) {
			opt->mem_bytes = parse_size(s + 4, &end);
			s = end;
		} else if (starts_with(s, "stride=")) {
			v = parse_size(s + 7, &end);
			if (v >= 4 && v <= PAGE_SIZE && (v & (v - 1)) == 0)
				opt->stride = (u32)v;
			s = end;
		} else if (starts_with(s, "hb_us=")) {
			v = parse_size(s + 6, &end);
			if (v > 0 && v < 10000000)
				opt->hb_us = (u32)v;
			s = end;
		} else if (starts_with(s, "ports=")) {
			v = parse_size(s + 6, &end);
			if (v >= 1 && v <= 4)
				opt->ports = (u32)v;
			s = end;
		} else if (starts_with(s, "selftest-corrupt")) {
			opt->selftest_corrupt = 1;
			s += 16;
		}
		while (*s && !is_space(*s))
			s++;
	}
}
