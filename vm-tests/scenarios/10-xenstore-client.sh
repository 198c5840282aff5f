#!/bin/sh
# Scenario 10 (dom0 side): blkbackd's Xenstore client against the real C
# xenstored of a Xen dom0. The harness copies the blkbackd binary to
# /usr/bin/blkbackd and runs this once xenstored is up; it judges by the
# VMTEST-MARK lines on the serial console.
#
# The checks are the same ones the host test suite runs against the embedded
# server (xenstore::conformance): reads and writes of arbitrary bytes, error
# names, directories and DIRECTORY_PART, permissions, watches (initial event,
# change, removal), transactions that commit, one with a forced conflict that
# must answer EAGAIN, and the retrying transaction closure.
set -u
if blkbackd xenstore-check --endpoint /run/xenstored/socket; then
  echo "VMTEST-MARK xenstore-client PASS"
else
  echo "VMTEST-MARK xenstore-client FAIL"
fi
