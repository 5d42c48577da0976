/*
 * example.h - the two helpers every example shares: how a failure is reported, and where the
 * NVMe controller's address comes from. Nothing here is part of nvaio's API.
 */
#ifndef NVAIO_EXAMPLE_H
#define NVAIO_EXAMPLE_H

#include <stdio.h>
#include <stdlib.h>

/* Print "FAIL what: detail", the line ci/c-tests looks for, and exit with status 1. */
static void fail(const char *what, const char *detail)
{
	printf("FAIL %s: %s\n", what, detail);
	exit(1);
}

/* The device address: argv[1], else $NVAIO_DEV0_ADDR, else the first of $NVAIO_DEVICES (the
 * variables ci/qemu-run sets in its guests). */
static const char *device_address(int argc, char **argv)
{
	static char first[64];
	const char *s;

	if (argc > 1)
		return argv[1];
	s = getenv("NVAIO_DEV0_ADDR");
	if (s && *s)
		return s;
	s = getenv("NVAIO_DEVICES");
	if (s && sscanf(s, "%63s", first) == 1)
		return first;
	fail("setup", "no device: pass a PCI address or set NVAIO_DEVICES");
	return NULL;
}

#endif
