/*
 * COM1 (16550 at 0x3f8) output, mirrored to COM2..COM4 when asked (ports=N).
 *
 * Text goes into a ring buffer and uart_drain() moves bytes to the transmit holding
 * register only while the line status register reports it empty. QEMU's UART sends
 * a byte synchronously, so the buffer normally empties at once; but if the host
 * stops reading the chardev, THRE stays clear and the guest would hang on a
 * busy-wait. Buffering instead keeps the memory tester and heartbeat clock going;
 * when the buffer is full whole lines are dropped and counted.
 *
 * With more than one port, every port sends the same lines from the same ring, each at its
 * own pace: a test can watch one console through one host path and another through another,
 * and compare. The ring is full when the slowest port is a ring behind.
 */
#include "guest.h"

#define COM1 0x3f8
#define MAX_PORTS 4u
#define UART_THR 0
#define UART_IER 1
#define UART_FCR 2
#define UART_LCR 3
#define UART_MCR 4
#define UART_LSR 5
#define LSR_THRE 0x20

#define RING_SIZE 16384u /* power of two */

static const u16 port_base[MAX_PORTS] = { COM1, 0x2f8, 0x3e8, 0x2e8 };
static u32 nports = 1;
static char ring[RING_SIZE];
static u32 ring_head; /* next byte to write into */
static u32 ring_tail[MAX_PORTS]; /* next byte each port sends */
static u32 line_start;
static int line_dropping;
static u32 dropped_lines;

static void port_init(u16 base)
{
	outb(base + UART_IER, 0x00);      /* no interrupts: the guest polls */
	outb(base + UART_LCR, 0x80);      /* DLAB on to set the divisor */
	outb(base + UART_THR, 0x01);      /* 115200 baud */
	outb(base + UART_IER, 0x00);
	outb(base + UART_LCR, 0x03);      /* 8N1, DLAB off */
	outb(base + UART_FCR, 0x00);      /* FIFO off: one byte at a time */
	outb(base + UART_MCR, 0x03);      /* DTR, RTS */
}

void uart_init(void)
{
	port_init(COM1);
}

void uart_mirror(u32 ports)
{
	u32 p;

	if (ports > MAX_PORTS)
		ports = MAX_PORTS;
	/* The new ports start with the next line. */
	for (p = nports; p < ports; p++) {
		port_init(port_base[p]);
		ring_tail[p] = line_start;
	}
	if (ports > nports)
		nports = ports;
}

void uart_drain(void)
{
	u32 p;

	/* Only complete lines are sent: bytes before line_start. */
	for (p = 0; p < nports; p++) {
		while (ring_tail[p] != line_start) {
			if (!(inb(port_base[p] + UART_LSR) & LSR_THRE))
				break;
			outb(port_base[p] + UART_THR, (u8)ring[ring_tail[p] & (RING_SIZE - 1)]);
			ring_tail[p]++;
		}
	}
}

static int sent_all(void)
{
	u32 p;

	for (p = 0; p < nports; p++)
		if (ring_tail[p] != line_start)
			return 0;
	return 1;
}

/* Sends every complete line before returning, waiting for the port if it must (boundedly). */
void uart_flush(void)
{
	u32 spins = 0;

	while (!sent_all() && spins++ < 100000000u)
		uart_drain();
}

/* Bytes the slowest port has yet to send. */
static u32 backlog(void)
{
	u32 p, most = 0;

	for (p = 0; p < nports; p++)
		if (ring_head - ring_tail[p] > most)
			most = ring_head - ring_tail[p];
	return most;
}

static void put(char c)
{
	if (line_dropping)
		return;
	if (backlog() >= RING_SIZE) {
		/* Full: forget the partial line so the host never sees half of one. */
		ring_head = line_start;
		line_dropping = 1;
		return;
	}
	ring[ring_head & (RING_SIZE - 1)] = c;
	ring_head++;
}

void out_line_end(void)
{
	if (line_dropping) {
		dropped_lines++;
		line_dropping = 0;
	} else {
		put('\n');
		if (line_dropping)
			dropped_lines++;
		line_dropping = 0;
	}
	line_start = ring_head;
	uart_drain();
}

u32 uart_dropped_lines(void)
{
	return dropped_lines;
}

void out_str(const char *s)
{
	while (*s)
		put(*s++);
}

void out_u64(u64 v)
{
	char buf[21];
	int i = 20;

	buf[i] = 0;
	do {
		buf[--i] = (char)('0' + v % 10);
		v /= 10;
	} while (v);
	out_str(&buf[i]);
}

void out_hex(u32 v)
{
	static const char digits[] = "0123456789abcdef";
	char buf[11];
	int i;

	buf[0] = '0';
	buf[1] = 'x';
	for (i = 0; i < 8; i++)
		buf[2 + i] = digits[(v >> (28 - 4 * i)) & 0xf];
	buf[10] = 0;
	out_str(buf);
}
